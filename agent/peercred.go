package agent

import (
	"fmt"
	"net"
	"slices"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// peerCredListener closes, unanswered, every connection whose peer process does not run as
// root or as one of the allowed uids. The socket's 0600 mode already keeps other users out;
// this second check holds when the mode does not (an operator's chmod, a socket directory
// mounted into a container with other ownership), at the cost of one getsockopt per
// connection. The credentials are those of the process that connected, taken by the
// kernel at connect time, so a client cannot claim another's.
type peerCredListener struct {
	net.Listener
	allowed []uint32 // besides root
	refused func(pid int32, uid uint32, err error)
}

func (l *peerCredListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cred, err := peerCred(c)
		if err == nil && (cred.Uid == 0 || slices.Contains(l.allowed, cred.Uid)) {
			return c, nil
		}
		c.Close()
		if cred == nil {
			cred = &unix.Ucred{Pid: -1, Uid: ^uint32(0)}
		}
		l.refused(cred.Pid, cred.Uid, err)
	}
}

// peerCred reads SO_PEERCRED of a unix socket connection.
func peerCred(c net.Conn) (*unix.Ucred, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("connection of type %T is not a unix socket", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return cred, nil
}

// newPeerCredListener wraps ln with the agent's allow list, counting and logging refusals.
func (a *Agent) newPeerCredListener(ln net.Listener) *peerCredListener {
	return &peerCredListener{Listener: ln, allowed: a.cfg.SocketAllowedUIDs,
		refused: func(pid int32, uid uint32, err error) {
			a.m.socketRefused.Inc()
			fields := []zap.Field{zap.Int32("pid", pid), zap.Uint32("uid", uid), zap.Uint32s("allowedUIDs", append([]uint32{0}, a.cfg.SocketAllowedUIDs...))}
			if err != nil {
				fields = append(fields, zap.Error(err))
			}
			a.log.Warn("refused a connection to the CNI socket from a process whose uid may not use it "+
				"(the CNI plugin runs as root; add the uid to socketAllowedUIDs if it should)", fields...)
		}}
}
