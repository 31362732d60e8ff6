package eastwest

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// The data path copies small messages in user space and splices bulk in the kernel, and
// holds neither a buffer nor a pipe while a connection is idle:
//
//   - A direction starts in copy mode: it waits for src to be readable without a buffer
//     (inside syscall.RawConn.Read), then reads into a pooled copyBufSize buffer, writes
//     it to dst and returns the buffer. It reads again until EAGAIN: a short read does
//     not prove the queue empty of a FIN that arrived before the wake-up, and Go's poller
//     does not say (nginx learns it from EPOLLRDHUP), so skipping that read could leave
//     a half-close undelivered.
//   - bulkReads full reads in a row switch the direction to splice: src → pipe → dst in
//     the kernel, no user-space copy. The pipe comes from a bounded pool and goes back
//     each time src has nothing more to give, so pipes are held only while bytes are in
//     flight. smallSplices splices in a row under copyBufSize switch back to copy mode.
//
// io.Copy on two *net.TCPConns splices too, but holds a pipe (two descriptors) per
// direction for the connection's whole life and makes three splice calls per message.
const (
	copyBufSize = 16 << 10
	bulkReads   = 2
	// smallSplices in a row that each move less than copyBufSize switch a direction
	// back to copying: a bulk stream's occasional short splice (the socket drained just
	// before the sender's next write) must not cost it a round of user-space copies.
	smallSplices = 4
	pipeSize     = 1 << 20 // as Go's own splice; the kernel keeps 64 KiB if it refuses
	// maxFreePipes bounds the pool: pipes beyond it are closed when given back.
	maxFreePipes = 32
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// pipe is one kernel pipe used to splice; n is the number of bytes in it.
type pipe struct {
	r, w int
	n    int
}

// pipePool holds empty pipes for reuse. It is bounded and explicit (not a sync.Pool,
// whose drops at GC would leak the descriptors).
type pipePool struct {
	mu   sync.Mutex
	free []*pipe
	// out counts pipes taken and not given back, taken every get: what the tests check
	// (no pipe held by an idle connection; bulk did splice).
	out, taken atomic.Int64
}

// pipes is the process's pool, shared by every gateway and forward.
var pipes pipePool

// get returns an empty pipe, a pooled one when there is one.
func (pp *pipePool) get() (*pipe, error) {
	pp.taken.Add(1)
	pp.out.Add(1)
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		pp.out.Add(-1)
		return nil, err
	}
	unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, pipeSize) // best effort
	return &pipe{r: fds[0], w: fds[1]}, nil
}

// put returns p to the pool, or closes it when the pool is full or p still holds bytes
// (a failed write left them; the next user must start from an empty pipe).
func (pp *pipePool) put(p *pipe) {
	pp.out.Add(-1)
	if p.n == 0 {
		pp.mu.Lock()
		if len(pp.free) < maxFreePipes {
			pp.free = append(pp.free, p)
			pp.mu.Unlock()
			return
		}
		pp.mu.Unlock()
	}
	unix.Close(p.r)
	unix.Close(p.w)
}

// link is what the two halves of one relayed connection share.
type link struct {
	activity atomic.Uint64 // bumped on every transfer, read by the idle watchdog
	ended    atomic.Int32  // halves that returned
}

// half is one direction of a relayed connection.
type half struct {
	dst, src   net.Conn
	rdst, rsrc syscall.RawConn
	moved      int64
	link       *link
	noSplice   bool // the kernel refused to splice these sockets
}

