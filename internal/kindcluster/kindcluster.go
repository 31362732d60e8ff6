package kindcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"sigs.k8s.io/kind/pkg/apis/config/v1alpha4"
	"sigs.k8s.io/kind/pkg/cluster"
	"sigs.k8s.io/kind/pkg/log"

	"github.com/isthmus-mesh/isthmus/internal/engine"
	"github.com/isthmus-mesh/isthmus/internal/uplinkguard"
)

// NetworkLabel marks the container networks this package makes.
const NetworkLabel = "isthmus.io/network"

// Spec is one cluster.
type Spec struct {
	// Name is the kind cluster's name (its node container is <Name>-control-plane).
	Name string
	// Network is the container network the node joins; made with Subnet when missing.
	Network string
	// Subnet is the network's IPv4 range, e.g. 10.213.1.0/24.
	Subnet string
	// PodSubnet and ServiceSubnet are the cluster's ranges.
	PodSubnet, ServiceSubnet string
	// NodeImage is the node image (nodeimage.Ref()).
	NodeImage string
	// Dir receives the kubeconfig (kubeconfig) and the CNI configuration.
	Dir string
}

// Cluster is a started cluster.
type Cluster struct {
	Spec
	// Kubeconfig is the path of its kubeconfig; the server is on 127.0.0.1.
	Kubeconfig string
}

// kind reads the network and the engine from the environment of its docker commands, so
// creations are serialized and the variables set around each.
var envMu sync.Mutex

// Create makes the network if needed and the cluster, and returns once its node is Ready.
func Create(ctx context.Context, e *engine.Engine, g *uplinkguard.Guard, s Spec, progress func(string)) (*Cluster, error) {
	if progress == nil {
		progress = func(string) {}
	}
	if err := validate(s); err != nil {
		return nil, err
	}
	if g == nil {
		return nil, errors.New("kindcluster: no uplink guard")
	}
	if err := g.Check(); err != nil {
		return nil, fmt.Errorf("kindcluster: %w", err)
	}
	if err := EnsureNetwork(ctx, e, s.Network, s.Subnet); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return nil, err
	}
	cni := filepath.Join(s.Dir, "10-isthmus-bridge.conflist")
	if err := os.WriteFile(cni, bridgeCNI(s.PodSubnet), 0o644); err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(s.Dir, "kubeconfig")
	cfg := &v1alpha4.Cluster{
		TypeMeta: v1alpha4.TypeMeta{Kind: "Cluster", APIVersion: "kind.x-k8s.io/v1alpha4"},
		Networking: v1alpha4.Networking{
			DisableDefaultCNI: true,
			PodSubnet:         s.PodSubnet,
			ServiceSubnet:     s.ServiceSubnet,
			APIServerAddress:  "127.0.0.1",
		},
		Nodes: []v1alpha4.Node{{
			Role:  v1alpha4.ControlPlaneRole,
			Image: s.NodeImage,
			ExtraMounts: []v1alpha4.Mount{{
				HostPath: cni, ContainerPath: "/etc/cni/net.d/10-isthmus-bridge.conflist", Readonly: true,
			}},
		}},
	}
	envMu.Lock()
	defer envMu.Unlock()
	restore := setenv(map[string]string{"DOCKER_HOST": e.Host, "KIND_EXPERIMENTAL_DOCKER_NETWORK": s.Network})
	defer restore()
	p := cluster.NewProvider(cluster.ProviderWithDocker(), cluster.ProviderWithLogger(logger{progress}))
	progress(fmt.Sprintf("kind cluster %s: creating on network %s", s.Name, s.Network))
	start := time.Now()
	err := p.Create(s.Name,
		cluster.CreateWithV1Alpha4Config(cfg),
		cluster.CreateWithNodeImage(s.NodeImage),
		cluster.CreateWithKubeconfigPath(kubeconfig),
		cluster.CreateWithWaitForReady(3*time.Minute),
		cluster.CreateWithDisplayUsage(false),
		cluster.CreateWithDisplaySalutation(false),
	)
	if err != nil {
		logs := filepath.Join(s.Dir, "logs")
		p.CollectLogs(s.Name, logs)
		p.Delete(s.Name, kubeconfig)
		return nil, fmt.Errorf("kindcluster: create %s: %w (node logs in %s)", s.Name, err, logs)
	}
	progress(fmt.Sprintf("kind cluster %s: ready in %s", s.Name, time.Since(start).Round(100*time.Millisecond)))
	return &Cluster{Spec: s, Kubeconfig: kubeconfig}, nil
}

