// Package deploy renders (purely) and applies the Kubernetes objects of each deployment
// model: which clusters run a primary, which are remotes, where gateways live.
//
// Status: not yet built. Imported by scenarios and cmd; never by primary.
package deploy
