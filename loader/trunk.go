package loader

// The trunk object (bpf/trunk.c, bpf/lib/trunk.h): VLAN tagging of member-ENI pods on the
// trunk ENI's link. It is loaded and attached by datapath.Trunk, apart from the pod and
// netdev objects, so a node without trunking never loads it.

//go:generate go tool bpf2go -target bpfel -go-package loader -type trunk_vlan -type trunk_key Trunk ../bpf/trunk.c -- -I../bpf/include -I../bpf
