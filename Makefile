# The README's two commands: `make up` (the main job) and `make test` (everything CI runs).
GO ?= go
FUZZTIME ?= 20000x
PKGS := ./...

.PHONY: test check unit integration fuzz up down binaries peers bench bench-peers bench-ingress bench-istiod bench-federation bench-scale bench-csr

## test: formatting, vet, unit and integration tests (with -race) and bounded fuzzing
test: check binaries peers
	$(GO) test -race -count=1 -timeout 30m $(PKGS)
	$(MAKE) fuzz

## check: gofmt and go vet must be clean, and no tracked file is a build output (a binary
## built into the tree once made a whole submission too big to land)
check:
	@big=$$(git ls-files -z 2>/dev/null | xargs -0 -r stat -c '%s %n' 2>/dev/null | awk '$$1 > 1048576 {print $$2}'); \
	  if [ -n "$$big" ]; then echo "tracked files over 1 MiB (build outputs? add them to .gitignore):"; echo "$$big"; exit 1; fi
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	cd tools/k8s && $(GO) vet ./etcd

## unit: the fast tests only (integration tests skip under -short)
unit:
	$(GO) test -race -short -count=1 $(PKGS)

## fuzz: run every fuzz target for FUZZTIME
FUZZPKGS := ./mesh ./remote ./eastwest ./scenarios ./trust ./primary ./federation ./deploy ./proxy
fuzz:
	@for pkg in $(FUZZPKGS); do \
	  for target in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$target for $(FUZZTIME)"; \
	    $(GO) test $$pkg -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) || exit 1; \
	  done; \
	done

## binaries: build the etcd and Kubernetes binaries into the cache (once per version)
binaries:
	$(GO) run ./cmd/isthmus cluster binaries

## peers: build the real peers the interop tests use (spire-server; istiod and istioctl)
## into the cache, once per version (about 10-15 minutes cold each)
peers:
	$(GO) run ./internal/spirebin/ensure
	$(GO) run ./internal/istiobin/ensure

## up: the main job, a multi-network mesh on local clusters, checked end to end; keeps
## running until Ctrl-C (ARGS="--detach" returns, `make down` stops it)
BIN := $(HOME)/.cache/isthmus/bin/isthmus
ARGS ?=
up: binaries
	$(GO) build -o $(BIN) ./cmd/isthmus
	$(BIN) up $(ARGS)

down:
	$(GO) build -o $(BIN) ./cmd/isthmus
	$(BIN) down

## bench: the benchmarks recorded in docs/benchmarks.md
bench:
	$(GO) test ./internal/kubelocal -run '^$$' -bench . -benchtime 5x

## bench-peers: the east-west gateway beside nginx and HAProxy on loopback, one table of
## medians and ratios (docs/benchmarks.md); installs the peers from Debian when missing
## (root). ARGS="-rounds 3 -duration 2s" shortens it.
bench-peers:
	$(GO) run ./internal/peerbench/benchpeers $(ARGS)

## bench-ingress: isthmus proxy's HTTP path beside nginx as a reverse proxy and a direct
## call, HTTP/1.1 and HTTP/2, medians and ratios (docs/benchmarks.md, "Ingress").
bench-ingress:
	$(GO) run ./internal/peerbench/benchpeers -http $(ARGS)

## bench-istiod: the Isthmus primary against a real istiod, side by side (docs/benchmarks.md)
bench-istiod: peers
	$(GO) test ./cmd/isthmus -run '^$$' -bench ControlPlaneVsIstiod -benchtime 1x -timeout 20m -v

## bench-federation: in-process meshes on loopback (real memberlist, mTLS gRPC): export
## propagation at 10 and 100 meshes, peer failure and gossip bytes with our memberlist
## timings beside memberlist's LAN and WAN profiles (docs/benchmarks.md, "Federation");
## TestFederationBenchShort is the CI-sized run. About 15 minutes.
bench-federation:
	$(GO) test ./federation -run '^$$' -bench 'ExportPropagation' -benchtime 50x -timeout 30m
	$(GO) test ./federation -run '^$$' -bench 'PeerFailure' -benchtime 3x -timeout 60m

## bench-scale: the primary with 10, 100 and 1,000 clusters in its registry (in-process
## sources, the primary in a child process) and delta vs state-of-the-world xDS at 10,000
## clients (docs/benchmarks.md). ARGS="-clusters 10,100 -delta-clients 1000" shortens it.
bench-scale:
	$(GO) run ./internal/scalebench/benchscale $(ARGS)

## bench-csr: CSR signing, raw x509 vs the handler vs the CA's gRPC path vs istiod's CA
## (docs/benchmarks.md); as root, builds istiod first if missing
bench-csr: peers
	$(GO) test ./cmd/isthmus -run '^$$' -bench CSRVsIstiod -benchtime 1x -timeout 30m -v
