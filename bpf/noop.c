// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* A tc program that does nothing: the baseline `make bench` measures tern's programs
 * against, in the same run. */
#include "lib/common.h"

char __license[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int tern_noop(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
