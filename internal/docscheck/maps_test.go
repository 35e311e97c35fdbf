package docscheck

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/tern-net/tern/loader"
)

// mapRow is one row of docs/maps.md's table.
type mapRow struct {
	typ, key, value, size string
	eviction, writer      string
	reader                string
}

// TestMapsReferenceMatchesObjects: every map the BPF objects pin is in docs/maps.md once,
// with the type, key and value type names and size of its CollectionSpec (BTF), and a
// non-empty eviction, writer and reader; the document names no map that does not exist.
func TestMapsReferenceMatchesObjects(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "maps.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]mapRow{}
	firstCode := regexp.MustCompile("^`([^`]+)`")
	for _, line := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(line, "| `tern_") {
			continue
		}
		cols := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cols {
			cols[i] = strings.TrimSpace(cols[i])
		}
		if len(cols) != 8 {
			t.Errorf("docs/maps.md row has %d columns, want 8: %s", len(cols), line)
			continue
		}
		name := strings.Trim(cols[0], "`")
		if _, dup := rows[name]; dup {
			t.Errorf("docs/maps.md lists %s twice", name)
		}
		code := func(s string) string {
			if m := firstCode.FindStringSubmatch(s); m != nil {
				return m[1]
			}
			return strings.Fields(s + " ?")[0]
		}
		rows[name] = mapRow{typ: cols[1], key: code(cols[2]), value: code(cols[3]), size: strings.Fields(cols[4] + " ?")[0],
			eviction: cols[5], writer: cols[6], reader: cols[7]}
	}

	pinned := map[string]*ebpf.MapSpec{}
	for obj, load := range map[string]func() (*ebpf.CollectionSpec, error){"pod": loader.LoadPod, "netdev": loader.LoadNetdev, "sock": loader.LoadSock, "noop": loader.LoadNoop, "trunk": loader.LoadTrunk} {
		spec, err := load()
		if err != nil {
			t.Fatalf("%s object: %v", obj, err)
		}
		for name, m := range spec.Maps {
			if m.Pinning != ebpf.PinByName {
				continue
			}
			if prev, ok := pinned[name]; ok && (prev.Type != m.Type || prev.MaxEntries != m.MaxEntries) {
				t.Errorf("%s differs between objects: %v/%d and %v/%d", name, prev.Type, prev.MaxEntries, m.Type, m.MaxEntries)
			}
			pinned[name] = m
		}
	}
	typeName := func(tn string) string {
		if tn == "" {
			return "–"
		}
		return tn
	}
	for name, m := range pinned {
		r, ok := rows[name]
		if !ok {
			t.Errorf("pinned map %s (%v) is not in docs/maps.md", name, m.Type)
			continue
		}
		key, value := "–", "–"
		if m.Key != nil {
			key = typeName(m.Key.TypeName())
		}
		if m.Value != nil {
			value = typeName(m.Value.TypeName())
		}
		want := mapRow{typ: m.Type.String(), key: key, value: value, size: strconv.FormatUint(uint64(m.MaxEntries), 10)}
		got := mapRow{typ: r.typ, key: r.key, value: r.value, size: r.size}
		if got != want {
			t.Errorf("docs/maps.md %s: type %s, key %s, value %s, size %s; the object says %s, %s, %s, %s",
				name, got.typ, got.key, got.value, got.size, want.typ, want.key, want.value, want.size)
		}
		if r.eviction == "" || r.writer == "" || r.reader == "" {
			t.Errorf("docs/maps.md %s: eviction, writer and reader must all be said", name)
		}
	}
	for name := range rows {
		if _, ok := pinned[name]; !ok {
			t.Errorf("docs/maps.md lists %s, which no BPF object pins", name)
		}
	}
}
