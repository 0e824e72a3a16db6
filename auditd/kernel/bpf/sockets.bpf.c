// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * iter/tcp: one fixed-size record per full TCP socket of the network namespace of the
 * thread that created the iterator, with the raw keepalive fields the kernel's timers use
 * (include/net/tcp.h keepalive_time_when() and friends). TIME_WAIT and request sockets
 * have no such fields and are skipped (bpf_skc_to_tcp_sock returns NULL for them).
 * The record layout is mirrored by auditd/kernel/bpf/records.py: change both together.
 */
#include "core.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "sock.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Jiffies per second, from the running kernel's config (libbpf reads /proc/config.gz or
 * /boot/config-$(uname -r)): TCP_KEEPIDLE and TCP_KEEPINTVL are stored in jiffies. */
extern unsigned int CONFIG_HZ __kconfig;

struct sock_rec {
	__u64 cookie;           /* sock_diag's idiag_cookie */
	__u64 ino;              /* socket inode, 0 if no struct socket (accept queue) */
	__u32 netns;            /* network namespace inode */
	__u32 keepalive_time;   /* jiffies; 0: namespace sysctl */
	__u32 keepalive_intvl;  /* jiffies; 0: namespace sysctl */
	__u32 user_timeout;     /* ms; 0: not set */
	__u32 hz;               /* CONFIG_HZ */
	__u8 state;
	__u8 keepalive_probes;  /* 0: namespace sysctl */
	__u8 keepopen;          /* SO_KEEPALIVE */
	__u8 family;
};

SEC("iter/tcp")
int keepalive_sockets(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct sock *sk;
	struct sock_rec rec = {};
	int keepopen = bpf_core_enum_value(enum sock_flags, SOCK_KEEPOPEN);

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = (struct sock *)tp;
	rec.cookie = bpf_get_socket_cookie(tp);
	rec.ino = sock_ino(sk);
	rec.netns = BPF_CORE_READ(skc, skc_net.net, ns.inum);
	rec.keepalive_time = BPF_CORE_READ(tp, keepalive_time);
	rec.keepalive_intvl = BPF_CORE_READ(tp, keepalive_intvl);
	rec.user_timeout = BPF_CORE_READ(tp, inet_conn.icsk_user_timeout);
	rec.hz = CONFIG_HZ;
	rec.state = BPF_CORE_READ(skc, skc_state);
	rec.keepalive_probes = BPF_CORE_READ(tp, keepalive_probes);
	rec.keepopen = (sk_flags(sk) >> keepopen) & 1;
	rec.family = BPF_CORE_READ(skc, skc_family);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
