// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * iter/tcp: one namespace's audit pass in the kernel. For every socket sock_diag's dump of
 * the audited states would report (auditd/kernel/sockdiag.py DEFAULT_STATES), it computes
 * what auditd/audit/tally.py Tally computes in Python: counts by state and keepalive status,
 * the idle-age histogram and idle sums of ESTABLISHED sockets, and the pre-filter under the
 * namespace's loosest thresholds. Only the sockets the pre-filter keeps are written, each as
 * a full record (every field of auditd.model.Sock as inet_diag computes it, plus the cookie
 * and the raw keepalive fields); the aggregates follow as one record at the end of the pass.
 *
 * Parameters come from the map "params", keyed by the network namespace's inode (written by
 * the loader before it creates the pass, deleted after); aggregates accumulate in "aggs"
 * keyed by the pass's session id (bpf_iter_meta), so passes of different namespaces may
 * overlap. Layouts are mirrored by auditd/kernel/bpf/records.py: change both together.
 */
#include "core.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "sock.h"
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

extern unsigned int CONFIG_HZ __kconfig;

/* include/uapi/linux/bpf.h */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_NOEXIST 1

#define ESTABLISHED 1
#define SYN_RECV 3
#define CLOSE_WAIT 8
#define NEW_SYN_RECV 12
/* The states sock_diag's dump of the audit asks for (model.AUDITED_STATES). */
#define AUDITED ((1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11))

/* include/net/inet_connection_sock.h */
#define ICSK_TIME_RETRANS 1
#define ICSK_TIME_PROBE0 3
#define ICSK_TIME_LOSS_PROBE 5
#define ICSK_TIME_REO_TIMEOUT 6

/* Keepalive status indexes (model.Keepalive.ALL order). */
#define KA_ON 0
#define KA_OFF 1
#define KA_UNKNOWN 2

#define BUCKETS 9 /* tally.IDLE_BUCKETS */
#define MAGIC 0x6b61616767726567ULL /* the aggregates record */

#define REC_KEPT 1  /* kept by the inferred pre-filter (Tally.run) */
#define REC_EXTRA 2 /* exact mode: flagged only under the socket's own options */
#define REC_READ 4  /* exact mode: status taken from SO_KEEPALIVE */

struct audit_params {
	__u64 warn_ms;       /* Tally.warn_ms */
	__u64 probe_ms;      /* Tally.probe_ms, at least 0 */
	__u64 close_wait_ms; /* Tally.close_wait_ms */
	__u32 retransmits;   /* ceil(retransmit_threshold) */
	__u32 cadence_min;   /* the least whole max(idle, intvl) above the idle timeout */
	__u32 sys_idle;      /* the namespace's keepalive sysctls, seconds */
	__u32 sys_intvl;
	__u32 sys_cnt;
	__u32 bounds[BUCKETS]; /* ms */
	__u8 slow_defaults;
	__u8 exact;
	__u8 ported; /* the map "ports" has thresholds for some ports of this namespace */
	__u8 pad[5];
};

/* The thresholds of the rules filed under one port (tally.by_port): a socket the general
 * thresholds drop is kept when those of its remote or local port keep it. */
struct port_key {
	__u32 netns;
	__u16 port_raw; /* network order, as audit_rec.sport_raw */
	__u8 remote;    /* 1: the socket's remote port, 0: its local port */
	__u8 pad;
};

struct audit_agg {
	__u64 magic;
	__u64 idle_ms_sum[3];
	__u32 counts[16 * 3]; /* state * 3 + status */
	__u32 hist[3 * (BUCKETS + 1)];
	__u32 total;
	__u32 handed;
	__u32 inspected;  /* exact mode: sockets whose status SO_KEEPALIVE gave */
	__u32 unconfigured; /* sockets of a namespace without parameters (not counted) */
};

