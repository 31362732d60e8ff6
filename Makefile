# The README's two commands: `make up` (the main job) and `make test` (everything CI runs).
GO ?= go
FUZZTIME ?= 20000x
PKGS := ./...

.PHONY: test check unit integration fuzz up down binaries bench

## test: formatting, vet, unit and integration tests (with -race) and bounded fuzzing
test: check binaries
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
FUZZPKGS := ./mesh ./remote ./eastwest ./scenarios
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
