package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/peerbench"
)

func main() {
	peerbench.ServeGatewayIfChild()
	var cfg peerbench.Config
	var relays, output, phases string
	var httpMode bool
	var conns int
	flag.IntVar(&cfg.Rounds, "rounds", 5, "interleaved rounds; figures are medians over them")
	flag.DurationVar(&cfg.Duration, "duration", 3*time.Second, "length of each timed phase per relay")
	flag.IntVar(&cfg.IdleConns, "idle", 1000, "idle connections held in the memory phase")
	flag.IntVar(&cfg.Workers, "workers", 4, "clients opening new connections at once")
	flag.StringVar(&relays, "relays", "isthmus,nginx,haproxy", "relays to compare, the first is the one the ratios are of")
	flag.StringVar(&phases, "phases", "", "comma-separated phases to run (throughput, latency, pinned, connect, idle); default all")
	flag.BoolVar(&cfg.Syscalls, "syscalls", false, "end with strace'd phases counting system calls per connection and per round trip")
	flag.StringVar(&output, "o", "table", "table or json")
	flag.BoolVar(&httpMode, "http", false, "compare isthmus proxy's HTTP path with nginx as a reverse proxy and a direct call instead (HTTP/1.1 keep-alive and HTTP/2)")
	flag.IntVar(&conns, "conns", 16, "with -http: HTTP/1.1 connections, and HTTP/2 streams on one connection")
	flag.Parse()
	cfg.Relays = strings.Split(relays, ",")
	if phases != "" {
		cfg.Phases = strings.Split(phases, ",")
	}
	cfg.Progress = os.Stderr
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := peerbench.Ensure(ctx, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	start := time.Now()
	if httpMode {
		res, err := peerbench.RunHTTP(ctx, peerbench.HTTPConfig{Rounds: cfg.Rounds, Duration: cfg.Duration, Conns: conns, Progress: os.Stderr})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if output == "json" {
			e := json.NewEncoder(os.Stdout)
			e.SetIndent("", "  ")
			e.Encode(res)
			return
		}
		fmt.Printf("%s, %d rounds of %v per phase per relay, %d connections/streams, in %v; %v\n\n%s", start.UTC().Format(time.DateOnly), cfg.Rounds,
			cfg.Duration, conns, time.Since(start).Round(time.Second), res.Versions, res.HTTPTable())
		return
	}
	res, err := peerbench.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	switch output {
	case "json":
		e := json.NewEncoder(os.Stdout)
		e.SetIndent("", "  ")
		e.Encode(res)
	default:
		fmt.Printf("%s, %d rounds of %v per phase per relay, in %v; %v\n\n%s", start.UTC().Format(time.DateOnly), cfg.Rounds, cfg.Duration,
			time.Since(start).Round(time.Second), res.Versions, res.Table())
		if t := res.SyscallTable(); t != "" {
			fmt.Printf("\n%s", t)
		}
	}
}