struct audit_rec {
	__u64 cookie;
	__u64 ino;
	__u8 src[16];
	__u8 dst[16];
	__u32 expires_ms;
	__u32 rqueue;
	__u32 wqueue;
	__u32 uid;
	__u32 rto_us;
	__u32 unacked;
	__u32 last_data_sent_ms;
	__u32 last_data_recv_ms;
	__u32 last_ack_recv_ms;
	__u32 rtt_us;
	__u32 total_retrans;
	__u32 keepalive_time;  /* jiffies; 0: namespace sysctl */
	__u32 keepalive_intvl; /* jiffies; 0: namespace sysctl */
	__u32 user_timeout;    /* ms */
	__u32 hz;
	__u16 sport_raw; /* network order, as inet_diag's idiag_sport */
	__u16 dport_raw;
	__u8 family;
	__u8 state;
	__u8 timer;
	__u8 retrans;
	__u8 ca_retransmits;
	__u8 probes;
	__u8 backoff;
	__u8 keepalive_probes;
	__u8 keepopen;
	__u8 flags; /* REC_* */
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct audit_params);
} params SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct port_key);
	__type(value, struct audit_params);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); /* a pass never finished leaves its entry to LRU */
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct audit_agg);
} aggs SEC(".maps");

const struct audit_agg zero_agg = {};
struct audit_agg empty_agg = { .magic = MAGIC }; /* a pass without sockets */

/* jiffies_to_msecs() and jiffies_to_usecs() (kernel/time/time.c), 64-bit. */
static __always_inline __u32 to_ms(__u64 j)
{
	__u32 hz = CONFIG_HZ;

	if (hz <= 1000 && 1000 % hz == 0)
		return (__u32)((1000 / hz) * j);
	if (hz > 1000 && hz % 1000 == 0)
		return (__u32)((j + hz / 1000 - 1) / (hz / 1000));
	return (__u32)((j * 1000 + hz - 1) / hz);
}

static __always_inline __u32 to_us(__u64 j)
{
	__u32 hz = CONFIG_HZ;

	if (1000000 % hz == 0)
		return (__u32)((1000000 / hz) * j);
	return (__u32)((j * 1000000 + hz - 1) / hz);
}

/* jiffies_delta_to_msecs(): a timer already due reads 0. */
static __always_inline __u32 delta_ms(unsigned long expires, __u64 now)
{
	long delta = (long)(expires - now);

	return delta > 0 ? to_ms(delta) : 0;
}

/* icsk_timeout(): the retransmit timer's expiry (a field of its own before 6.14). */
static __always_inline unsigned long icsk_timeout(struct inet_connection_sock *icsk)
{
	struct inet_connection_sock___timeout *old = (void *)icsk;

	if (bpf_core_field_exists(old->icsk_timeout))
		return BPF_CORE_READ(old, icsk_timeout);
	return BPF_CORE_READ(icsk, icsk_retransmit_timer.expires);
}

static __always_inline __u32 bucket(const struct audit_params *p, __u64 idle)
{
	__u32 b = 0;

#pragma unroll
	for (int i = 0; i < BUCKETS; i++)
		if (p->bounds[i] < idle) /* bisect_left */
			b = i + 1;
	return b;
}

static __always_inline struct audit_agg *agg_of(__u64 session)
{
	struct audit_agg *agg = bpf_map_lookup_elem(&aggs, &session);

	if (agg)
		return agg;
	bpf_map_update_elem(&aggs, &session, &zero_agg, BPF_NOEXIST);
	return bpf_map_lookup_elem(&aggs, &session);
}

/* Tally._keeps (ESTABLISHED) and Tally._keeps_other (CLOSE_WAIT; no other state). */
static __always_inline int keeps(const struct audit_params *p, const struct audit_rec *r,
				 __u64 heard, __u64 idle)
{
	if (r->state == CLOSE_WAIT && heard >= p->close_wait_ms)
		return 1;
	if (r->state != ESTABLISHED && r->state != CLOSE_WAIT)
		return 0;
	if (r->timer == 0)
		return r->state == ESTABLISHED && idle >= p->warn_ms;
	if (r->timer == 2)
		return r->retrans > 0 ||
		       (idle >= p->warn_ms && (p->slow_defaults || heard + r->expires_ms >= p->probe_ms));
	if (r->timer == 1 || r->timer == 4)
		return r->retrans >= p->retransmits;
	return 0;
}

