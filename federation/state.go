package federation

import "fmt"

// State is a peering's state (docs/federation.md, "States").
type State string

// The peering states.
const (
	// StatePending: the acceptor made a token that has not been used.
	StatePending State = "PENDING"
	// StateEstablishing: the handshake is done or under way; the peer has not yet been
	// seen alive with its catalog stream up.
	StateEstablishing State = "ESTABLISHING"
	// StateActive: the peer is alive in the gossip pool and its catalog stream is up.
	StateActive State = "ACTIVE"
	// StateFailing: the peer is suspect or dead in the pool, or its stream broke.
	StateFailing State = "FAILING"
	// StateTerminated: deleted or expired; never revived in place.
	StateTerminated State = "TERMINATED"
)

// ErrTransition is wrapped when a peering is asked to move between two states that the
// state machine does not connect.
var ErrTransition = fmt.Errorf("federation: invalid peering state transition")

// CanMove reports whether a peering may go from s to next. Every state may terminate;
// nothing leaves TERMINATED (a new token makes a new peering); a state may "move" to
// itself (a no-op, so level-triggered callers need not check first).
func (s State) CanMove(next State) bool {
	if s == next {
		return s != ""
	}
	switch next {
	case StateTerminated:
		return true
	case StateEstablishing:
		return s == StatePending
	case StateActive:
		return s == StateEstablishing || s == StateFailing
	case StateFailing:
		return s == StateEstablishing || s == StateActive
	}
	return false
}

// Move returns next if the transition is allowed, else an error wrapping ErrTransition.
func (s State) Move(next State) (State, error) {
	if !s.CanMove(next) {
		return s, fmt.Errorf("%w: %s → %s", ErrTransition, s, next)
	}
	return next, nil
}
