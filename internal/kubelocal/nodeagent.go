package kubelocal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Annotations a Pod may carry to steer the node agent.
const (
	// PodIPAnnotation asks for a specific pod IP, e.g. the address of a workload process
	// running in a network namespace. Without it the agent assigns one from the pod CIDR.
	PodIPAnnotation = "isthmus.io/pod-ip"
	// ReadyAnnotation set to "false" keeps the Pod running but not Ready, so that its
	// endpoint is published as not ready.
	ReadyAnnotation = "isthmus.io/ready"
)

// NodeAgentConfig configures a NodeAgent.
type NodeAgentConfig struct {
	// Client talks to the cluster; required.
	Client kubernetes.Interface
	// NodeName is the Node the agent registers and binds Pods to; required.
	NodeName string
	// NodeIP is the node's InternalIP and the IP of host-network Pods; default 127.0.0.1.
	NodeIP netip.Addr
	// PodCIDR is the range pod IPs are assigned from; required.
	PodCIDR netip.Prefix
	// Region and Zone become the node's topology labels when set.
	Region, Zone string
	// Log receives the agent's events; nil discards them.
	Log *slog.Logger
}

// NodeAgent stands in for a kubelet on a cluster without one: it registers a Ready Node,
// binds every unscheduled Pod to it, and reports bound Pods as Running and Ready with a pod
// IP, so that the real endpoint and EndpointSlice controllers publish them. It does not run
// containers. Pods being deleted are removed at once (there is no container to stop).
//
// It is a level-triggered controller: Pod events queue keys; each key is reconciled from
// the informer's cache.
type NodeAgent struct {
	cfg NodeAgentConfig
	// queue and lister are set by Run before any worker reads them.
	queue  workqueue.TypedRateLimitingInterface[string]
	lister listersv1.PodLister

	mu sync.Mutex
	// ips maps pod key ("namespace/name") to the IP the agent assigned it, annotated ones
	// included so that the allocator never hands them out again; guarded by mu. An entry
	// is released when its Pod is gone from the informer's cache.
	ips map[string]netip.Addr
}

// NewNodeAgent validates cfg and returns an agent; Run starts it.
func NewNodeAgent(cfg NodeAgentConfig) (*NodeAgent, error) {
	if cfg.Client == nil || cfg.NodeName == "" {
		return nil, errors.New("kubelocal: node agent: Client and NodeName are required")
	}
	if !cfg.PodCIDR.IsValid() {
		return nil, errors.New("kubelocal: node agent: PodCIDR is required")
	}
	if !cfg.NodeIP.IsValid() {
		cfg.NodeIP = netip.MustParseAddr("127.0.0.1")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	cfg.Log = cfg.Log.With("node", cfg.NodeName)
	return &NodeAgent{cfg: cfg, ips: map[string]netip.Addr{}}, nil
}

// Run registers the node and reconciles Pods until ctx ends, with one worker (Pods of a
// local cluster are few). It returns nil when ctx ends, and an error only when the node cannot be registered or
// the informer cannot sync. Run must be called once.
func (a *NodeAgent) Run(ctx context.Context) error {
	if err := a.ensureNode(ctx); err != nil {
		return err
	}
	a.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer a.queue.ShutDown()
	factory := informers.NewSharedInformerFactory(a.cfg.Client, 0)
	pods := factory.Core().V1().Pods()
	a.lister = pods.Lister()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			a.queue.Add(key)
		}
	}
	if _, err := pods.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), pods.Informer().HasSynced) {
		return fmt.Errorf("kubelocal: node agent %s: pod cache did not sync: %w", a.cfg.NodeName, ctx.Err())
	}
	a.loadAssigned()
	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	for a.processNext(ctx) {
	}
	return nil
}

// loadAssigned rebuilds the IP assignments from Pods already on the node, so that a
// restarted agent never hands out an address twice.
func (a *NodeAgent) loadAssigned() {
	pods, _ := a.lister.List(labels.Everything())
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range pods {
		if p.Spec.NodeName != a.cfg.NodeName || p.Status.PodIP == "" {
			continue
		}
		if ip, err := netip.ParseAddr(p.Status.PodIP); err == nil {
			a.ips[p.Namespace+"/"+p.Name] = ip
		}
	}
}

