package mesh

import (
	"errors"
	"fmt"
	"strings"
)

// ErrEmpty is wrapped by every parser in this package when its input is empty.
var ErrEmpty = errors.New("empty")

// ParseError says which kind of value failed to parse, the input, and why.
type ParseError struct {
	Kind  string // e.g. "cluster ID"
	Input string
	Err   error
}

// Error implements error.
func (e *ParseError) Error() string {
	in := e.Input
	if len(in) > 80 {
		in = in[:77] + "..."
	}
	return fmt.Sprintf("mesh: invalid %s %q: %v", e.Kind, in, e.Err)
}

// Unwrap returns the underlying reason.
func (e *ParseError) Unwrap() error { return e.Err }

func parseErr(kind, in string, format string, args ...any) error {
	return &ParseError{Kind: kind, Input: in, Err: fmt.Errorf(format, args...)}
}

// checkLabelValue validates s as a Kubernetes label value (at most 63 characters of
// [A-Za-z0-9-_.], beginning and ending with an alphanumeric), which is how network and
// mesh IDs travel (topology.istio.io/network, the mesh ID label).
func checkLabelValue(kind, s string) error {
	if s == "" {
		return &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	if len(s) > 63 {
		return parseErr(kind, s, "longer than 63 characters (%d)", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isAlnum(c) {
			continue
		}
		if c == '-' || c == '_' || c == '.' {
			if i == 0 || i == len(s)-1 {
				return parseErr(kind, s, "must begin and end with a letter or digit")
			}
			continue
		}
		return parseErr(kind, s, "character %q at %d is not allowed (letters, digits, '-', '_', '.')", c, i)
	}
	return nil
}

// checkDNSLabel validates s as an RFC 1123 label: at most 63 lowercase letters, digits
// and '-', beginning and ending with a letter or digit. Namespaces are DNS labels.
func checkDNSLabel(kind, s string) error {
	if s == "" {
		return &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	if len(s) > 63 {
		return parseErr(kind, s, "longer than 63 characters (%d)", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case isLowerAlnum(c):
		case c == '-' && i != 0 && i != len(s)-1:
		case c == '-':
			return parseErr(kind, s, "must begin and end with a lowercase letter or digit")
		default:
			return parseErr(kind, s, "character %q at %d is not allowed (lowercase letters, digits, '-')", c, i)
		}
	}
	return nil
}

// checkDNSSubdomain validates s as an RFC 1123 subdomain: at most 253 characters of
// dot-separated DNS labels. Service account names and hostnames are subdomains.
func checkDNSSubdomain(kind, s string) error {
	if s == "" {
		return &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	if len(s) > 253 {
		return parseErr(kind, s, "longer than 253 characters (%d)", len(s))
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" {
			return parseErr(kind, s, "empty label (leading, trailing or double dot)")
		}
		if err := checkDNSLabel(kind, label); err != nil {
			var pe *ParseError
			if errors.As(err, &pe) {
				return parseErr(kind, s, "label %q: %v", label, pe.Err)
			}
			return err
		}
	}
	return nil
}

func isAlnum(c byte) bool {
	return isLowerAlnum(c) || ('A' <= c && c <= 'Z')
}

func isLowerAlnum(c byte) bool {
	return ('a' <= c && c <= 'z') || ('0' <= c && c <= '9')
}
