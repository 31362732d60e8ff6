// Command benchpeers runs the east-west gateway side by side with nginx and HAProxy on
// loopback and prints one table of medians and ratios (docs/benchmarks.md):
//
//	make bench-peers                                  # 5 rounds of 3 s per phase
//	go run ./internal/peerbench/benchpeers -rounds 3 -duration 2s -o json
//
// ISTHMUS_PEERBENCH_CPUPROFILE=FILE makes the gateway write its CPU profile there. It
// installs the peers from Debian's packages when they are missing (root and apt-get).
package main
