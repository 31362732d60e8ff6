package mesh

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// OutboundName names one service port (and subset) the way Istio's wire formats do: as the
// server name a client sends across networks, outbound_.<port>_.<subset>_.<hostname>, and
// as the xDS cluster name, outbound|<port>|<subset>|<hostname>. Both spellings carry the
// same three fields, so a gateway that reads the first can look up the second.
//
// The zero value is not a valid name: Port must be 1–65535 and Host a valid hostname.
// Subset is empty for the whole service (Istio then writes "_." and "||" around it).
type OutboundName struct {
	Port   uint16
	Subset string // a DNS label (Istio's DestinationRule subset names are), or empty
	Host   Hostname
}

// Istio's fixed parts of the two spellings.
const (
	sniPrefix     = "outbound_."
	sniSep        = "_."
	clusterPrefix = "outbound|"
	clusterSep    = "|"
)

// SNI returns the cross-network server name, e.g.
// "outbound_.8080_._.echo.demo.svc.cluster.local"; ParseSNI reverses it.
func (n OutboundName) SNI() string {
	return sniPrefix + strconv.Itoa(int(n.Port)) + sniSep + n.Subset + sniSep + string(n.Host)
}

// ClusterName returns the xDS cluster name, e.g. "outbound|8080||echo.demo.svc.cluster.local";
// ParseClusterName reverses it.
func (n OutboundName) ClusterName() string {
	return clusterPrefix + strconv.Itoa(int(n.Port)) + clusterSep + n.Subset + clusterSep + string(n.Host)
}

// ParseSNI parses Istio's cross-network server name outbound_.<port>_.<subset>_.<hostname>.
// The port is a decimal number 1–65535 without leading zeros, the subset empty or a DNS
// label, the hostname as ParseHostname accepts it. Errors are *ParseError naming the part
// that is wrong.
func ParseSNI(s string) (OutboundName, error) {
	const kind = "cross-network SNI"
	if s == "" {
		return OutboundName{}, &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	rest, ok := strings.CutPrefix(s, sniPrefix)
	if !ok {
		return OutboundName{}, parseErr(kind, s, "want outbound_.<port>_.<subset>_.<hostname>")
	}
	portStr, rest, ok := strings.Cut(rest, sniSep)
	if !ok {
		return OutboundName{}, parseErr(kind, s, `no "_." after the port`)
	}
	// The subset is a DNS label, which cannot hold "_", so the first "_." ends it.
	subset, host, ok := strings.Cut(rest, sniSep)
	if !ok {
		return OutboundName{}, parseErr(kind, s, `no "_." after the subset`)
	}
	return outboundName(kind, s, portStr, subset, host)
}

// ParseClusterName parses an xDS cluster name outbound|<port>|<subset>|<hostname>, with the
// same rules for each part as ParseSNI. Inbound and other cluster names are refused.
func ParseClusterName(s string) (OutboundName, error) {
	const kind = "outbound cluster name"
	if s == "" {
		return OutboundName{}, &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	parts := strings.Split(s, clusterSep)
	if len(parts) != 4 {
		return OutboundName{}, parseErr(kind, s, "want 4 '|'-separated parts (outbound|<port>|<subset>|<hostname>), have %d", len(parts))
	}
	if parts[0] != "outbound" {
		return OutboundName{}, parseErr(kind, s, "direction %q is not outbound", parts[0])
	}
	return outboundName(kind, s, parts[1], parts[2], parts[3])
}

// outboundName validates the three parts both spellings share; kind and in are for the
// error, so that it quotes what the caller passed, not a part of it.
func outboundName(kind, in, port, subset, host string) (OutboundName, error) {
	p, err := parsePort(port)
	if err != nil {
		return OutboundName{}, parseErr(kind, in, "port %q: %v", port, err)
	}
	if subset != "" {
		if err := checkDNSLabel("subset", subset); err != nil {
			return OutboundName{}, parseErr(kind, in, "subset %q: %v", subset, reason(err))
		}
	}
	h, err := ParseHostname(host)
	if err != nil {
		return OutboundName{}, parseErr(kind, in, "hostname %q: %v", host, reason(err))
	}
	return OutboundName{Port: p, Subset: subset, Host: h}, nil
}

// parsePort accepts the canonical decimal form of 1–65535 only, so that a name that
// parses prints back the same and two spellings of one port never make two routes.
func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, ErrEmpty
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("character %q at %d is not a digit", s[i], i)
		}
	}
	if s[0] == '0' {
		return 0, fmt.Errorf("zero or a leading zero")
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("larger than 65535")
	}
	return uint16(n), nil
}

// reason returns the why of a *ParseError (its Err), so that an error about a part does
// not repeat the part's own "mesh: invalid ..." prefix; other errors come back whole.
func reason(err error) error {
	var pe *ParseError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
