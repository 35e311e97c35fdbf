package eniconfig

import "path/filepath"

// resolve follows every symlink in path (ConfigMap volumes chain file → ..data/file →
// ..<timestamp>/file).
func resolve(path string) (string, error) {
	return filepath.EvalSymlinks(path)
}
