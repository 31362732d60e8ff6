package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/scalebench"
)

func main() {
	scalebench.ServeIfChild()
	clusters := flag.String("clusters", "10,100,1000", "cluster counts of the propagation cases")
	services := flag.Int("services", 100, "services per cluster (the same names in every cluster)")
	endpoints := flag.Int("endpoints", 10, "endpoints per service per cluster")
	clients := flag.Int("clients", 1000, "proxyless clients (one service each) in the propagation cases")
	changes := flag.Int("changes", 50, "isolated changes timed per case")
	deltaClients := flag.Int("delta-clients", 10000, "clients of the delta vs state-of-the-world cases (0 skips them)")
	deltaClusters := flag.Int("delta-clusters", 10, "clusters of the delta vs state-of-the-world cases")
	subscribe := flag.Int("subscribe", 10, "services each client subscribes to in the delta vs state-of-the-world cases")
	debounce := flag.Duration("debounce", 100*time.Millisecond, "the primary's debounce window (its default)")
	profile := flag.String("profile", "", "directory for the child's heap and CPU profiles (one case only: the last wins)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var cases []scalebench.Case
	for _, f := range strings.Split(*clusters, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "benchscale: bad -clusters %q\n", *clusters)
			os.Exit(2)
		}
		cases = append(cases, scalebench.Case{Shape: scalebench.Shape{Clusters: n, Services: *services, Endpoints: *endpoints, Debounce: *debounce},
			Clients: *clients, Subscribe: 1, Changes: *changes, ProfileDir: *profile})
	}
	if *deltaClients > 0 {
		for _, delta := range []bool{false, true} {
			cases = append(cases, scalebench.Case{Shape: scalebench.Shape{Clusters: *deltaClusters, Services: *services, Endpoints: *endpoints, Debounce: *debounce},
				Clients: *deltaClients, Subscribe: *subscribe, Delta: delta, Changes: *changes})
		}
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	start := time.Now()
	var res []scalebench.Result
	for _, c := range cases {
		r, err := scalebench.Run(ctx, c, []string{self}, os.Stderr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, scalebench.Table([]scalebench.Result{r}))
		res = append(res, r)
	}
	fmt.Printf("%s, %d cases in %v\n\n%s", start.UTC().Format(time.DateOnly), len(cases), time.Since(start).Round(time.Second), scalebench.Table(res))
}