// Delete removes the cluster (not its network: DeleteNetwork does, when the last cluster
// on it is gone).
func Delete(e *engine.Engine, c *Cluster) error {
	envMu.Lock()
	defer envMu.Unlock()
	restore := setenv(map[string]string{"DOCKER_HOST": e.Host, "KIND_EXPERIMENTAL_DOCKER_NETWORK": c.Network})
	defer restore()
	p := cluster.NewProvider(cluster.ProviderWithDocker(), cluster.ProviderWithLogger(logger{func(string) {}}))
	if err := p.Delete(c.Name, c.Kubeconfig); err != nil {
		return fmt.Errorf("kindcluster: delete %s: %w", c.Name, err)
	}
	return nil
}

// EnsureNetwork makes a bridge network with the given subnet and no masquerading, unless
// one of that name exists with that subnet (another subnet is an error).
func EnsureNetwork(ctx context.Context, e *engine.Engine, name, subnet string) error {
	var out bytes.Buffer
	if run(ctx, e, &out, "network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", name) == nil {
		if !strings.Contains(" "+out.String(), " "+subnet+" ") {
			return fmt.Errorf("kindcluster: network %s exists with subnets %q, not %s: remove it (docker network rm %s)", name, strings.TrimSpace(out.String()), subnet, name)
		}
		return nil
	}
	out.Reset()
	if err := run(ctx, e, &out, "network", "create", "--driver", "bridge", "--subnet", subnet,
		"--opt", "com.docker.network.bridge.enable_ip_masquerade=false",
		"--label", NetworkLabel+"="+name, name); err != nil {
		return fmt.Errorf("kindcluster: create network %s (%s): %v: %s", name, subnet, err, out.String())
	}
	return nil
}

// DeleteNetwork removes a network this package made.
func DeleteNetwork(ctx context.Context, e *engine.Engine, name string) error {
	var out bytes.Buffer
	if err := run(ctx, e, &out, "network", "rm", name); err != nil {
		return fmt.Errorf("kindcluster: remove network %s: %v: %s", name, err, out.String())
	}
	return nil
}

func validate(s Spec) error {
	for field, v := range map[string]string{"Name": s.Name, "Network": s.Network, "NodeImage": s.NodeImage, "Dir": s.Dir} {
		if v == "" {
			return fmt.Errorf("kindcluster: %s is empty", field)
		}
	}
	for field, v := range map[string]string{"Subnet": s.Subnet, "PodSubnet": s.PodSubnet, "ServiceSubnet": s.ServiceSubnet} {
		p, err := netip.ParsePrefix(v)
		if err != nil || !p.Addr().Is4() {
			return fmt.Errorf("kindcluster: %s %q is not an IPv4 prefix", field, v)
		}
	}
	return nil
}

// bridgeCNI is the node's CNI configuration: a bridge with the whole pod range (one node
// per cluster), pods reaching beyond the node masqueraded to the node's address.
func bridgeCNI(podSubnet string) []byte {
	b, _ := json.MarshalIndent(map[string]any{
		"cniVersion": "0.4.0",
		"name":       "isthmus",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
				"ipam": map[string]any{
					"type":   "host-local",
					"ranges": [][]map[string]string{{{"subnet": podSubnet}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}, "", "  ")
	return b
}

func setenv(vars map[string]string) func() {
	old := map[string]*string{}
	for k, v := range vars {
		if prev, ok := os.LookupEnv(k); ok {
			old[k] = &prev
		} else {
			old[k] = nil
		}
		os.Setenv(k, v)
	}
	return func() {
		for k, v := range old {
			if v == nil {
				os.Unsetenv(k)
			} else {
				os.Setenv(k, *v)
			}
		}
	}
}

func run(ctx context.Context, e *engine.Engine, out *bytes.Buffer, args ...string) error {
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), e.Env())
	cmd.Stdout, cmd.Stderr = out, out
	return cmd.Run()
}

// logger passes kind's messages on as progress lines.
type logger struct{ say func(string) }

func (l logger) Warn(m string)                { l.say("kind: " + m) }
func (l logger) Warnf(f string, a ...any)     { l.say("kind: " + fmt.Sprintf(f, a...)) }
func (l logger) Error(m string)               { l.say("kind: " + m) }
func (l logger) Errorf(f string, a ...any)    { l.say("kind: " + fmt.Sprintf(f, a...)) }
func (l logger) V(log.Level) log.InfoLogger   { return infoLogger(l) }
func (infoLogger) Enabled() bool              { return true }
func (i infoLogger) Info(m string)            { i.say("kind: " + m) }
func (i infoLogger) Infof(f string, a ...any) { i.say("kind: " + fmt.Sprintf(f, a...)) }

type infoLogger logger