// processNext reconciles one key; it returns false once the queue is shut down. A failed
// key is retried with the queue's rate limit, unless ctx ended (the failure is then the
// shutdown, not the Pod).
func (a *NodeAgent) processNext(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	if err := a.reconcile(ctx, key); err != nil {
		if ctx.Err() != nil {
			return false
		}
		a.cfg.Log.Warn("reconcile pod", "pod", key, "err", err)
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// reconcile brings one Pod to the state a kubelet on this node would give it, from the
// cached object, never from the event: a deleted Pod releases its IP; a Pod being deleted
// is deleted for good (grace 0, guarded by its UID so a new Pod of the same name is never
// hit); an unbound Pod is bound to this node; a bound Pod gets the status of
// desiredStatus, written only when the agent's fields differ (statusEqual), so that an
// unchanged Pod causes no write and no new event. Conflicts and NotFound mean a newer
// version of the Pod is already queued and are not errors.
func (a *NodeAgent) reconcile(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil // malformed keys cannot be retried into shape
	}
	pod, err := a.lister.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		a.release(key)
		return nil
	} else if err != nil {
		return err
	}
	pods := a.cfg.Client.CoreV1().Pods(ns)
	switch {
	case pod.Spec.NodeName != "" && pod.Spec.NodeName != a.cfg.NodeName:
		return nil // another node's Pod
	case pod.DeletionTimestamp != nil:
		// No kubelet will ever confirm the containers stopped; finish the deletion.
		uid := pod.UID
		err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64), Preconditions: &metav1.Preconditions{UID: &uid}})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil
		}
		return err
	case pod.Spec.NodeName == "":
		err := pods.Bind(ctx, &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: pod.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: a.cfg.NodeName},
		}, metav1.CreateOptions{})
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			return nil // bound or deleted meanwhile; a new event follows
		}
		return err
	}
	status, err := a.desiredStatus(key, pod)
	if err != nil {
		return err
	}
	if statusEqual(&pod.Status, status) {
		return nil
	}
	updated := pod.DeepCopy()
	updated.Status = *status
	_, err = pods.UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil // a newer version is queued already
	}
	return err
}

// desiredStatus computes the status the Pod should have on this node: Running and Ready
// with its IP (podIP), or NotReady by ReadyAnnotation, or Pending with reason InvalidPodIP
// when the annotated address does not parse or the pod CIDR is exhausted. Start times and
// the transition times of unchanged conditions are kept, so the status is stable across
// reconciles. The error result is always nil today; a bad IP is a Pod condition, not a
// reconcile failure that would be retried forever.
func (a *NodeAgent) desiredStatus(key string, pod *corev1.Pod) (*corev1.PodStatus, error) {
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	start := now
	if pod.Status.StartTime != nil {
		start = *pod.Status.StartTime
	}
	s := &corev1.PodStatus{
		HostIP:    a.cfg.NodeIP.String(),
		HostIPs:   []corev1.HostIP{{IP: a.cfg.NodeIP.String()}},
		StartTime: &start,
		QOSClass:  pod.Status.QOSClass,
	}
	ip, ipErr := a.podIP(key, pod)
	ready := corev1.ConditionTrue
	reason, message := "", ""
	if ipErr != nil {
		ready, reason, message = corev1.ConditionFalse, "InvalidPodIP", ipErr.Error()
		s.Phase = corev1.PodPending
	} else {
		s.Phase = corev1.PodRunning
		s.PodIP = ip.String()
		s.PodIPs = []corev1.PodIP{{IP: ip.String()}}
		if pod.Annotations[ReadyAnnotation] == "false" {
			ready, reason, message = corev1.ConditionFalse, "NotReadyByAnnotation", ReadyAnnotation+"=false"
		}
	}
	cond := func(t corev1.PodConditionType, st corev1.ConditionStatus, reason, msg string) corev1.PodCondition {
		c := corev1.PodCondition{Type: t, Status: st, Reason: reason, Message: msg, LastTransitionTime: now}
		for _, old := range pod.Status.Conditions { // keep transition times stable
			if old.Type == t && old.Status == st {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
		return c
	}
	s.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, corev1.ConditionTrue, "", ""),
		cond(corev1.PodInitialized, corev1.ConditionTrue, "", ""),
		cond(corev1.ContainersReady, ready, reason, message),
		cond(corev1.PodReady, ready, reason, message),
	}
	if ipErr == nil {
		for _, c := range pod.Spec.Containers {
			s.ContainerStatuses = append(s.ContainerStatuses, corev1.ContainerStatus{
				Name:        c.Name,
				Image:       c.Image,
				ImageID:     c.Image,
				ContainerID: "isthmus://" + string(pod.UID) + "/" + c.Name,
				Ready:       ready == corev1.ConditionTrue,
				Started:     new(true),
				State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: start}},
			})
		}
	}
	return s, nil
}

