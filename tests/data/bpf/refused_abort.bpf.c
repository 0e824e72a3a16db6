// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* An abort program the verifier must refuse: inet_sock_set_state has three arguments and it
 * reads a sixth. tests/kernel/test_events_live.py builds it, as the shipped objects are. */
#include "core.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/inet_sock_set_state")
int keepalive_abort(unsigned long long *ctx)
{
	return (int)ctx[5];
}
