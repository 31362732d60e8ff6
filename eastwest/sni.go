package eastwest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Errors of ClientHello parsing; each is counted under its own reason. The route the
// server name designates is parsed afterwards, by mesh.ParseSNI.
var (
	ErrNotTLS     = errors.New("eastwest: not a TLS handshake")
	ErrMalformed  = errors.New("eastwest: malformed ClientHello")
	ErrNoSNI      = errors.New("eastwest: ClientHello has no server name")
	ErrTooLarge   = errors.New("eastwest: ClientHello larger than the limit")
	ErrIncomplete = errors.New("eastwest: ClientHello incomplete")
)

// Wire constants of TLS (RFC 8446 §5.1, §4) and of the server_name extension (RFC 6066
// §3). Record versions are checked for major version 3 only: every TLS version, 1.0 to
// 1.3, sends a ClientHello in a record that says 3.x.
const (
	recordHeaderLen    = 5            // type, legacy version (2), length (2)
	maxRecordLen       = 16384 + 2048 // TLSCiphertext limit
	handshakeHeaderLen = 4            // type, length (3)
	typeHandshake      = 22
	typeClientHello    = 1
	extServerName      = 0
)

// readClientHello reads TLS records from r until it holds one whole ClientHello handshake
// message (which may span records), without consuming anything past it. It returns the raw
// bytes read (to be replayed to the backend) and the server name. It never reads more
// than limit bytes plus one record header: the length fields are checked before each
// body is read, so a client cannot make the gateway buffer what it announces. On error,
// raw is what was read so far and the error wraps one of the Err* values above.
func readClientHello(r io.Reader, limit int) (raw []byte, sni string, err error) {
	var msg []byte // the handshake message, reassembled from record fragments
	for {
		hdr := make([]byte, recordHeaderLen)
		if _, err := io.ReadFull(r, hdr); err != nil {
			if len(raw) == 0 && errors.Is(err, io.EOF) {
				return raw, "", fmt.Errorf("%w: connection closed before a ClientHello", ErrIncomplete)
			}
			return raw, "", fmt.Errorf("%w: %w", ErrIncomplete, err)
		}
		raw = append(raw, hdr...)
		if hdr[0] != typeHandshake || hdr[1] != 3 {
			return raw, "", fmt.Errorf("%w: record type %d version %d.%d", ErrNotTLS, hdr[0], hdr[1], hdr[2])
		}
		n := int(binary.BigEndian.Uint16(hdr[3:]))
		if n == 0 || n > maxRecordLen {
			return raw, "", fmt.Errorf("%w: record length %d", ErrMalformed, n)
		}
		if len(raw)+n > limit {
			return raw, "", fmt.Errorf("%w (%d bytes)", ErrTooLarge, limit)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return append(raw, body...), "", fmt.Errorf("%w: %w", ErrIncomplete, err)
		}
		raw = append(raw, body...)
		msg = append(msg, body...)
		if len(msg) < handshakeHeaderLen {
			continue
		}
		if msg[0] != typeClientHello {
			return raw, "", fmt.Errorf("%w: first handshake message is type %d", ErrNotTLS, msg[0])
		}
		want := handshakeHeaderLen + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
		if want > limit {
			return raw, "", fmt.Errorf("%w (%d bytes)", ErrTooLarge, limit)
		}
		if len(msg) < want {
			continue
		}
		sni, err := parseClientHello(msg[handshakeHeaderLen:want])
		return raw, sni, err
	}
}

// cursor reads length-prefixed fields from a byte slice; every read is bounds-checked.
// The first out-of-bounds read sets bad and every later read is a no-op returning zero,
// so a parser reads a whole structure and checks bad once, instead of after every field.
type cursor struct {
	b   []byte
	bad bool
}

// skip drops n bytes.
func (c *cursor) skip(n int) {
	if c.bad || n < 0 || n > len(c.b) {
		c.bad = true
		return
	}
	c.b = c.b[n:]
}

// u8 reads a one-byte length or value.
func (c *cursor) u8() int {
	if c.bad || len(c.b) < 1 {
		c.bad = true
		return 0
	}
	v := int(c.b[0])
	c.b = c.b[1:]
	return v
}

// u16 reads a big-endian two-byte length or value.
func (c *cursor) u16() int {
	if c.bad || len(c.b) < 2 {
		c.bad = true
		return 0
	}
	v := int(binary.BigEndian.Uint16(c.b))
	c.b = c.b[2:]
	return v
}

// bytes returns the next n bytes, aliasing the input (no copy).
func (c *cursor) bytes(n int) []byte {
	if c.bad || n < 0 || n > len(c.b) {
		c.bad = true
		return nil
	}
	v := c.b[:n]
	c.b = c.b[n:]
	return v
}

// parseClientHello returns the host_name of the server_name extension of a ClientHello
// body (after the handshake header). The first host_name entry wins (RFC 6066 allows one
// per name type); a server_name extension without one, or an empty one, is malformed.
// The name is returned as sent: mesh.ParseSNI decides whether it is a route.
func parseClientHello(body []byte) (string, error) {
	c := &cursor{b: body}
	c.skip(2)       // legacy_version
	c.skip(32)      // random
	c.skip(c.u8())  // legacy_session_id
	c.skip(c.u16()) // cipher_suites
	c.skip(c.u8())  // legacy_compression_methods
	if c.bad {
		return "", fmt.Errorf("%w: truncated before extensions", ErrMalformed)
	}
	if len(c.b) == 0 {
		return "", ErrNoSNI // no extensions at all
	}
	exts := &cursor{b: c.bytes(c.u16())}
	if c.bad {
		return "", fmt.Errorf("%w: extensions length", ErrMalformed)
	}
	for len(exts.b) > 0 {
		typ := exts.u16()
		data := exts.bytes(exts.u16())
		if exts.bad {
			return "", fmt.Errorf("%w: extension header", ErrMalformed)
		}
		if typ != extServerName {
			continue
		}
		list := &cursor{b: data}
		names := &cursor{b: list.bytes(list.u16())}
		for len(names.b) > 0 && !names.bad {
			nameType := names.u8()
			name := names.bytes(names.u16())
			if names.bad {
				break
			}
			if nameType == 0 { // host_name
				if len(name) == 0 {
					return "", fmt.Errorf("%w: empty host_name", ErrMalformed)
				}
				return string(name), nil
			}
		}
		return "", fmt.Errorf("%w: server_name extension", ErrMalformed)
	}
	return "", ErrNoSNI
}