/* tally._could_flag_exact, over a record's options. */
static __always_inline int could_flag_exact(const struct audit_params *p,
					    const struct audit_rec *r, __u64 heard, __u64 idle)
{
	__u32 hz = r->hz, kidle, kintvl, kcnt;

	if (r->state == CLOSE_WAIT && heard >= p->close_wait_ms)
		return 1;
	if (r->keepopen) {
		kidle = r->keepalive_time ? r->keepalive_time / hz : p->sys_idle;
		kintvl = r->keepalive_intvl ? r->keepalive_intvl / hz : p->sys_intvl;
		kcnt = r->keepalive_probes ? r->keepalive_probes : p->sys_cnt;
		if (r->user_timeout &&
		    (__u64)r->user_timeout < ((__u64)kidle + (__u64)kcnt * kintvl) * 1000)
			return 1;
		if ((kidle > kintvl ? kidle : kintvl) >= p->cadence_min && idle >= p->warn_ms)
			return 1;
		if (r->timer == 2)
			return r->retrans > 0;
	} else if (r->state == ESTABLISHED && r->timer != 1 && r->timer != 4) {
		return idle >= p->warn_ms;
	}
	if (r->timer == 1 || r->timer == 4)
		return r->retrans >= p->retransmits;
	return 0;
}

/* The thresholds of the rules filed under the socket's remote, then local, port. */
static __always_inline const struct audit_params *port_params(__u32 ns, const struct audit_rec *r,
							       int remote)
{
	struct port_key key = { .netns = ns, .remote = remote };

	key.port_raw = remote ? r->dport_raw : r->sport_raw;
	return bpf_map_lookup_elem(&ports, &key);
}

static __always_inline int ported(__u32 ns, const struct audit_rec *r, __u64 heard, __u64 idle,
				  int exact)
{
	const struct audit_params *q = port_params(ns, r, 1);

	if (q && (exact ? could_flag_exact(q, r, heard, idle) : keeps(q, r, heard, idle)))
		return 1;
	q = port_params(ns, r, 0);
	return q && (exact ? could_flag_exact(q, r, heard, idle) : keeps(q, r, heard, idle));
}

