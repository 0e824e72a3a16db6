#!/bin/sh
# Rebuilds the BPF objects shipped as package data, reproducibly: the same bytes from any
# checkout directory (-ffile-prefix-map strips the build path from the BTF line info;
# llvm-strip -g drops DWARF but keeps .BTF/.BTF.ext, which CO-RE needs).
# Needs clang, llvm (llvm-strip) and libbpf-dev (bpf_helpers.h). Usage: build.sh [OUTDIR]
set -eu
cd "$(dirname "$0")"
out="${1:-.}"
for src in sockets owners audit aborts; do
    clang -target bpf -O2 -g -Wall -Werror -ffile-prefix-map="$PWD"=. \
        -c "$src.bpf.c" -o "$out/$src.bpf.o"
    llvm-strip -g "$out/$src.bpf.o"
done