// podIP returns the Pod's address: the node IP for host-network Pods, the annotated one,
// the one assigned earlier, or the next free address of the pod CIDR.
func (a *NodeAgent) podIP(key string, pod *corev1.Pod) (netip.Addr, error) {
	if pod.Spec.HostNetwork {
		return a.cfg.NodeIP, nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if want, ok := pod.Annotations[PodIPAnnotation]; ok {
		ip, err := netip.ParseAddr(want)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("annotation %s=%q is not an IP address", PodIPAnnotation, want)
		}
		a.ips[key] = ip
		return ip, nil
	}
	if ip, ok := a.ips[key]; ok {
		return ip, nil
	}
	used := make(map[netip.Addr]bool, len(a.ips))
	for _, ip := range a.ips {
		used[ip] = true
	}
	// Skip the network address and the first host address (conventionally a gateway).
	for ip := a.cfg.PodCIDR.Masked().Addr().Next().Next(); a.cfg.PodCIDR.Contains(ip); ip = ip.Next() {
		if !used[ip] {
			a.ips[key] = ip
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("pod CIDR %s is exhausted", a.cfg.PodCIDR)
}

// release forgets the IP of a Pod that is gone, making it free for the next one.
func (a *NodeAgent) release(key string) {
	a.mu.Lock()
	delete(a.ips, key)
	a.mu.Unlock()
}

// statusEqual compares what the agent decides (phase, IPs, condition statuses, reasons
// and messages, container readiness), not timestamps or fields it copies through.
func statusEqual(have, want *corev1.PodStatus) bool {
	if have.Phase != want.Phase || have.PodIP != want.PodIP || have.HostIP != want.HostIP ||
		len(have.Conditions) != len(want.Conditions) || len(have.ContainerStatuses) != len(want.ContainerStatuses) {
		return false
	}
	for i := range want.Conditions {
		h, w := have.Conditions[i], want.Conditions[i]
		if h.Type != w.Type || h.Status != w.Status || h.Reason != w.Reason || h.Message != w.Message {
			return false
		}
	}
	for i := range want.ContainerStatuses {
		if have.ContainerStatuses[i].Name != want.ContainerStatuses[i].Name || have.ContainerStatuses[i].Ready != want.ContainerStatuses[i].Ready {
			return false
		}
	}
	return true
}

// ensureNode creates the Node, or reuses the one a previous agent registered (keeping its
// labels as they are), and writes a Ready status with generous capacity: the agent never
// heartbeats again, which is fine because no node-lifecycle controller runs to mark it
// NotReady.
func (a *NodeAgent) ensureNode(ctx context.Context) error {
	nodes := a.cfg.Client.CoreV1().Nodes()
	nodeLabels := map[string]string{
		"kubernetes.io/hostname": a.cfg.NodeName,
		"kubernetes.io/os":       "linux",
		"kubernetes.io/arch":     "amd64",
	}
	if a.cfg.Region != "" {
		nodeLabels[corev1.LabelTopologyRegion] = a.cfg.Region
	}
	if a.cfg.Zone != "" {
		nodeLabels[corev1.LabelTopologyZone] = a.cfg.Zone
	}
	node, err := nodes.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err = nodes.Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, Labels: nodeLabels},
			Spec:       corev1.NodeSpec{PodCIDR: a.cfg.PodCIDR.String(), PodCIDRs: []string{a.cfg.PodCIDR.String()}},
		}, metav1.CreateOptions{})
	}
	if err != nil {
		return fmt.Errorf("kubelocal: node agent: register node %s: %w", a.cfg.NodeName, err)
	}
	now := metav1.Now()
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("16"),
		corev1.ResourceMemory: resource.MustParse("64Gi"),
		corev1.ResourcePods:   resource.MustParse("10000"),
	}
	node.Status = corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "IsthmusNodeAgentReady",
			Message: "pods are simulated by the isthmus node agent", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: a.cfg.NodeIP.String()},
			{Type: corev1.NodeHostName, Address: a.cfg.NodeName},
		},
		NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "isthmus-node-agent", OperatingSystem: "linux", Architecture: "amd64"},
	}
	if _, err := nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("kubelocal: node agent: mark node %s ready: %w", a.cfg.NodeName, err)
	}
	a.cfg.Log.Debug("node registered")
	return nil
}
