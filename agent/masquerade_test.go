package agent

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/tern-net/tern/ipam/eniconfig"
)

// The masquerade block reads with ip-masq-agent's field names, and Validate reports every
// bad field at once.
func TestMasqueradeConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.json")
	os.WriteFile(p, []byte(`{"nodeName":"n1","masquerade":{"enabled":true,"vpcCIDRs":["192.168.0.0/16"],
		"nonMasqueradeCIDRs":["172.16.0.0/12"],"masqLinkLocal":true,"portMin":2048,"portTries":64,"gcInterval":"10s"}}`), 0o600)
	c, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	m := c.Masquerade
	if !m.Enabled || m.PortMin != 2048 || m.PortTries != 64 || !m.MasqLinkLocal || len(m.NonMasqueradeCIDRs) != 1 {
		t.Fatalf("parsed %+v", m)
	}
	bad := Config{NodeName: "n1", Masquerade: MasqueradeConfig{VPCCIDRs: []string{"10.0.0.0"},
		NonMasqueradeCIDRs: []string{"fd00::/8"}, PortMin: 80, PortTries: 1000}}
	err = bad.Validate()
	for _, want := range []string{"vpcCIDRs entry \"10.0.0.0\"", "nonMasqueradeCIDRs entry \"fd00::/8\"", "portMin 80", "portTries 1000"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate did not report %s: %v", want, err)
		}
	}
}

// The non-masquerade set: the VPC (from the config, or the metadata service when the config
// has none), eni_conf's service CIDR, the extra CIDRs and link-local unless masqLinkLocal.
func TestNonMasqueradeSet(t *testing.T) {
	md := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/latest/meta-data/vpc-cidr-block" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte("10.0.0.0/8"))
	}))
	defer md.Close()
	eni := eniconfig.Config{ServiceCIDR: netip.MustParsePrefix("172.21.0.0/20")}
	for _, c := range []struct {
		name string
		m    MasqueradeConfig
		want []string
	}{
		{"VPC from metadata", MasqueradeConfig{Enabled: true},
			[]string{"10.0.0.0/8", "172.21.0.0/20", "169.254.0.0/16"}},
		{"configured", MasqueradeConfig{Enabled: true, VPCCIDRs: []string{"192.168.0.0/16"},
			NonMasqueradeCIDRs: []string{"100.64.0.0/10"}, MasqLinkLocal: true},
			[]string{"192.168.0.0/16", "100.64.0.0/10", "172.21.0.0/20"}},
	} {
		a := &Agent{cfg: Config{MetadataEndpoint: md.URL, Masquerade: c.m}, log: zap.NewNop()}
		got, err := a.nonMasqueradeSet(context.Background(), eni)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var s []string
		for _, p := range got {
			s = append(s, p.String())
		}
		if !slices.Equal(s, c.want) {
			t.Errorf("%s: %v, want %v", c.name, s, c.want)
		}
	}
}
