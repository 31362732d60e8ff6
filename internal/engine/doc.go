// Package engine provides the container engine the kind provider runs on.
//
// When Docker already answers (DOCKER_HOST, or /var/run/docker.sock), Start uses it and
// changes nothing. Otherwise it starts Debian's dockerd as a child, with its data under a
// cache directory and its socket and state under /run, the cgroupfs driver, overlay2, and
// no default bridge (so starting the engine creates no container network). Debian's
// docker.io is installed first when it is missing and Options.Install allows it.
//
// Some machines (this project's CI VM among them) run with CAP_SYS_RESOURCE missing from
// the kernel's capability bounding set. runc then fails every privileged container ("unable
// to apply caps"), and kind's nodes are privileged. Start then registers a runtime wrapper
// as dockerd's default runtime: it removes CAP_SYS_RESOURCE from the OCI spec of each
// container (runc create/run --bundle) and each exec (runc exec --process) and then runs
// the real runc. The wrapper is this same executable, re-run with ISTHMUS_RUNC_REAL set
// (see the package's init), so nothing extra is installed or compiled.
//
// Network safety: Start refuses to start an engine unless the uplink guard
// (internal/uplinkguard) passes its check, because an engine is how container networks
// come to exist.
package engine
