package federation

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// The admin API drives an Endpoint from `isthmus mesh peering`: it is served on a Unix
// socket only (cmd/isthmus), so the file system's permissions decide who may create
// tokens or delete peerings; it is never on a network port.
//
//	POST   /v1/tokens           {"peer": NAME}              → {"token": TOKEN}
//	POST   /v1/peerings         {"token": T, "name": NAME}  → Peering
//	GET    /v1/peerings                                      → PeeringList
//	GET    /v1/peerings/{name}                               → Peering
//	DELETE /v1/peerings/{name}                               → Peering (terminated)

// PeeringList is the answer of GET /v1/peerings (and `isthmus mesh peering list -o json`).
type PeeringList struct {
	Mesh         string    `json:"mesh"`
	TrustDomain  string    `json:"trustDomain"`
	FederationID string    `json:"federationID,omitempty"`
	Members      []Member  `json:"members"`
	Peerings     []Peering `json:"peerings"`
	// Problems say why exports or imports are not served (never silence).
	Problems []string `json:"problems,omitempty"`
}

type tokenRequest struct {
	Peer string `json:"peer"`
}

type tokenResponse struct {
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expiresAt"`
}

type establishCall struct {
	Token string `json:"token"`
	Name  string `json:"name,omitempty"`
}

type adminError struct {
	Error string `json:"error"`
}

// AdminHandler serves the admin API of e.
func AdminHandler(e *Endpoint) http.Handler {
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(v)
	}
	fail := func(w http.ResponseWriter, code int, err error) { reply(w, code, adminError{Error: err.Error()}) }
	decode := func(r *http.Request, v any) error {
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return fmt.Errorf("federation: admin request: %w", err)
		}
		return nil
	}
	mux.HandleFunc("POST /v1/tokens", func(w http.ResponseWriter, r *http.Request) {
		var req tokenRequest
		if err := decode(r, &req); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		tok, err := e.CreateToken(req.Peer)
		if err != nil {
			fail(w, http.StatusConflict, err)
			return
		}
		p, _ := e.Peering(req.Peer)
		reply(w, http.StatusOK, tokenResponse{Token: tok, ExpiresAt: p.ExpiresAt})
	})
	mux.HandleFunc("POST /v1/peerings", func(w http.ResponseWriter, r *http.Request) {
		var req establishCall
		if err := decode(r, &req); err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		p, err := e.Establish(ctx, req.Token, req.Name)
		if err != nil {
			fail(w, http.StatusBadRequest, err)
			return
		}
		reply(w, http.StatusOK, p)
	})
	mux.HandleFunc("GET /v1/peerings", func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		fid := e.state.FederationID
		e.mu.Unlock()
		l := PeeringList{Mesh: string(e.cfg.Mesh), TrustDomain: string(e.cfg.TrustDomain), FederationID: fid,
			Members: e.Members(), Peerings: e.Peerings()}
		if e.cfg.Problems != nil {
			l.Problems = e.cfg.Problems()
		}
		reply(w, http.StatusOK, l)
	})
	mux.HandleFunc("GET /v1/peerings/{name}", func(w http.ResponseWriter, r *http.Request) {
		p, ok := e.Peering(r.PathValue("name"))
		if !ok {
			fail(w, http.StatusNotFound, fmt.Errorf("federation: no peering %q", r.PathValue("name")))
			return
		}
		reply(w, http.StatusOK, p)
	})
	mux.HandleFunc("DELETE /v1/peerings/{name}", func(w http.ResponseWriter, r *http.Request) {
		if err := e.Delete(r.PathValue("name")); err != nil {
			fail(w, http.StatusNotFound, err)
			return
		}
		p, _ := e.Peering(r.PathValue("name"))
		reply(w, http.StatusOK, p)
	})
	return mux
}

// AdminClient calls the admin API on a Unix socket.
type AdminClient struct {
	// Socket is the path of the admin socket.
	Socket string
}

func (c AdminClient) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", c.Socket)
	}}}
	req, err := http.NewRequestWithContext(ctx, method, "http://federation"+path, rd)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("federation admin socket %s (is `isthmus primary --federation-addr` running?): %w", c.Socket, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var ae adminError
		if json.Unmarshal(b, &ae) == nil && ae.Error != "" {
			return fmt.Errorf("%s", ae.Error)
		}
		return fmt.Errorf("federation admin: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	return json.Unmarshal(b, out)
}

// CreateToken asks for a token for peer; it returns the token and its expiry.
func (c AdminClient) CreateToken(ctx context.Context, peer string) (string, time.Time, error) {
	var r tokenResponse
	err := c.do(ctx, http.MethodPost, "/v1/tokens", tokenRequest{Peer: peer}, &r)
	return r.Token, r.ExpiresAt, err
}

// Establish uses a token; name may be empty.
func (c AdminClient) Establish(ctx context.Context, token, name string) (Peering, error) {
	var p Peering
	err := c.do(ctx, http.MethodPost, "/v1/peerings", establishCall{Token: token, Name: name}, &p)
	return p, err
}

// List returns every peering and the pool's members.
func (c AdminClient) List(ctx context.Context) (PeeringList, error) {
	var l PeeringList
	err := c.do(ctx, http.MethodGet, "/v1/peerings", nil, &l)
	return l, err
}

// Show returns one peering.
func (c AdminClient) Show(ctx context.Context, name string) (Peering, error) {
	var p Peering
	err := c.do(ctx, http.MethodGet, "/v1/peerings/"+url.PathEscape(name), nil, &p)
	return p, err
}

// Delete terminates one peering.
func (c AdminClient) Delete(ctx context.Context, name string) (Peering, error) {
	var p Peering
	err := c.do(ctx, http.MethodDelete, "/v1/peerings/"+url.PathEscape(name), nil, &p)
	return p, err
}
