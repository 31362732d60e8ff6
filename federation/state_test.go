package federation

import (
	"errors"
	"testing"
)

func TestStateMachine(t *testing.T) {
	all := []State{StatePending, StateEstablishing, StateActive, StateFailing, StateTerminated}
	allowed := map[[2]State]bool{
		{StatePending, StateEstablishing}: true,
		{StateEstablishing, StateActive}:  true,
		{StateEstablishing, StateFailing}: true,
		{StateActive, StateFailing}:       true,
		{StateFailing, StateActive}:       true,
	}
	for _, from := range all {
		for _, to := range all {
			want := allowed[[2]State{from, to}] || to == StateTerminated || from == to
			got, err := from.Move(to)
			if want != (err == nil) {
				t.Errorf("%s → %s: err %v, want allowed=%v", from, to, err, want)
			}
			if err != nil && (!errors.Is(err, ErrTransition) || got != from) {
				t.Errorf("%s → %s: refusal %v left %s", from, to, err, got)
			}
		}
	}
}
