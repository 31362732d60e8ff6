package main

import (
	"io"
	"strings"
	"testing"
)

// TestDaemonLogger accepts slog's level names and refuses anything else by flag name.
func TestDaemonLogger(t *testing.T) {
	for _, tc := range []struct {
		level string
		ok    bool
	}{{"debug", true}, {"info", true}, {"WARN", true}, {"error", true}, {"loud", false}, {"", false}} {
		_, err := daemonLogger(io.Discard, tc.level)
		if (err == nil) != tc.ok || (err != nil && !strings.Contains(err.Error(), "--log-level")) {
			t.Errorf("level %q: %v", tc.level, err)
		}
	}
}
