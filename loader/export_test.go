package loader

import "github.com/cilium/ebpf"

// ConfigurePodSpec sets another build of the pod object's load-time variables and map sizes
// as Load sets the embedded one's for cfg, so a benchmark can load it beside a datapath
// (sharing its pinned maps) and compare the two builds packet for packet.
func ConfigurePodSpec(spec *ebpf.CollectionSpec, cfg Config) error {
	cfg.setDefaults()
	fwd, _, err := probeForwarding(cfg.Forwarding)
	if err != nil {
		return err
	}
	_, vars, sizes, err := podSpec(cfg, fwd)
	if err != nil {
		return err
	}
	return configureSpec(spec, vars, sizes)
}
