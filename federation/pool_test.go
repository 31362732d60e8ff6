package federation

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// events records what a pool's OnChange saw.
type events struct {
	mu   sync.Mutex
	dead map[string]time.Time
}

func (e *events) onChange(m Member) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.dead == nil {
		e.dead = map[string]time.Time{}
	}
	if !m.Alive {
		e.dead[m.Name] = time.Now()
	} else {
		delete(e.dead, m.Name)
	}
}

func (e *events) deadAt(name string) (time.Time, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	t, ok := e.dead[name]
	return t, ok
}

func startPool(t *testing.T, name, fedID string, secret []byte, reg prometheus.Registerer, onChange func(Member)) *Pool {
	t.Helper()
	p, err := NewPool(PoolConfig{Name: name, FederationID: fedID, Secret: secret, Meta: MemberMeta{TrustDomain: name + ".example", Endpoint: "127.0.0.1:1"}, OnChange: onChange, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPoolDetectsDeadPeer runs five meshes' pools on loopback (real memberlist, real UDP
// and TCP), kills one without leaving, and measures how long each survivor takes to
// declare it dead. The bound is the design's 5 s; the figure is logged.
func TestPoolDetectsDeadPeer(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 32)
	const n = 5
	pools := make([]*Pool, n)
	evs := make([]*events, n)
	for i := range n {
		evs[i] = &events{}
		pools[i] = startPool(t, fmt.Sprintf("mesh-%d", i), "fed-1", secret, nil, evs[i].onChange)
		if i > 0 {
			if err := pools[i].Join([]string{pools[0].Addr()}); err != nil {
				t.Fatal(err)
			}
		}
	}
	eventually(t, 10*time.Second, "every pool sees all members", func() error {
		for i, p := range pools {
			if got := len(p.Members()); got != n {
				return fmt.Errorf("mesh-%d sees %d members", i, got)
			}
		}
		return nil
	})
	if m := pools[1].Members(); m[0].Meta.TrustDomain == "" {
		t.Fatalf("metadata not gossiped: %+v", m)
	}
	killed := time.Now()
	pools[n-1].Kill()
	victim := fmt.Sprintf("mesh-%d", n-1)
	eventually(t, 10*time.Second, "survivors declare "+victim+" dead", func() error {
		for i := range n - 1 {
			if _, ok := evs[i].deadAt(victim); !ok {
				return fmt.Errorf("mesh-%d has not", i)
			}
		}
		return nil
	})
	var worst time.Duration
	for i := range n - 1 {
		at, _ := evs[i].deadAt(victim)
		worst = max(worst, at.Sub(killed))
	}
	t.Logf("peer failure seen by all %d survivors within %s", n-1, worst.Round(time.Millisecond))
	if worst > 5*time.Second {
		t.Errorf("peer failure took %s to be seen by all, design bound is 5s", worst)
	}
}

// TestPoolRefusesForeignFederations: a member with another keyring, or another label,
// cannot join, and the refusal is counted.
func TestPoolRefusesForeignFederations(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := startPool(t, "mesh-a", "fed-1", bytes.Repeat([]byte{1}, 32), reg, nil)
	for _, c := range []struct {
		name, fed string
		secret    []byte
		reason    string
	}{
		{"foreign keyring", "fed-1", bytes.Repeat([]byte{2}, 32), "keyring"},
		{"foreign label", "fed-2", bytes.Repeat([]byte{1}, 32), "label"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := startPool(t, "mesh-x-"+c.reason, c.fed, c.secret, nil, nil)
			if err := b.Join([]string{a.Addr()}); err == nil {
				t.Fatalf("joined a pool of another federation: %v", b.Members())
			}
			eventually(t, 5*time.Second, "refusal counted", func() error {
				if v := testutil.ToFloat64(a.refused.WithLabelValues(c.reason)); v == 0 {
					return fmt.Errorf("isthmus_federation_gossip_refused_total{reason=%q} is 0", c.reason)
				}
				return nil
			})
			if got := len(a.Members()); got != 1 {
				t.Fatalf("mesh-a sees %d members", got)
			}
		})
	}
}

func TestGossipKey(t *testing.T) {
	s := bytes.Repeat([]byte{9}, 32)
	k1, _ := GossipKey(s, "fed-1")
	k2, _ := GossipKey(s, "fed-2")
	if len(k1) != 32 || bytes.Equal(k1, k2) {
		t.Fatalf("keys %x %x", k1, k2)
	}
	if _, err := GossipKey([]byte("short"), "fed-1"); err == nil {
		t.Fatal("short secret accepted")
	}
}

// TestJoinSeeds: an acceptor hands a dialer itself first and at most two other alive
// members, never a dead one, never itself twice.
func TestJoinSeeds(t *testing.T) {
	members := []Member{{Name: "self", Addr: "127.0.0.1:1", Alive: true}, {Name: "dead", Addr: "127.0.0.1:2"}}
	for i := range 10 {
		members = append(members, Member{Name: fmt.Sprint("m", i), Addr: fmt.Sprintf("127.0.0.1:%d", 10+i), Alive: true})
	}
	for range 20 {
		got := joinSeeds("127.0.0.1:1", members, maxJoinSeeds)
		if len(got) != maxJoinSeeds || got[0] != "127.0.0.1:1" || slices.Contains(got, "127.0.0.1:2") || slices.Contains(got[1:], "127.0.0.1:1") || got[1] == got[2] {
			t.Fatalf("seeds %v", got)
		}
	}
	if got := joinSeeds("127.0.0.1:1", members[:2], maxJoinSeeds); !slices.Equal(got, []string{"127.0.0.1:1"}) {
		t.Fatalf("seeds of a pool of one %v", got)
	}
}
