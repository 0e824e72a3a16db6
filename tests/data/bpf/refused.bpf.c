// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* A socket iterator the verifier must refuse: it reads ctx->sk_common without the NULL
 * check (the iterator's last call has no socket). tests/test_bpf_loader.py builds it. */
#include "core.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("iter/tcp")
int refused(struct bpf_iter__tcp *ctx)
{
	unsigned char state = ctx->sk_common->skc_state;

	bpf_seq_write(ctx->meta->seq, &state, sizeof(state));
	return 0;
}
