package metadata_test

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/tern-net/tern/ipam/metadata"
	"github.com/tern-net/tern/test/ecsemu"
)

// Read against the emulator's metadata service, which answers from the same state as its
// OpenAPI.
func TestReadsInstanceIdentity(t *testing.T) {
	cfg := ecsemu.TestConfig()
	emu, err := ecsemu.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer emu.Close()
	inst := cfg.Instances[0]
	srv := httptest.NewServer(emu.MetadataHandler(inst.ID))
	defer srv.Close()

	c := metadata.New(srv.URL)
	ctx := context.Background()
	if id, err := c.Get(ctx, "instance-id", time.Second); err != nil || id != inst.ID {
		t.Fatalf("instance-id = %q, %v; want %s", id, err, inst.ID)
	}
	if r, err := c.Get(ctx, "region-id", time.Second); err != nil || r != cfg.RegionID {
		t.Fatalf("region-id = %q, %v; want %s", r, err, cfg.RegionID)
	}
	if _, err := c.Get(ctx, "no-such-item", 300*time.Millisecond); err == nil {
		t.Fatal("an unknown item should be an error")
	}
}
