package eastwest_test

import (
	"os"
	"os/exec"
	"testing"
)

// TestMain makes sure GRPC_EXPERIMENTAL_XDS_SNI=true is in force: grpc-go reads it once at
// start-up, and without it a proxyless client does not send the SNI an east-west gateway
// routes on. The test binary re-executes itself with the variable set.
func TestMain(m *testing.M) {
	if os.Getenv("GRPC_EXPERIMENTAL_XDS_SNI") != "true" {
		cmd := exec.Command(os.Args[0], os.Args[1:]...)
		cmd.Env = append(os.Environ(), "GRPC_EXPERIMENTAL_XDS_SNI=true")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				os.Exit(ee.ExitCode())
			}
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