// relay copies src to dst until src ends or either side fails, and returns the bytes
// moved. When src ends cleanly it half-closes dst (CloseWrite), so a client that
// half-closes still gets the rest of the answer, unless the other half has already
// returned: the caller closes both connections once both halves return, and a close
// sends the same FIN without the extra shutdown call. On any error it closes both,
// which ends the other direction too. The caller must close both after both halves.
func relay(dst, src net.Conn, l *link) int64 {
	h := &half{dst: dst, src: src, link: l}
	err := h.run()
	last := l.ended.Add(1) == 2
	if errors.Is(err, io.EOF) {
		if last {
			return h.moved
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	} else {
		src.Close()
		dst.Close()
	}
	return h.moved
}

// run moves bytes until the end, switching between copy and splice; it returns io.EOF
// when src ended cleanly.
func (h *half) run() error {
	sd, ok1 := h.dst.(syscall.Conn)
	ss, ok2 := h.src.(syscall.Conn)
	if ok1 && ok2 {
		var err1, err2 error
		h.rdst, err1 = sd.SyscallConn()
		h.rsrc, err2 = ss.SyscallConn()
		ok1 = err1 == nil && err2 == nil
	}
	if !ok1 || !ok2 { // not sockets (tests, custom dialers): a plain buffered copy
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		n, err := io.CopyBuffer(struct{ io.Writer }{h.dst}, struct{ io.Reader }{h.src}, *bp)
		h.moved = n
		if err == nil {
			return io.EOF
		}
		return err
	}
	for {
		bulk, err := h.copy()
		if err != nil {
			return err
		}
		if !bulk {
			continue
		}
		if err := h.splice(); err != nil {
			return err
		}
	}
}

// copy moves bytes through a pooled buffer until src ends (io.EOF), fails, or bulkReads
// full reads in a row show bulk (bulk true). It never holds the buffer while waiting.
func (h *half) copy() (bulk bool, err error) {
	full := 0
	rerr := h.rsrc.Read(func(fd uintptr) bool {
		for {
			bp := bufPool.Get().(*[]byte)
			n, e := unix.Read(int(fd), *bp)
			switch {
			case e == unix.EINTR:
				bufPool.Put(bp)
				continue
			case e == unix.EAGAIN:
				bufPool.Put(bp)
				return false
			case e != nil:
				bufPool.Put(bp)
				err = e
				return true
			case n == 0:
				bufPool.Put(bp)
				err = io.EOF
				return true
			}
			_, e = h.dst.Write((*bp)[:n])
			bufPool.Put(bp)
			if e != nil {
				err = e
				return true
			}
			h.moved += int64(n)
			h.link.activity.Add(1)
			if n < copyBufSize {
				full = 0
				continue
			}
			if full++; full >= bulkReads && !h.noSplice {
				bulk = true
				return true
			}
		}
	})
	if rerr != nil {
		return false, rerr
	}
	return bulk, err
}

// splice moves bytes src → pipe → dst in the kernel until smallSplices splices in a row
// move less than copyBufSize each (nil: back to copy mode), src ends (io.EOF) or either side fails. The pipe
// goes back to the pool whenever src has nothing more to give.
func (h *half) splice() (err error) {
	var p *pipe
	small := 0
	defer func() {
		if p != nil {
			pipes.put(p)
		}
	}()
	rerr := h.rsrc.Read(func(fd uintptr) bool {
		for {
			if p == nil {
				var e error
				if p, e = pipes.get(); e != nil {
					h.noSplice = true // out of descriptors or pipes: copy in user space
					return true
				}
			}
			n, e := unix.Splice(int(fd), nil, p.w, nil, pipeSize, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			switch {
			case e == unix.EINTR:
				continue
			case e == unix.EAGAIN:
				pipes.put(p) // empty: every splice in is pumped out before the next
				p = nil
				return false
			case e == unix.EINVAL || e == unix.ENOSYS:
				h.noSplice = true
				return true
			case e != nil:
				err = e
				return true
			case n == 0:
				err = io.EOF
				return true
			}
			p.n = int(n)
			if e := h.pump(p); e != nil {
				err = e
				return true
			}
			h.moved += n
			h.link.activity.Add(1)
			if n >= copyBufSize {
				small = 0
			} else if small++; small >= smallSplices {
				return true // small again: back to copy mode
			}
		}
	})
	if rerr != nil {
		return rerr
	}
	return err
}

// pump writes everything in p to dst, waiting while dst's send buffer is full.
func (h *half) pump(p *pipe) error {
	var err error
	werr := h.rdst.Write(func(fd uintptr) bool {
		for p.n > 0 {
			n, e := unix.Splice(p.r, nil, int(fd), nil, p.n, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
			switch {
			case e == unix.EINTR:
				continue
			case e == unix.EAGAIN:
				return false
			case e != nil:
				err = e
				return true
			}
			p.n -= int(n)
		}
		return true
	})
	if werr != nil {
		return werr
	}
	return err
}
