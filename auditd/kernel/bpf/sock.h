/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reads every program needs from a full socket, with their CO-RE fallbacks. Include after
 * core.h and <bpf/bpf_core_read.h>.
 */
#ifndef KEEPALIVE_AUDITD_SOCK_H
#define KEEPALIVE_AUDITD_SOCK_H

/* The socket's flags (SOCK_KEEPOPEN...): in sock_common since 6.18, in struct sock before. */
static __always_inline unsigned long sk_flags(struct sock *sk)
{
	struct sock___flags_in_sock *old = (void *)sk;

	if (bpf_core_field_exists(old->sk_flags))
		return BPF_CORE_READ(old, sk_flags);
	return BPF_CORE_READ(sk, __sk_common.skc_flags);
}

/* The socket's inode, 0 if it has no struct socket (in an accept queue). SOCK_INODE(): the
 * inode sits next to the socket in struct socket_alloc. */
static __always_inline __u64 sock_ino(struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct socket_alloc *alloc;

	if (!sock)
		return 0;
	alloc = (void *)sock - bpf_core_field_offset(struct socket_alloc, socket);
	return BPF_CORE_READ(alloc, vfs_inode.i_ino);
}

#endif
