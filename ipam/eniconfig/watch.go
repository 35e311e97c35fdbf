package eniconfig

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Watcher reloads an eni_conf file when it changes and hands each new valid config to a callback.
//
// It polls rather than using inotify: a ConfigMap volume replaces the file by swapping the
// `..data` symlink, which inotify on the visible path does not report, and polling needs no new
// dependency. Each poll stats the path (following symlinks) and, when the modification time,
// size or target changed, hashes the content; only a changed hash triggers a parse. An invalid
// new file is logged and counted, and the last good config stays in force.
type Watcher struct {
	path     string
	interval time.Duration
	log      *zap.Logger
	onChange func(Config)

	reloads *prometheus.CounterVec

	lastHash [sha256.Size]byte
	lastStat statKey
	current  Config
}

type statKey struct {
	mtime  time.Time
	size   int64
	target string
}

// NewWatcher creates a watcher of path polling every interval. onChange runs on the watcher's
// goroutine for every new valid config after the initial one returned by Load.
func NewWatcher(path string, interval time.Duration, log *zap.Logger, onChange func(Config)) *Watcher {
	if interval <= 0 {
		interval = 5 * time.Second
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Watcher{
		path:     path,
		interval: interval,
		log:      log.With(zap.String("path", path)),
		onChange: onChange,
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_eniconfig_reloads_total",
			Help: "eni_conf reload attempts by result (ok, invalid, unreadable).",
		}, []string{"result"}),
	}
}

// Collectors returns the watcher's metrics for the caller to register.
func (w *Watcher) Collectors() []prometheus.Collector { return []prometheus.Collector{w.reloads} }

// Load reads and validates the file once and remembers it as the current config. Call it before
// Run; a failure here is fatal for the caller (there is no previous config to keep).
func (w *Watcher) Load() (Config, error) {
	data, key, err := w.read()
	if err != nil {
		return Config{}, err
	}
	cfg, warnings, err := Parse(data)
	for _, wmsg := range warnings {
		w.log.Warn(wmsg)
	}
	if err != nil {
		return Config{}, fmt.Errorf("load %s: %w", w.path, err)
	}
	w.lastHash = sha256.Sum256(data)
	w.lastStat = key
	w.current = cfg
	return cfg, nil
}

// Run polls until ctx is done.
func (w *Watcher) Run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.Poll()
		}
	}
}

// Poll checks the file once; exported so tests and callers can force a check without waiting.
func (w *Watcher) Poll() {
	key, err := w.stat()
	if err != nil {
		w.reloads.WithLabelValues("unreadable").Inc()
		w.log.Warn("eni_conf unreadable; keeping the previous config", zap.Error(err))
		return
	}
	if key == w.lastStat {
		return
	}
	data, key, err := w.read()
	if err != nil {
		w.reloads.WithLabelValues("unreadable").Inc()
		w.log.Warn("eni_conf unreadable; keeping the previous config", zap.Error(err))
		return
	}
	w.lastStat = key
	h := sha256.Sum256(data)
	if h == w.lastHash {
		return
	}
	w.lastHash = h
	cfg, warnings, err := Parse(data)
	for _, wmsg := range warnings {
		w.log.Warn(wmsg)
	}
	if err != nil {
		w.reloads.WithLabelValues("invalid").Inc()
		w.log.Error("new eni_conf is invalid; keeping the previous config", zap.Error(err))
		return
	}
	w.current = cfg
	w.log.Info("eni_conf reloaded")
	if w.onChange != nil {
		w.onChange(cfg)
	}
	// Counted once the new config is applied, so that the counter tells a caller (an
	// operator, a test) that what follows uses it.
	w.reloads.WithLabelValues("ok").Inc()
}

func (w *Watcher) stat() (statKey, error) {
	fi, err := os.Stat(w.path)
	if err != nil {
		return statKey{}, err
	}
	// The resolved target changes when kubelet swaps ..data even if mtime and size collide.
	target, _ := resolve(w.path)
	return statKey{mtime: fi.ModTime(), size: fi.Size(), target: target}, nil
}

func (w *Watcher) read() ([]byte, statKey, error) {
	key, err := w.stat()
	if err != nil {
		return nil, statKey{}, fmt.Errorf("stat eni_conf %s: %w", w.path, err)
	}
	data, err := os.ReadFile(w.path)
	if err != nil {
		return nil, statKey{}, fmt.Errorf("read eni_conf %s: %w", w.path, err)
	}
	return data, key, nil
}
