package credential

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
)

// Source yields the credential to sign the next API call with. The cloud client asks it for
// every call, so a rotated credential is used from the next call on, without a restart.
type Source interface {
	Get() (Credential, error)
}

// Static is a Source for a credential that never changes (an access key in eni_conf or the
// environment: rotating those means editing eni_conf, which the agent re-reads anyway).
type Static Credential

// Get returns the credential.
func (s Static) Get() (Credential, error) { return Credential(s), nil }

// FileSource serves the credential of a Terway-format token file and re-reads the file when
// it changes. The platform rotates the file before the STS token expires (new AccessKeyId,
// secret, token and expiration); kubelet replaces a projected Secret by swapping a symlink,
// and a host file is typically rewritten or renamed over, so every call stats the path
// (following symlinks) and a new inode, size or modification time means a new credential.
// A stat is a few microseconds, far below an OpenAPI round trip, and needs no watcher
// goroutine that could die or miss a symlink swap.
type FileSource struct {
	path string
	now  func() time.Time

	mu    sync.Mutex
	cur   Credential
	stamp fileStamp
	// bad is the version of the file that failed to load, so a bad file is reported once
	// and not decrypted again on every call until it changes.
	bad fileStamp
}

// fileStamp identifies one version of the file.
type fileStamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
}

func stampOf(fi os.FileInfo) fileStamp {
	s := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(st.Dev), st.Ino
	}
	return s
}

// NewFileSource reads the file once: a file that cannot be read or decrypted at start is an
// error for the operator to fix (the agent refuses to start rather than run without a
// cloud credential).
func NewFileSource(path string, now func() time.Time) (*FileSource, error) {
	if now == nil {
		now = time.Now
	}
	s := &FileSource{path: path, now: now}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("credential file %s: %w (check credential_path in eni_conf and the volume mount)", path, err)
	}
	c, err := LoadEncryptedFile(path)
	if err != nil {
		return nil, err
	}
	s.cur, s.stamp = c, stampOf(fi)
	return s, nil
}

// Get returns the file's current credential. When the file changed but cannot be read or
// decrypted (caught half-written, or a bad rotation), Get keeps serving the last good
// credential while it has not expired, and returns it together with the error so the caller
// can log it; once that credential has expired the error alone is returned, since a call
// signed with it would be refused anyway.
func (s *FileSource) Get() (Credential, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	expired := !s.cur.Expiration.IsZero() && !s.now().Before(s.cur.Expiration)
	fi, err := os.Stat(s.path)
	if err == nil && (stampOf(fi) == s.stamp || stampOf(fi) == s.bad) && !expired {
		return s.cur, nil
	}
	if err == nil {
		var c Credential
		if c, err = LoadEncryptedFile(s.path); err == nil {
			s.cur, s.stamp, s.bad = c, stampOf(fi), fileStamp{}
			if !c.Expiration.IsZero() && !s.now().Before(c.Expiration) {
				// Not rotated in time: a call signed with it would be refused anyway.
				return Credential{}, fmt.Errorf("the credential from %s expired at %s and the file has no newer one; "+
					"the platform rewrites it before expiration: check whatever writes the file (the agent re-reads it on every call)",
					s.path, c.Expiration.UTC().Format(time.RFC3339))
			}
			return c, nil
		}
		s.bad = stampOf(fi)
	} else {
		err = fmt.Errorf("credential file %s: %w (check credential_path in eni_conf and the volume mount)", s.path, err)
	}
	if expired {
		return Credential{}, fmt.Errorf("the credential from %s expired at %s and the file has no newer one: %w",
			s.path, s.cur.Expiration.UTC().Format(time.RFC3339), err)
	}
	return s.cur, fmt.Errorf("re-read the rotated credential file, still signing with the credential read before: %w", err)
}
