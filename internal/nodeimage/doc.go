// Package nodeimage builds a kind node image on a machine that cannot pull one: from
// Debian's packages (debootstrap) and Go modules, with no registry and no internet beyond
// the Debian mirror and the Go module proxy.
//
// The image is what kind's own node images are: a Debian root with systemd, containerd and
// runc; kubelet, kubeadm and kubectl in /usr/bin; kind's base files (its entrypoint, systemd
// units and containerd configuration, read from the sigs.k8s.io/kind module, not copied
// into this repository); /kind/version; and, imported into containerd's k8s.io namespace
// (pinned, unpacked on first use), the component images kubeadm asks for
// (`kubeadm config images list`), each a layer with its binary on a Debian base.
//
// Three settings differ from kind's published images, all for machines like this
// project's CI VM (cgroup v1, CAP_SYS_RESOURCE missing from the bounding set):
// containerd's restrict_oom_score_adj is true (lowering OOM scores needs CAP_SYS_RESOURCE),
// kubelet runs with --fail-cgroupv1=false, and there is no CNI manifest: the kind provider
// mounts a bridge CNI configuration per cluster, so each cluster has its own pod range.
//
// Ensure returns the image reference, building it once per recipe (Kubernetes and kind
// versions, Debian suite, recipe revision) into the engine's image store, which lives in
// the cache and survives the engine. A build that fails leaves no image under that
// reference.
package nodeimage
