package proxy

import (
	"net"
	"net/http"
	"strings"
)

// Match finds the virtual host for host (a Host header or :authority, with or without a
// port) and the first route of it that req's path and headers match, Envoy's rules:
// an exact domain first, then the longest "*.suffix" or "prefix*" wildcard, then "*".
// A nil VHost means no virtual host serves host; a nil Route, that none of its routes
// matches.
func (t *RouteTable) Match(host, path string, h http.Header) (*VHost, *Route) {
	if t == nil {
		return nil, nil
	}
	vh := t.vhost(host)
	if vh == nil {
		return nil, nil
	}
	for _, r := range vh.Routes {
		if r.matches(path, h) {
			return vh, r
		}
	}
	return vh, nil
}

func (t *RouteTable) vhost(host string) *VHost {
	host = strings.ToLower(host)
	bare := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		bare = h
	}
	var best *VHost
	bestLen := -1
	for _, vh := range t.VHosts {
		for _, d := range vh.Domains {
			d = strings.ToLower(d)
			switch {
			case d == host || d == bare:
				return vh
			case d == "*":
				if bestLen < 0 {
					best, bestLen = vh, 0
				}
			case strings.HasPrefix(d, "*"):
				if s := d[1:]; len(bare) > len(s) && strings.HasSuffix(bare, s) && len(s) > bestLen {
					best, bestLen = vh, len(s)
				}
			case strings.HasSuffix(d, "*"):
				if p := d[:len(d)-1]; len(host) > len(p) && strings.HasPrefix(host, p) && len(p) > bestLen {
					best, bestLen = vh, len(p)
				}
			}
		}
	}
	return best
}

// pathOnly strips the query and fragment, which Envoy's path matching ignores.
func pathOnly(p string) string {
	if i := strings.IndexAny(p, "?#"); i >= 0 {
		return p[:i]
	}
	return p
}

func (r *Route) matches(path string, h http.Header) bool {
	p := pathOnly(path)
	switch {
	case r.regex != nil:
		if !r.regex.MatchString(p) {
			return false
		}
	case r.Path != "":
		if p != r.Path {
			return false
		}
	default:
		if !strings.HasPrefix(p, r.Prefix) {
			return false
		}
	}
	for _, hm := range r.Headers {
		if hm.matches(h) == hm.Invert {
			return false
		}
	}
	return true
}

func (hm HeaderMatch) matches(h http.Header) bool {
	vals, ok := h[http.CanonicalHeaderKey(hm.Name)]
	if hm.Present || (hm.Exact == "" && hm.Prefix == "" && hm.regex == nil) {
		return ok
	}
	if !ok {
		return false
	}
	v := strings.Join(vals, ",")
	switch {
	case hm.regex != nil:
		return hm.regex.MatchString(v)
	case hm.Prefix != "":
		return strings.HasPrefix(v, hm.Prefix)
	default:
		return v == hm.Exact
	}
}
