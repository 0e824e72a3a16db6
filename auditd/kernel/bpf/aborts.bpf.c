// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tp_btf on the tracepoints of a TCP connection's end: one record per connection the kernel
 * aborted, sent through a BPF ring buffer, read from the socket at the moment of the abort.
 *
 * Every abort goes through tcp_done_with_error() (net/ipv4/tcp.c): it stores sk_err, then
 * tcp_done() moves the socket to CLOSE (inet_sock_set_state), then it wakes the owner. So at
 * the state change to CLOSE sk_err already says why, and the application cannot have read
 * and cleared it yet (it can by the time inet_sk_error_report fires, which then reports 0).
 * A local reset (tcp_disconnect, SO_LINGER 0) changes the state before it sets sk_err; a
 * normal close has none. The keepalive timer's RST (tcp_send_reset, reason
 * TCP_KEEPALIVE_TIMEOUT, 6.10+) and a received RST (tcp_receive_reset) come just before, on
 * the same CPU in the same call: a per-CPU slot carries them to the state change.
 * The record layout is mirrored by auditd/kernel/events/bpfabort.py: change both together.
 */
#include "core.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "sock.h"
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

extern unsigned int CONFIG_HZ __kconfig;

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
/* include/uapi/asm-generic/errno.h */
#define ECONNRESET 104
#define ENETUNREACH 101
#define ETIMEDOUT 110
#define EHOSTDOWN 112
#define EHOSTUNREACH 113
/* include/net/tcp_states.h */
#define TCP_ESTABLISHED 1
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_CLOSING 11

/* enum bpf_map_type, include/uapi/linux/bpf.h (core.h stands in for the kernel headers) */
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_RINGBUF 27

#define CAUSE_KEEPALIVE_RST 1
#define CAUSE_PEER_RST 2

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct in6_addr___ev {
	union {
		__u8 u6_addr8[16];
	} in6_u;
};

/* The fields read here beyond core.h's, as flavors (libbpf drops the ___ev suffix). */
struct sock_common___ev {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	struct in6_addr___ev skc_v6_daddr;
	struct in6_addr___ev skc_v6_rcv_saddr;
};

struct netns_ipv4___ev {
	__u8 sysctl_tcp_keepalive_probes;
	int sysctl_tcp_keepalive_time; /* jiffies */
	int sysctl_tcp_keepalive_intvl;
};

struct net___ev {
	struct netns_ipv4___ev ipv4;
};

struct sock___ev {
	int sk_err;
	__u16 sk_protocol;
};

struct inet_sock___ev {
	__be16 inet_sport;
};

struct inet_connection_sock___ev {
	__u8 icsk_probes_out;
};

struct tcp_sock___ev {
	__u32 total_retrans;
};

#pragma clang attribute pop

enum sk_rst_reason {
	SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT = 0, /* relocated by bpf_core_enum_value */
};

struct abort_rec {
	__u64 time_ns;          /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u64 cookie;           /* sock_diag's idiag_cookie */
	__u64 ino;              /* socket inode, 0 once the application closed it */
	__u32 netns;            /* network namespace inode */
	__s32 error;            /* sk_err: ETIMEDOUT, ECONNRESET, EHOSTUNREACH, ... */
	__u32 keepalive_time;   /* jiffies; 0: the namespace's sysctl */
	__u32 keepalive_intvl;  /* jiffies; 0: the namespace's sysctl */
	__u32 user_timeout;     /* ms; 0: not set */
	__u32 hz;               /* CONFIG_HZ */
	__u32 total_retrans;    /* segments retransmitted over the connection's life */
	__u32 netns_keepalive_time;  /* jiffies: the namespace's tcp_keepalive_time */
	__u32 netns_keepalive_intvl; /* jiffies */
	__u16 family;
	__u16 sport;            /* host order */
	__u16 dport;            /* host order */
	__u8 oldstate;          /* the state it left for CLOSE */
	__u8 probes_out;        /* keepalive (or zero-window) probes unanswered */
	__u8 keepalive_probes;  /* 0: the namespace's sysctl */
	__u8 netns_keepalive_probes;
	__u8 keepopen;          /* SO_KEEPALIVE */
	__u8 cause;             /* CAUSE_*: the RST seen just before, 0 for none */
	__u8 saddr[16];         /* an IPv4 address in the first 4 */
	__u8 daddr[16];
};

struct slot {
	__u64 cookie; /* of the socket the RST was for (a pointer cannot be compared) */
	__u32 cause;
};

