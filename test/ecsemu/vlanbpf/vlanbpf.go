// Package vlanbpf holds the emulated VPC's tc programs for ENI trunking (bpf/vpc_vlan.c; a .c file beside Go files would need cgo): they
// tag frames for a member ENI's addresses on the trunk ENI's VPC-side link and check the tag
// on frames from the instance. Regenerate with `make generate` (bpf2go, the pinned clang).
package vlanbpf

//go:generate go tool bpf2go -target bpfel -go-package vlanbpf -type member Vpc bpf/vpc_vlan.c -- -I../../../bpf/include -I../../../bpf
