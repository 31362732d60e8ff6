// Package uplinkguard keeps container networks from reaching anything beyond this machine.
//
// A container network (docker's, kind's) forwards traffic through the host. A packet to an
// address nothing local answers, such as a Service ClusterIP kube-proxy has not programmed
// yet, follows the host's default route out of the machine. Before any container network
// exists, Install inserts a rule that rejects forwarded traffic leaving through the uplink
// (the interface of each default route) at the top of FORWARD and of DOCKER-USER (the
// chain docker evaluates before its own rules, created if missing), for IPv4 and, where
// ip6tables works, IPv6. Check reads the chains back and fails unless every rule is there;
// callers check before they create a network. Remove deletes only the rules this Guard
// inserted.
package uplinkguard
