package kubelocal

// SetPortPicker replaces the free-port picker of cfg (tests only).
func SetPortPicker(cfg *Config, pick func(host string) (int, error)) { cfg.pickPort = pick }

// FreePort is freePort, for tests.
var FreePort = freePort
