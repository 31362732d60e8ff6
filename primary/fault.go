package primary

import (
	"math"
	"strings"

	faultcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	apinet "istio.io/api/networking/v1"
)

// FaultFilterName is the HTTP fault filter's name, which routes key their fault
// configuration by (grpc-go implements it, gRFC A33).
const FaultFilterName = "envoy.filters.http.fault"

// faultFilter is the fault filter every connection manager carries before the router:
// empty, it does nothing; routes with a VirtualService fault override it per route.
func faultFilter() (*hcm.HttpFilter, error) {
	a, err := anypb.New(&faultv3.HTTPFault{})
	if err != nil {
		return nil, err
	}
	return &hcm.HttpFilter{Name: FaultFilterName, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: a}}, nil
}

// routeFault translates an HTTPRoute's fault into the per-route fault configuration:
// delay (fixedDelay) and abort (httpStatus or grpcStatus), each with its percentage
// (Istio's percentage, or the deprecated integer percent; 100 when both are unset).
func routeFault(field string, f *apinet.HTTPFaultInjection) (map[string]*anypb.Any, *configError) {
	if f == nil {
		return nil, nil
	}
	hf := &faultv3.HTTPFault{}
	if d := f.GetDelay(); d != nil {
		fixed := d.GetFixedDelay()
		if fixed == nil || fixed.CheckValid() != nil || fixed.AsDuration() <= 0 {
			return nil, rejectConfig(ReasonUnsupported, "%s.fault.delay: only a positive fixedDelay is supported", field)
		}
		pct, err := faultPercent(field+".fault.delay", d.GetPercentage(), d.GetPercent())
		if err != nil {
			return nil, err
		}
		hf.Delay = &faultcommon.FaultDelay{
			FaultDelaySecifier: &faultcommon.FaultDelay_FixedDelay{FixedDelay: durationpb.New(fixed.AsDuration())},
			Percentage:         pct,
		}
	}
	if a := f.GetAbort(); a != nil {
		pct, err := faultPercent(field+".fault.abort", a.GetPercentage(), 0)
		if err != nil {
			return nil, err
		}
		hf.Abort = &faultv3.FaultAbort{Percentage: pct}
		switch x := a.GetErrorType().(type) {
		case *apinet.HTTPFaultInjection_Abort_HttpStatus:
			if x.HttpStatus < 200 || x.HttpStatus > 599 {
				return nil, rejectConfig(ReasonInvalid, "%s.fault.abort.httpStatus %d: want 200-599", field, x.HttpStatus)
			}
			hf.Abort.ErrorType = &faultv3.FaultAbort_HttpStatus{HttpStatus: uint32(x.HttpStatus)}
		case *apinet.HTTPFaultInjection_Abort_GrpcStatus:
			code, ok := grpcCode(x.GrpcStatus)
			if !ok {
				return nil, rejectConfig(ReasonInvalid, "%s.fault.abort.grpcStatus %q: not a gRPC status name (e.g. UNAVAILABLE)", field, x.GrpcStatus)
			}
			hf.Abort.ErrorType = &faultv3.FaultAbort_GrpcStatus{GrpcStatus: uint32(code)}
		default:
			return nil, rejectConfig(ReasonUnsupported, "%s.fault.abort: httpStatus or grpcStatus is required (http2Error is not supported)", field)
		}
	}
	if hf.Delay == nil && hf.Abort == nil {
		return nil, nil
	}
	a, err := anypb.New(hf)
	if err != nil {
		return nil, rejectConfig(ReasonInvalid, "%s.fault: %v", field, err)
	}
	return map[string]*anypb.Any{FaultFilterName: a}, nil
}

// faultPercent converts Istio's percentage (0-100, fractional) to a fraction per million.
func faultPercent(field string, p *apinet.Percent, legacy int32) (*typev3.FractionalPercent, *configError) {
	v := 100.0
	switch {
	case p != nil:
		v = p.GetValue()
	case legacy != 0:
		v = float64(legacy)
	}
	if math.IsNaN(v) || v < 0 || v > 100 {
		return nil, rejectConfig(ReasonInvalid, "%s.percentage %v: want 0-100", field, v)
	}
	return &typev3.FractionalPercent{Numerator: uint32(math.Round(v * 10000)), Denominator: typev3.FractionalPercent_MILLION}, nil
}

// grpcCode parses a gRPC status name as Istio writes it (UNAVAILABLE, DEADLINE_EXCEEDED).
func grpcCode(name string) (codes.Code, bool) {
	var c codes.Code
	if err := c.UnmarshalJSON([]byte(`"` + strings.ToUpper(name) + `"`)); err != nil || c == codes.OK {
		return 0, false
	}
	return c, true
}