/* 1 MiB: about 9500 records, what a burst of resets elsewhere on the host (a process with
 * 100k connections killed, its peers reset) can fill between two reads of the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} aborts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct slot);
} last_rst SEC(".maps");

/* Records that did not fit in the ring buffer (the reader fell behind). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

static __always_inline void remember(struct sock *sk, __u32 cause)
{
	__u32 zero = 0;
	struct slot *slot = bpf_map_lookup_elem(&last_rst, &zero);

	if (slot) {
		slot->cookie = bpf_get_socket_cookie(sk);
		slot->cause = cause;
	}
}

SEC("tp_btf/tcp_send_reset")
int keepalive_rst(unsigned long long *ctx)
{
	/* tcp_send_reset(sk, skb, reason) since 6.10; older kernels name no reason: there the
	 * branch below is dead and the verifier never sees ctx[2]. */
	if (!bpf_core_enum_value_exists(enum sk_rst_reason, SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT))
		return 0;
	if ((int)ctx[2] != bpf_core_enum_value(enum sk_rst_reason,
					       SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT))
		return 0;
	if (ctx[0])
		remember((struct sock *)ctx[0], CAUSE_KEEPALIVE_RST);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int peer_rst(unsigned long long *ctx)
{
	remember((struct sock *)ctx[0], CAUSE_PEER_RST);
	return 0;
}

static __always_inline int established(int state)
{
	return state == TCP_ESTABLISHED || state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 ||
	       state == TCP_CLOSE_WAIT || state == TCP_CLOSING || state == TCP_LAST_ACK;
}

static __always_inline int abort_error(int err)
{
	return err == ETIMEDOUT || err == ECONNRESET || err == EHOSTUNREACH ||
	       err == ENETUNREACH || err == EHOSTDOWN;
}

static __always_inline void fill(struct abort_rec *rec, struct sock *sk)
{
	struct sock_common___ev *skc = (void *)sk;
	struct tcp_sock *tp = (void *)sk;
	struct net___ev *net = (void *)BPF_CORE_READ(sk, __sk_common.skc_net.net);
	int keepopen = bpf_core_enum_value(enum sock_flags, SOCK_KEEPOPEN);

	rec->ino = sock_ino(sk);
	rec->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	rec->keepalive_time = BPF_CORE_READ(tp, keepalive_time);
	rec->keepalive_intvl = BPF_CORE_READ(tp, keepalive_intvl);
	rec->keepalive_probes = BPF_CORE_READ(tp, keepalive_probes);
	rec->user_timeout = BPF_CORE_READ(tp, inet_conn.icsk_user_timeout);
	rec->total_retrans = BPF_CORE_READ((struct tcp_sock___ev *)sk, total_retrans);
	rec->probes_out = BPF_CORE_READ((struct inet_connection_sock___ev *)sk, icsk_probes_out);
	rec->netns_keepalive_time = BPF_CORE_READ(net, ipv4.sysctl_tcp_keepalive_time);
	rec->netns_keepalive_intvl = BPF_CORE_READ(net, ipv4.sysctl_tcp_keepalive_intvl);
	rec->netns_keepalive_probes = BPF_CORE_READ(net, ipv4.sysctl_tcp_keepalive_probes);
	rec->hz = CONFIG_HZ;
	rec->keepopen = (sk_flags(sk) >> keepopen) & 1;
	rec->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	/* inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) has put the port back already */
	rec->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock___ev *)sk, inet_sport));
	rec->dport = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	if (rec->family == AF_INET6) {
		BPF_CORE_READ_INTO(&rec->saddr, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&rec->daddr, skc, skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__be32 *)rec->saddr, skc, skc_rcv_saddr);
		BPF_CORE_READ_INTO((__be32 *)rec->daddr, skc, skc_daddr);
	}
}

SEC("tp_btf/inet_sock_set_state")
int keepalive_abort(unsigned long long *ctx)
{
	struct sock *sk = (void *)ctx[0];
	int oldstate = (int)ctx[1], newstate = (int)ctx[2];
	__u32 zero = 0, cause = 0;
	__u64 cookie;
	struct slot *slot;
	struct abort_rec *rec;
	__u64 *dropped;
	int err;

	if (newstate != TCP_CLOSE || !established(oldstate))
		return 0;
	if (BPF_CORE_READ((struct sock___ev *)sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	err = BPF_CORE_READ((struct sock___ev *)sk, sk_err);
	if (!abort_error(err))
		return 0;
	cookie = bpf_get_socket_cookie(sk);
	slot = bpf_map_lookup_elem(&last_rst, &zero);
	if (slot) {
		if (slot->cookie == cookie)
			cause = slot->cause;
		slot->cookie = 0;
	}
	if (err == ECONNRESET && cause != CAUSE_PEER_RST)
		return 0;
	rec = bpf_ringbuf_reserve(&aborts, sizeof(*rec), 0);
	if (!rec) {
		dropped = bpf_map_lookup_elem(&lost, &zero);
		if (dropped)
			__sync_fetch_and_add(dropped, 1);
		return 0;
	}
	__builtin_memset(rec, 0, sizeof(*rec));
	rec->time_ns = bpf_ktime_get_ns();
	rec->error = err;
	rec->oldstate = oldstate;
	rec->cause = cause;
	rec->cookie = cookie;
	fill(rec, sk);
	bpf_ringbuf_submit(rec, 0);
	return 0;
}
