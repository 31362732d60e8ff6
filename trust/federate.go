package trust

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// FederationConfigMap is the ConfigMap (in the control-plane namespace) that lists a
// cluster's federation relationships: the peer trust domains whose bundles its primary
// fetches from their bundle endpoints and writes into the bundle store (BundleConfigMap),
// where workloads pick them up. Key "relationships" holds a JSON array of Relationship.
const FederationConfigMap = "isthmus-trust-federation"

const relationshipsKey = "relationships"

// Relationship is one federation relationship: trust the bundle that trust domain
// TrustDomain publishes on its bundle endpoint.
type Relationship struct {
	// TrustDomain is the peer domain.
	TrustDomain string `json:"trustDomain"`
	// EndpointURL is the peer's SPIFFE bundle endpoint (https).
	EndpointURL string `json:"endpointURL"`
	// Profile is ProfileSPIFFE or ProfileWeb.
	Profile string `json:"profile"`
	// EndpointSPIFFEID is the SPIFFE ID the endpoint must present (https_spiffe only); it
	// must be in TrustDomain.
	EndpointSPIFFEID string `json:"endpointSPIFFEID,omitempty"`
	// BootstrapBundle is the peer's SPIFFE bundle (JWKS) to authenticate the endpoint with
	// until the first fetch succeeds (https_spiffe only; required there).
	BootstrapBundle string `json:"bootstrapBundle,omitempty"`
	// EndpointCA is PEM of the roots that sign the endpoint's Web PKI certificate
	// (https_web only); empty means the system's roots.
	EndpointCA string `json:"endpointCA,omitempty"`
}

// Validate checks the relationship on its own.
func (r Relationship) Validate() error {
	td, err := spiffeid.TrustDomainFromString(r.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust domain %q: %w", r.TrustDomain, err)
	}
	u, err := url.Parse(r.EndpointURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("%s: endpoint URL %q: want https://HOST[:PORT]/PATH", td, r.EndpointURL)
	}
	switch r.Profile {
	case ProfileSPIFFE:
		id, err := spiffeid.FromString(r.EndpointSPIFFEID)
		if err != nil {
			return fmt.Errorf("%s: endpoint SPIFFE ID %q: %w", td, r.EndpointSPIFFEID, err)
		}
		if id.TrustDomain() != td {
			return fmt.Errorf("%s: endpoint SPIFFE ID %s is in trust domain %s; it must be in %s (its bundle authenticates the endpoint)", td, id, id.TrustDomain(), td)
		}
		if r.BootstrapBundle == "" {
			return fmt.Errorf("%s: https_spiffe needs a bootstrap bundle to authenticate the endpoint's first answer", td)
		}
		if _, err := ParsePeerBundle(mesh.TrustDomain(td.Name()), []byte(r.BootstrapBundle)); err != nil {
			return fmt.Errorf("%s: bootstrap bundle: %w", td, err)
		}
		if r.EndpointCA != "" {
			return fmt.Errorf("%s: an endpoint CA is for https_web; https_spiffe authenticates with the bundle", td)
		}
	case ProfileWeb:
		if r.EndpointSPIFFEID != "" || r.BootstrapBundle != "" {
			return fmt.Errorf("%s: endpoint SPIFFE ID and bootstrap bundle are for https_spiffe; https_web authenticates with Web PKI", td)
		}
		if r.EndpointCA != "" {
			if certs, err := parseCerts([]byte(r.EndpointCA)); err != nil || len(certs) == 0 {
				return fmt.Errorf("%s: endpoint CA: no PEM certificate", td)
			}
		}
	default:
		return fmt.Errorf("%s: profile %q: want %s or %s", td, r.Profile, ProfileSPIFFE, ProfileWeb)
	}
	return nil
}

// ParseRelationships reads the ConfigMap's data, refusing anything malformed: unknown
// keys, bad JSON, an invalid relationship, a domain listed twice.
func ParseRelationships(data map[string]string) ([]Relationship, error) {
	for k := range data {
		if k != relationshipsKey {
			return nil, fmt.Errorf("trust: federation: unexpected key %q (want %q)", k, relationshipsKey)
		}
	}
	raw, ok := data[relationshipsKey]
	if !ok || strings.TrimSpace(raw) == "" {
		return nil, nil
	}
	dec := json.NewDecoder(strings.NewReader(raw))
	dec.DisallowUnknownFields()
	var rels []Relationship
	if err := dec.Decode(&rels); err != nil {
		return nil, fmt.Errorf("trust: federation: key %q: %w", relationshipsKey, err)
	}
	seen := map[string]bool{}
	for i, r := range rels {
		if err := r.Validate(); err != nil {
			return nil, fmt.Errorf("trust: federation: relationship %d: %w", i, err)
		}
		if seen[r.TrustDomain] {
			return nil, fmt.Errorf("trust: federation: relationship %d: %s is listed twice", i, r.TrustDomain)
		}
		seen[r.TrustDomain] = true
	}
	return rels, nil
}

// RelationshipsData renders relationships as the ConfigMap's data, sorted by domain.
func RelationshipsData(rels []Relationship) (map[string]string, error) {
	rels = slices.Clone(rels)
	slices.SortFunc(rels, func(a, b Relationship) int { return strings.Compare(a.TrustDomain, b.TrustDomain) })
	raw, err := json.MarshalIndent(rels, "", "  ")
	if err != nil {
		return nil, err
	}
	return map[string]string{relationshipsKey: string(raw)}, nil
}

// FederationStore reads and changes one cluster's federation relationships. Like
// BundleStore, every change is validated as a whole and written at the version it was
// read, so a refused change writes nothing.
type FederationStore struct {
	Client    kubernetes.Interface
	Namespace string
}

