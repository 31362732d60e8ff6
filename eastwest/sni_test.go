package eastwest

import (
	"bytes"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// clientHello captures the ClientHello crypto/tls sends for serverName.
func clientHello(t testing.TB, serverName string) []byte {
	t.Helper()
	a, b := net.Pipe()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(time.Second))
		c.Handshake()
		a.Close()
	}()
	b.SetDeadline(time.Now().Add(2 * time.Second))
	raw, _, _ := readClientHello(b, 64*1024)
	b.Close()
	if len(raw) == 0 {
		t.Fatal("no ClientHello captured")
	}
	return raw
}

func TestReadClientHello(t *testing.T) {
	const name = "outbound_.8080_._.echo.demo.svc.cluster.local"
	hello := clientHello(t, name)
	withoutSNI := clientHello(t, "")
	// The same hello split over two records, as a client may send it.
	body := hello[5:]
	split := append([]byte{22, 3, 1, 0, 10}, body[:10]...)
	split = append(split, 22, 3, 1, byte((len(body)-10)>>8), byte(len(body)-10))
	split = append(split, body[10:]...)
	tests := []struct {
		name    string
		in      []byte
		limit   int
		want    string
		wantErr error
	}{
		{"crypto/tls hello", hello, 16384, name, nil},
		{"hello split over records", split, 16384, name, nil},
		{"no SNI", withoutSNI, 16384, "", ErrNoSNI},
		{"HTTP request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 16384, "", ErrNotTLS},
		{"truncated record", hello[:len(hello)-7], 16384, "", ErrIncomplete},
		{"header only", hello[:3], 16384, "", ErrIncomplete},
		{"empty", nil, 16384, "", ErrIncomplete},
		{"over the limit", hello, 100, "", ErrTooLarge},
		{"zero-length record", []byte{22, 3, 1, 0, 0}, 16384, "", ErrMalformed},
		{"not a ClientHello", []byte{22, 3, 1, 0, 4, 2, 0, 0, 0}, 16384, "", ErrNotTLS},
		{"hello body cut short", []byte{22, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0}, 16384, "", ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw, sni, err := readClientHello(bytes.NewReader(tt.in), tt.limit)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || sni != tt.want {
				t.Fatalf("sni %q err %v", sni, err)
			}
			if !bytes.Equal(raw, tt.in) {
				t.Fatal("the bytes read are not exactly the hello (they are replayed to the backend)")
			}
		})
	}
}

// FuzzReadClientHello: arbitrary bytes never panic the parser, never make it read past
// the limit, and a successful parse returns exactly the bytes it consumed.
func FuzzReadClientHello(f *testing.F) {
	f.Add(clientHello(f, "outbound_.8080_._.echo.demo.svc.cluster.local"))
	f.Add(clientHello(f, ""))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Add([]byte("GET /"))
	f.Fuzz(func(t *testing.T, data []byte) {
		raw, sni, err := readClientHello(bytes.NewReader(data), 4096)
		if len(raw) > 4096+recordHeaderLen+maxRecordLen {
			t.Fatalf("read %d bytes with a 4096 limit", len(raw))
		}
		if err == nil {
			if !bytes.HasPrefix(data, raw) || sni == "" {
				t.Fatalf("raw is not a prefix of the input, or empty SNI %q", sni)
			}
			if _, err := mesh.ParseSNI(sni); err == nil && !strings.HasPrefix(sni, "outbound_.") {
				t.Fatalf("ParseSNI accepted %q", sni)
			}
		}
	})
}
