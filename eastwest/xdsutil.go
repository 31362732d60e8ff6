package eastwest

import (
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
)

// clusterName decodes a Cluster resource and returns its name.
func clusterName(b []byte) (string, error) {
	var c cluster.Cluster
	if err := proto.Unmarshal(b, &c); err != nil {
		return "", err
	}
	return c.GetName(), nil
}

// statusProto is the error detail of a NACK.
func statusProto(err error) *status.Status {
	return &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
}
