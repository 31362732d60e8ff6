package eastwest

import (
	"io"
	"net"
	"sync"
)

// ReadClientHello reads one whole TLS ClientHello from r (at most limit bytes plus a
// record header) without consuming anything past it, and returns the raw bytes read (to
// be replayed to whoever handles the connection) and the server name, "" when the client
// sent none. Errors wrap ErrIncomplete, ErrNotTLS and the other Err* values of this
// package. It is the parser the gateway routes with, for other data planes (isthmus proxy).
func ReadClientHello(r io.Reader, limit int) (raw []byte, sni string, err error) {
	return readClientHello(r, limit)
}

// Splice relays a and b in both directions with the gateway's data path (splice(2) when
// both are TCP sockets, copying otherwise) until both directions end, half-closing as
// the gateway does, then closes both. It returns the bytes moved a→b and b→a.
func Splice(a, b net.Conn) (ab, ba int64) {
	var l link
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ba = relay(a, b, &l)
	}()
	ab = relay(b, a, &l)
	wg.Wait()
	a.Close()
	b.Close()
	return ab, ba
}