SEC("iter/tcp")
int keepalive_audit(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	__u64 session = ctx->meta->session_id;
	struct inet_connection_sock *icsk;
	struct audit_params *p;
	struct audit_agg *agg;
	struct audit_rec r = {};
	struct tcp_sock *tp;
	struct sock *sk;
	__u64 now, heard, idle;
	__u32 ns, now32, state, k, keep = 0, extra = 0;
	__u8 pending;

	if (!skc) { /* the end of the pass: its aggregates */
		agg = bpf_map_lookup_elem(&aggs, &session);
		if (!agg) {
			bpf_seq_write(seq, &empty_agg, sizeof(empty_agg));
			return 0;
		}
		agg->magic = MAGIC;
		if (bpf_seq_write(seq, agg, sizeof(*agg)) == 0)
			bpf_map_delete_elem(&aggs, &session); /* else written again on the next read */
		return 0;
	}
	state = skc->skc_state;
	if (state != NEW_SYN_RECV && (state > 15 || !((1 << state) & AUDITED)))
		return 0;
	agg = agg_of(session);
	if (!agg)
		return 0;
	ns = skc->skc_net.net->ns.inum;
	p = bpf_map_lookup_elem(&params, &ns);
	if (!p) {
		agg->unconfigured++;
		return 0;
	}
	agg->total++;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp) { /* a request socket: sock_diag reports it as SYN_RECV, no tcp_info */
		agg->counts[SYN_RECV * 3 + KA_UNKNOWN]++;
		return 0;
	}
	sk = (struct sock *)tp;
	icsk = &tp->inet_conn;
	now = bpf_jiffies64();
	now32 = (__u32)now;

	/* inet_sk_diag_fill: the retransmit timers, then the zero-window probe, then sk_timer. */
	pending = icsk->icsk_pending;
	if (pending == ICSK_TIME_RETRANS || pending == ICSK_TIME_REO_TIMEOUT ||
	    pending == ICSK_TIME_LOSS_PROBE) {
		r.timer = 1;
		r.retrans = icsk->icsk_retransmits;
		r.expires_ms = delta_ms(icsk_timeout(icsk), now);
	} else if (pending == ICSK_TIME_PROBE0) {
		r.timer = 4;
		r.retrans = icsk->icsk_probes_out;
		r.expires_ms = delta_ms(icsk_timeout(icsk), now);
	} else if (BPF_CORE_READ(sk, sk_timer.entry.pprev)) {
		r.timer = 2;
		r.retrans = icsk->icsk_probes_out;
		r.expires_ms = delta_ms(BPF_CORE_READ(sk, sk_timer.expires), now);
	}
	/* tcp_get_info (not a listener: those are not audited) */
	r.ca_retransmits = icsk->icsk_retransmits;
	r.probes = icsk->icsk_probes_out;
	r.backoff = icsk->icsk_backoff;
	r.rto_us = to_us(icsk->icsk_rto);
	r.unacked = tp->packets_out;
	r.last_data_sent_ms = to_ms(now32 - tp->lsndtime);
	r.last_data_recv_ms = to_ms(now32 - icsk->icsk_ack.lrcvtime);
	r.last_ack_recv_ms = to_ms(now32 - tp->rcv_tstamp);
	r.rtt_us = tp->srtt_us >> 3;
	r.total_retrans = tp->total_retrans;
	r.state = state;
	r.sport_raw = bpf_htons(skc->skc_num);
	r.dport_raw = skc->skc_dport;

	heard = r.last_data_recv_ms < r.last_ack_recv_ms ? r.last_data_recv_ms : r.last_ack_recv_ms;
	idle = heard < r.last_data_sent_ms ? heard : r.last_data_sent_ms;
	/* keepalive_status from the timer, and Tally.run's pre-filter */
	if (state == ESTABLISHED || state == CLOSE_WAIT)
		k = r.timer == 0 ? KA_OFF : r.timer == 2 ? KA_ON : KA_UNKNOWN;
	else
		k = KA_UNKNOWN;
	keep = keeps(p, &r, heard, idle);
	if (!keep && p->ported)
		keep = ported(ns, &r, heard, idle, 0);

	r.ino = sock_ino(sk);
	r.keepalive_time = tp->keepalive_time;
	r.keepalive_intvl = tp->keepalive_intvl;
	r.keepalive_probes = tp->keepalive_probes;
	r.user_timeout = icsk->icsk_user_timeout;
	r.hz = CONFIG_HZ;
	r.keepopen = (sk_flags(sk) >> bpf_core_enum_value(enum sock_flags, SOCK_KEEPOPEN)) & 1;
	if (p->exact && r.ino) {
		/* run._inspect: the kept sockets and those whose timer cannot settle keepalive
		 * (_may_need_options) are read; the second may be flagged by their options. */
		int may_need = !(r.timer == 0 && (state == ESTABLISHED || state == CLOSE_WAIT));

		if (keep || may_need) {
			k = r.keepopen ? KA_ON : KA_OFF;
			agg->inspected++;
			r.flags |= REC_READ;
		}
		if (!keep && may_need && (state == ESTABLISHED || state == CLOSE_WAIT)) {
			extra = could_flag_exact(p, &r, heard, idle);
			if (!extra && p->ported)
				extra = ported(ns, &r, heard, idle, 1);
		}
	}

	if (state < 16 && k < 3)
		agg->counts[state * 3 + k]++;
	if (state == ESTABLISHED && k < 3) {
		__u32 b = bucket(p, idle);

		if (b <= BUCKETS)
			agg->hist[k * (BUCKETS + 1) + b]++;
		agg->idle_ms_sum[k] += idle;
	}
	if (!keep && !extra)
		return 0;

	r.flags |= keep ? REC_KEPT : REC_EXTRA;
	r.cookie = bpf_get_socket_cookie(tp);
	r.family = skc->skc_family;
	if (r.family == 10) {
		BPF_CORE_READ_INTO(&r.src, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&r.dst, skc, skc_v6_daddr);
	} else {
		__be32 s = skc->skc_rcv_saddr, d = skc->skc_daddr;

		__builtin_memcpy(r.src, &s, 4);
		__builtin_memcpy(r.dst, &d, 4);
	}
	/* tcp_diag_get_info */
	{
		int rq = (int)(tp->rcv_nxt - tp->copied_seq);

		r.rqueue = rq > 0 ? rq : 0;
	}
	r.wqueue = tp->write_seq - tp->snd_una;
	r.uid = ctx->uid;
	if (bpf_seq_write(seq, &r, sizeof(r)) == 0)
		agg->handed++;
	return 0;
}
