// Package remote makes and reads remote-cluster credentials.
//
// A primary watches a remote cluster with a kubeconfig held in an Istio-format remote
// secret: a Secret labelled istio/multiCluster=true, annotated
// networking.istio.io/cluster=<id>, whose every data key is a cluster ID and whose value is
// a kubeconfig for that cluster. Secrets written by istioctl are accepted unchanged.
//
// Kubeconfigs in secrets are untrusted input: ParseKubeconfig refuses exec plugins,
// auth-provider plugins and file references (which would run commands or read files on the
// primary's host) unless a Policy allows them, and reports exactly which user or cluster
// entry broke which rule.
//
// Create makes the other side: a least-privilege reader service account in the remote
// cluster (list and watch of what a primary reads, plus TokenReviews for the CA), a token
// for it, and the remote secret that carries them.
//
// Imported by primary and cmd; imports mesh and client-go.
package remote
