// Command benchscale runs the primary's scale cases (`make bench-scale`) and prints one
// table; see package scalebench and docs/benchmarks.md.
package main
