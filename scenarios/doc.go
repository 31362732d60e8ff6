// Package scenarios brings up deployment models as topologies on real clusters (local by
// default, kind where Docker exists) and checks reachability, trust and failure behaviour.
//
// Status: not yet built (issue "scenarios"). Imported by cmd only.
package scenarios