// Load returns the relationships (none if the ConfigMap does not exist).
func (s FederationStore) Load(ctx context.Context) ([]Relationship, error) {
	cm, err := s.Client.CoreV1().ConfigMaps(s.Namespace).Get(ctx, FederationConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("trust: federation store %s/%s: %w", s.Namespace, FederationConfigMap, err)
	}
	return ParseRelationships(cm.Data)
}

// Update applies change to the stored relationships and writes the result, retrying when
// another writer got there first.
func (s FederationStore) Update(ctx context.Context, change func([]Relationship) ([]Relationship, error)) ([]Relationship, error) {
	var written []Relationship
	err := updateConfigMap(ctx, s.Client, s.Namespace, FederationConfigMap, "federation store", func(old map[string]string) (map[string]string, error) {
		rels, err := ParseRelationships(old)
		if err != nil {
			return nil, fmt.Errorf("%w (fix or delete the ConfigMap)", err)
		}
		next, err := change(rels)
		if err != nil {
			return nil, err
		}
		data, err := RelationshipsData(next)
		if err != nil {
			return nil, err
		}
		if _, err := ParseRelationships(data); err != nil {
			return nil, fmt.Errorf("trust: the change would leave the federation store invalid: %w", err)
		}
		written = next
		return data, nil
	})
	if err != nil {
		return nil, err
	}
	return written, nil
}

// AddRelationship returns rels with r added, or replacing the relationship of its domain.
// local is the cluster's own trust domain, which cannot federate with itself.
func AddRelationship(rels []Relationship, r Relationship, local mesh.TrustDomain) ([]Relationship, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("trust: federation: %w", err)
	}
	if local != "" && r.TrustDomain == string(local) {
		return nil, fmt.Errorf("trust: federation: %s is this cluster's own trust domain", local)
	}
	out := slices.DeleteFunc(slices.Clone(rels), func(o Relationship) bool { return o.TrustDomain == r.TrustDomain })
	return append(out, r), nil
}

// RemoveRelationship returns rels without td's relationship; it is an error if there is
// none.
func RemoveRelationship(rels []Relationship, td mesh.TrustDomain) ([]Relationship, error) {
	out := slices.DeleteFunc(slices.Clone(rels), func(o Relationship) bool { return o.TrustDomain == string(td) })
	if len(out) == len(rels) {
		return nil, fmt.Errorf("trust: federation: no relationship with %s (see `isthmus trust federate list`)", td)
	}
	return out, nil
}

// WatchRelationships calls onChange with the relationships every time the ConfigMap
// changes, until ctx ends. A malformed ConfigMap is reported through onError and the
// relationships in force stay.
func WatchRelationships(ctx context.Context, client kubernetes.Interface, namespace string, onChange func([]Relationship), onError func(error)) error {
	apply := func(obj any) {
		data := map[string]string{}
		if cm, ok := obj.(*corev1.ConfigMap); ok {
			if cm.Name != FederationConfigMap {
				return // a lister that ignores the field selector (fake clientsets)
			}
			data = cm.Data
		}
		rels, err := ParseRelationships(data)
		if err != nil {
			if onError != nil {
				onError(err)
			}
			return
		}
		onChange(rels)
	}
	lw := namedConfigMap(client, namespace, FederationConfigMap)
	_, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw, ObjectType: &corev1.ConfigMap{}, ResyncPeriod: 10 * time.Minute,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    apply,
			UpdateFunc: func(_, obj any) { apply(obj) },
			DeleteFunc: func(any) { apply(nil) },
		},
	})
	ctrl.RunWithContext(ctx)
	return nil
}

// ParsePeerBundle parses a peer domain's SPIFFE bundle as a federation accepts it: valid
// JSON of the SPIFFE bundle format with at least one X.509 authority, every authority a
// CA certificate, and none that names (by a SPIFFE URI SAN) a trust domain other than td.
// Errors wrap ErrMalformedBundle or ErrWrongTrustDomain.
func ParsePeerBundle(td mesh.TrustDomain, data []byte) (*spiffebundle.Bundle, error) {
	std, err := spiffeid.TrustDomainFromString(string(td))
	if err != nil {
		return nil, err
	}
	b, err := spiffebundle.Parse(std, data)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformedBundle, err)
	}
	if len(b.X509Authorities()) == 0 {
		return nil, fmt.Errorf("%w: no X.509 authorities", ErrMalformedBundle)
	}
	for _, c := range b.X509Authorities() {
		if !c.IsCA {
			return nil, fmt.Errorf("%w: authority %q is not a CA certificate", ErrMalformedBundle, c.Subject)
		}
		for _, u := range c.URIs {
			id, err := spiffeid.FromURI(u)
			if err != nil {
				continue
			}
			if id.TrustDomain() != std {
				return nil, fmt.Errorf("%w: authority %q is for %s, not %s", ErrWrongTrustDomain, c.Subject, id.TrustDomain(), td)
			}
		}
	}
	return b, nil
}

// Sentinel errors of a refused peer bundle; PeerStatus.Reason names them for metrics.
var (
	ErrMalformedBundle  = errors.New("malformed bundle")
	ErrWrongTrustDomain = errors.New("bundle for the wrong trust domain")
	ErrLowerSequence    = errors.New("bundle sequence went down")
)

// namedConfigMap lists and watches one ConfigMap through the typed client (which fake
// clientsets implement too).
func namedConfigMap(client kubernetes.Interface, namespace, name string) cache.ListerWatcher {
	sel := fields.OneTermEqualSelector("metadata.name", name).String()
	cms := client.CoreV1().ConfigMaps(namespace)
	return cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel
			return cms.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel
			return cms.Watch(ctx, o)
		},
	}, client)
}
