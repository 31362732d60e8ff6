package primary_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/remote"
)

// TestRemovingASecretRemovesTheCluster deletes cluster 3's remote secret and links it
// again.
func TestRemovingASecretRemovesTheCluster(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	ensureEchoService(t, 2)
	linkCluster(t, 2)
	c3 := env.clusters[2].Name
	kubetest.Eventually(t, 20*time.Second, c3+" linked", func() error {
		if s, _ := statusOf(clusterz(t), c3); s.State != primary.StateSynced {
			return fmt.Errorf("%+v", s)
		}
		return nil
	})
	if err := env.clients[0].CoreV1().Secrets("istio-system").Delete(ctx, remote.SecretNamePrefix+c3, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, c3+" removed with its services", func() error {
		s, _ := statusOf(clusterz(t), c3)
		if s.State != primary.StateRemoved {
			return fmt.Errorf("%+v", s)
		}
		if env.primary.Registry().Shard(primary.ShardKey{Source: primary.SourceKubernetes, Cluster: mesh.ClusterID(c3)}) != nil {
			return fmt.Errorf("shard of %s still in the registry", c3)
		}
		return nil
	})
	linkCluster(t, 2)
	kubetest.Eventually(t, 20*time.Second, c3+" linked again", func() error {
		if s, _ := statusOf(clusterz(t), c3); s.State != primary.StateSynced || s.Services == 0 {
			return fmt.Errorf("%+v", s)
		}
		return nil
	})
}

// TestClusterLocalServicesStayHome checks that kube-system services and the kubernetes
// Service never enter the registry.
func TestClusterLocalServicesStayHome(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	_, err := env.clients[0].CoreV1().Services("kube-system").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "dns", Namespace: "kube-system"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tcp-dns", Port: 53}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ensureEchoService(t, 0)
	kubetest.Eventually(t, 10*time.Second, "echo in the registry", func() error {
		if env.primary.Registry().View().Service(echoHost) == nil {
			return fmt.Errorf("no %s", echoHost)
		}
		return nil
	})
	v := env.primary.Registry().View()
	for _, h := range []mesh.Hostname{"dns.kube-system.svc.cluster.local", "kubernetes.default.svc.cluster.local"} {
		if v.Service(h) != nil {
			t.Errorf("cluster-local service %s left its cluster", h)
		}
	}
}

// TestDeltaXDS subscribes with the incremental (delta) ADS protocol, which Envoy uses by
// default in recent versions, and checks the clusters arrive.
func TestDeltaXDS(t *testing.T) {
	needEnv(t)
	ensureEchoService(t, 0)
	conn, err := grpc.NewClient(env.xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	meta, _ := structpb.NewStruct(map[string]any{primary.MetaClusterID: env.clusters[0].Name})
	if err := stream.Send(&discovery.DeltaDiscoveryRequest{
		Node:                   &core.Node{Id: "sidecar~10.0.0.1~delta.demo~demo.svc.cluster.local", Metadata: meta},
		TypeUrl:                resource.ClusterType,
		ResourceNamesSubscribe: []string{"*"},
	}); err != nil {
		t.Fatal(err)
	}
	want := mesh.OutboundName{Port: echoPort, Host: echoHost}.ClusterName()
	for {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("delta stream: %v", err)
		}
		for _, r := range resp.Resources {
			if r.Name == want {
				return
			}
		}
		stream.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: resp.Nonce})
	}
}

// TestKubeconfigDirectorySource runs a second primary, in cluster 2, that learns cluster 3
// from a kubeconfig file, and refuses a file whose name is not a cluster ID.
func TestKubeconfigDirectorySource(t *testing.T) {
	needEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	created, err := remote.Create(ctx, env.clients[2], env.clusters[2].RESTConfig(), remote.CreateOptions{Cluster: "ignored"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, env.clusters[2].Name+".yaml"), []byte(created.Secret.StringData["ignored"]), 0o600)
	os.WriteFile(filepath.Join(dir, "not a cluster id.yaml"), []byte("x"), 0o600)
	p, err := primary.New(primary.Config{
		ClusterID: mesh.ClusterID(env.clusters[1].Name), LocalClient: env.clients[1], KubeconfigDir: dir,
		ProbeInterval: time.Second, SyncTimeout: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	kubetest.Eventually(t, 20*time.Second, "cluster 3 from the directory", func() error {
		var fromDir, refused bool
		for _, s := range p.Clusters() {
			if string(s.ID) == env.clusters[2].Name && s.State == primary.StateSynced && s.Source == "dir "+dir {
				fromDir = true
			}
			if s.State == primary.StateError && s.Error != "" {
				refused = true
			}
		}
		if !fromDir || !refused {
			return fmt.Errorf("%+v", p.Clusters())
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
