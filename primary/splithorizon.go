package primary

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// lbEndpoint is one address a proxy may send to, after split horizon.
type lbEndpoint struct {
	Addr     netip.AddrPort
	Weight   uint32
	Health   mesh.Health
	Locality mesh.Locality
	Network  mesh.NetworkID // the endpoint's network ("" when it has none)
	Gateway  bool           // the address is another network's gateway
}

// splitHorizon returns the addresses a proxy on network sees for one service port.
//
// Endpoints on the proxy's network, or with no network, are kept as they are. Endpoints of
// another network are replaced by that network's gateways: per (network, locality), each
// gateway gets the replaced endpoints' summed weight divided evenly (rounded up, so never
// zero). Other-network endpoints that cannot do mTLS, or whose network has no gateway, are
// dropped: a passthrough gateway cannot reach them. localOnly (for gateways themselves)
// drops every other network.
func splitHorizon(eps []mesh.Endpoint, portName string, network mesh.NetworkID, gateways map[mesh.NetworkID][]Gateway, localOnly bool) []lbEndpoint {
	type group struct {
		network  mesh.NetworkID
		locality mesh.Locality
	}
	var out []lbEndpoint
	remote := map[group]uint32{}
	remoteHealthy := map[group]bool{}
	for i := range eps {
		e := &eps[i]
		ap, ok := e.AddrPort(portName)
		if !ok {
			continue
		}
		if e.Network == "" || e.Network == network {
			out = append(out, lbEndpoint{Addr: ap, Weight: e.EffectiveWeight(), Health: e.Health, Locality: e.Locality, Network: e.Network})
			continue
		}
		if localOnly || !e.MTLSReady || len(gateways[e.Network]) == 0 {
			continue
		}
		g := group{e.Network, e.Locality}
		remote[g] += e.EffectiveWeight()
		if e.Health == mesh.HealthHealthy {
			remoteHealthy[g] = true
		}
	}
	groups := make([]group, 0, len(remote))
	for g := range remote {
		groups = append(groups, g)
	}
	slices.SortFunc(groups, func(a, b group) int {
		return cmp.Or(cmp.Compare(a.network, b.network), cmp.Compare(a.locality.String(), b.locality.String()))
	})
	for _, g := range groups {
		gws := gateways[g.network]
		n := uint32(len(gws))
		w := (remote[g] + n - 1) / n
		health := mesh.HealthUnhealthy
		if remoteHealthy[g] {
			health = mesh.HealthHealthy // the gateway is usable while any endpoint behind it is
		}
		for _, gw := range gws {
			out = append(out, lbEndpoint{
				Addr: netip.AddrPortFrom(gw.Address, gw.Port), Weight: w, Health: health, Locality: g.locality, Network: g.network, Gateway: true,
			})
		}
	}
	return out
}
