// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * iter/task_file: one record per open TCP/IPv4-or-IPv6 stream socket of every process,
 * across all network namespaces (socket inodes are global): what the scan of /proc/PID/fd finds,
 * in one kernel pass. Threads that share their leader's file table are skipped by the
 * kernel itself (kernel/bpf/task_iter.c, skip_if_dup_files). tgid is the pid as seen from
 * the initial pid namespace. Layout mirrored by auditd/kernel/bpf/records.py.
 */
#include "core.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define SOCK_STREAM 1
#define AF_INET 2
#define AF_INET6 10

struct owner_rec {
	__u64 ino;
	__u32 pid;
	__u32 fd;
	char comm[16];
};

SEC("iter/task_file")
int keepalive_owners(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct task_struct *task = ctx->task;
	struct owner_rec rec = {};
	struct socket *sock;
	struct inode *inode;
	unsigned short family;

	if (!file || !task)
		return 0;
	inode = BPF_CORE_READ(file, f_inode);
	if (!inode || (BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	if (!sock || BPF_CORE_READ(sock, type) != SOCK_STREAM)
		return 0;
	family = BPF_CORE_READ(sock, sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	rec.ino = BPF_CORE_READ(inode, i_ino);
	rec.pid = BPF_CORE_READ(task, tgid);
	rec.fd = ctx->fd;
	BPF_CORE_READ_STR_INTO(&rec.comm, task, comm);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
