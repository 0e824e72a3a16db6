/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The few kernel types the iterators read, declared for CO-RE instead of the 2.8 MB
 * generated vmlinux.h. preserve_access_index makes every field access a relocation that
 * libbpf resolves against the running kernel's BTF (/sys/kernel/btf/vmlinux): only the
 * names matter here, not the offsets or the other fields, which are left out.
 */
#ifndef KEEPALIVE_AUDITD_CORE_H
#define KEEPALIVE_AUDITD_CORE_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;
typedef __u32 __wsum;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u16 umode_t;
typedef __u32 uid_t;
typedef int pid_t;

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

typedef struct {
	struct net *net;
} possible_net_t;

struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	unsigned long skc_flags; /* 6.18: sk_flags lives here (include/net/sock.h) */
};

struct hlist_node {
	struct hlist_node *next;
	struct hlist_node **pprev; /* NULL: not pending (timer_pending, include/linux/timer.h) */
};

struct timer_list {
	struct hlist_node entry;
	unsigned long expires; /* jiffies */
};

struct inode {
	umode_t i_mode;
	unsigned long i_ino;
};

struct socket {
	short type;
	struct file *file;
	struct sock *sk;
};

struct socket_alloc {
	struct socket socket;
	struct inode vfs_inode;
};

struct sock {
	struct sock_common __sk_common;
	struct socket *sk_socket;
	struct timer_list sk_timer; /* the keepalive (and FIN_WAIT2) timer */
};

/* Before sk_flags moved into sock_common it was a field of struct sock. */
struct sock___flags_in_sock {
	unsigned long sk_flags;
};

struct inet_sock {
	struct sock sk;
};

struct inet_connection_sock {
	struct inet_sock icsk_inet;
	struct timer_list icsk_retransmit_timer; /* 6.18: its expires is icsk_timeout() */
	__u32 icsk_rto; /* jiffies */
	__u8 icsk_retransmits;
	__u8 icsk_pending; /* ICSK_TIME_* */
	__u8 icsk_backoff;
	__u8 icsk_probes_out;
	struct {
		__u32 lrcvtime; /* tcp_jiffies32 of the last data received */
	} icsk_ack;
	__u32 icsk_user_timeout; /* ms; 0: not set */
};

/* Before 6.14 (commit "tcp: remove icsk->icsk_timeout") the expiry was a field of its own. */
struct inet_connection_sock___timeout {
	unsigned long icsk_timeout;
};

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u32 keepalive_time;  /* jiffies; 0: the namespace's tcp_keepalive_time */
	__u32 keepalive_intvl; /* jiffies; 0: tcp_keepalive_intvl */
	__u8 keepalive_probes; /* 0: tcp_keepalive_probes */
	__u32 copied_seq;
	__u32 write_seq;
	__u32 lsndtime; /* tcp_jiffies32 of the last data sent */
	__u32 rcv_nxt;
	__u32 snd_una;
	__u32 srtt_us; /* << 3 */
	__u32 packets_out;
	__u32 rcv_tstamp; /* tcp_jiffies32 of the last ACK received */
	__u32 total_retrans;
};

struct file {
	struct inode *f_inode;
	void *private_data; /* struct socket * for a socket file (net/socket.c sock_alloc_file) */
};

struct task_struct {
	pid_t tgid;
	char comm[16];
};

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	uid_t uid;
};

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

#pragma clang attribute pop

enum sock_flags {
	SOCK_KEEPOPEN = 3, /* include/net/sock.h; relocated by bpf_core_enum_value */
};

#endif
