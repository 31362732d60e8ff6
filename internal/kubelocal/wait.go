package kubelocal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/proc"
)

// backoffStop wraps an error that ends a poll at once instead of being retried.
type backoffStop struct{ err error }

func (b backoffStop) Error() string { return b.err.Error() }
func (b backoffStop) Unwrap() error { return b.err }

// poll calls check every interval until it returns nil, returns a backoffStop, or ctx
// ends; the error then carries the last reason check gave.
func poll(ctx context.Context, interval time.Duration, check func(context.Context) error) error {
	var last error
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		var stop backoffStop
		if errors.As(err, &stop) {
			return stop.err
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w; last check: %v", ctx.Err(), last)
		case <-time.After(interval):
		}
	}
}

// waitReady polls check until it succeeds, failing early with the log tail when p exits.
func waitReady(ctx context.Context, p *proc.Process, check func(context.Context) error) error {
	return poll(ctx, 50*time.Millisecond, func(ctx context.Context) error {
		if p.Exited() {
			return backoffStop{p.ExitError()}
		}
		if err := check(ctx); err != nil {
			return fmt.Errorf("%s not ready: %w", p.Name, err)
		}
		return nil
	})
}

// httpGetOK returns nil when GET url answers 200.
func httpGetOK(ctx context.Context, client *http.Client, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, body)
	}
	return nil
}

// systemNamespaces are the namespaces the API server makes itself at start-up.
var systemNamespaces = []string{"default", "kube-system", "kube-public", "kube-node-lease"}

// waitDefaultServiceAccount waits until the controller manager has made the default
// service account, which the API server requires before it admits Pods, and the root CA
// ConfigMap, in every system namespace. It is also the
// controller manager's readiness check (it serves no probe port), so it fails at once when
// any component has exited rather than waiting out the timeout.
func (c *Cluster) waitDefaultServiceAccount(ctx context.Context) error {
	client, err := c.Client()
	if err != nil {
		return err
	}
	err = poll(ctx, 50*time.Millisecond, func(ctx context.Context) error {
		if err := c.checkAlive(); err != nil {
			return backoffStop{err}
		}
		// Every system namespace gets its default service account and the root CA
		// ConfigMap from the controller manager; waiting for all of them, not only
		// default's, hands tests a cluster that no longer changes by itself (a snapshot
		// taken earlier sees these objects appear later).
		for _, ns := range systemNamespaces {
			if _, err := client.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{}); err != nil {
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("the default service account of %s does not exist yet (kube-controller-manager not working?)", ns)
				}
				return err
			}
			if _, err := client.CoreV1().ConfigMaps(ns).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
				if apierrors.IsNotFound(err) {
					return fmt.Errorf("the root CA ConfigMap of %s does not exist yet (kube-controller-manager not working?)", ns)
				}
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("wait for kube-controller-manager: %w", err)
	}
	return nil
}
