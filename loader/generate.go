package loader

// The BPF objects are compiled by bpf2go with the one pinned clang the Makefile exports
// (BPF2GO_CC, BPF2GO_STRIP, BPF2GO_CFLAGS). Run `make generate`, not `go generate` alone.
// The generated *_bpfel.go and *_bpfel.o are committed so building never needs clang.

//go:generate go tool bpf2go -target bpfel -go-package loader -type svc_key -type svc_value -type backend_key -type backend_value -type member_key -type svc_opts -type affinity_key -type affinity_value -type maglev_key -type maglev_value -type endpoint_key -type endpoint_value -type ipcache_key -type ipcache_value -type ct_key -type ct_value -type policy_key -type policy_value -type policy_iso_value -type policy_cidr_key -type policy_cidr_value -type frag_key -type frag_value -type metrics_key -type metrics_value -type tern_reason -type tern_dir -type drop_event -type event_limit -type policy_event -type policy_stats_key -type policy_name -type bw_key -type bw_value -type bw_dir -type snat_value -type nonmasq_key -type snat_stats -type src_range_key -type np_rev Pod ../bpf/pod.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -target bpfel -go-package loader Noop ../bpf/noop.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -target bpfel -go-package loader Netdev ../bpf/netdev.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -target bpfel -go-package loader -type sock_revnat_key -type sock_revnat_value -type sock_destroyed Sock ../bpf/sock.c -- -I../bpf/include -I../bpf
