package primary

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	apinet "istio.io/api/networking/v1"
)

// defaultRetryOn is what Istio retries on when retries.retryOn is unset.
const defaultRetryOn = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"

// Retry conditions: Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on values. grpc-go
// acts only on the gRPC ones (the gRPC status names).
var (
	envoyRetryOn = []string{"5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
		"retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure"}
	grpcRetryOn = []string{"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
)

// timeoutAndRetries sets an HTTPRoute's timeout and retries on ra. One RouteAction
// serves both clients, so the timeout is written twice: as Envoy's route timeout and as
// max_stream_duration, the field grpc-go reads (for unary calls both mean "fail the call
// after d"). A timeout of 0 disables Envoy's default 15 s one, as in Istio. Retries with
// attempts 0 are disabled, as in Istio; grpc-go honours only the gRPC status conditions
// of retryOn and ignores perTryTimeout, which the warnings say.
func timeoutAndRetries(field string, hr *apinet.HTTPRoute, ra *route.RouteAction) ([]string, *configError) {
	var warn []string
	if t := hr.GetTimeout(); t != nil {
		if err := t.CheckValid(); err != nil || t.AsDuration() < 0 {
			return nil, rejectConfig(ReasonInvalid, "%s.timeout %v: not a non-negative duration", field, t.AsDuration())
		}
		d := t.AsDuration()
		ra.Timeout = durationpb.New(d)
		if d > 0 {
			ra.MaxStreamDuration = &route.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(d)}
		}
	}
	r := hr.GetRetries()
	if r == nil {
		return nil, nil
	}
	rf := field + ".retries"
	if r.GetAttempts() < 0 {
		return nil, rejectConfig(ReasonInvalid, "%s.attempts %d is negative", rf, r.GetAttempts())
	}
	if r.GetAttempts() == 0 {
		return nil, nil // Istio: retries disabled
	}
	rp := &route.RetryPolicy{NumRetries: wrapperspb.UInt32(uint32(r.GetAttempts()))}
	var conds []string
	var codes []uint32
	grpcCond := false
	for _, c := range strings.Split(cmp.Or(r.GetRetryOn(), defaultRetryOn), ",") {
		c = strings.TrimSpace(c)
		switch {
		case c == "":
			continue
		case slices.Contains(grpcRetryOn, c):
			grpcCond = true
		case slices.Contains(envoyRetryOn, c):
		default:
			// Istio accepts HTTP status codes in retryOn and retries on them.
			n, err := strconv.Atoi(c)
			if err != nil || n < 100 || n > 599 {
				return nil, rejectConfig(ReasonInvalid, "%s.retryOn %q: unknown condition (want Envoy's retry-on or gRPC status names, or an HTTP status)", rf, c)
			}
			codes = append(codes, uint32(n))
			c = "retriable-status-codes"
		}
		if !slices.Contains(conds, c) {
			conds = append(conds, c)
		}
	}
	rp.RetryOn = strings.Join(conds, ",")
	rp.RetriableStatusCodes = codes
	if !grpcCond {
		warn = append(warn, fmt.Sprintf("%s.retryOn %q names no gRPC status: proxyless gRPC clients will not retry", rf, rp.RetryOn))
	}
	if t := r.GetPerTryTimeout(); t != nil && t.AsDuration() > 0 {
		rp.PerTryTimeout = durationpb.New(t.AsDuration())
		warn = append(warn, rf+".perTryTimeout applies to Envoy only (grpc-go has no per-try timeout)")
	}
	if b := r.GetBackoff(); b != nil && b.AsDuration() > 0 {
		rp.RetryBackOff = &route.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(b.AsDuration())}
	}
	if r.GetRetryRemoteLocalities() != nil || r.GetRetryIgnorePreviousHosts() != nil {
		warn = append(warn, rf+": retryRemoteLocalities and retryIgnorePreviousHosts are not supported yet and are ignored")
	}
	ra.RetryPolicy = rp
	return warn, nil
}
