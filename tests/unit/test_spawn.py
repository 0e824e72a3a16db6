"""Whether the console script starts the owner scan's child: not when BPF will load."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditd.kernel.owners.spawn import bpf_likely

ADMIN, BPF_PERFMON, BPF_ONLY, NONE = 1 << 21, (1 << 39) | (1 << 38), 1 << 39, 0


@pytest.mark.parametrize(
    ("caps", "btf", "likely"),
    [(ADMIN, True, True), (BPF_PERFMON, True, True), (BPF_ONLY, True, False),
     (NONE, True, False), (ADMIN, False, False)],
    ids=["sys_admin", "bpf+perfmon", "bpf-alone", "none", "no-btf"],
)  # fmt: skip
def test_bpf_likely_from_caps_and_btf(tmp_path: Path, caps: int, btf: bool, likely: bool) -> None:
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{caps:016x}\n")
    vmlinux = tmp_path / "vmlinux"
    if btf:
        vmlinux.write_bytes(b"\x9f\xeb")
    assert bpf_likely(str(status), str(vmlinux)) is likely


def test_unreadable_status_means_no(tmp_path: Path) -> None:
    assert bpf_likely(str(tmp_path / "missing"), str(tmp_path)) is False
    (tmp_path / "status").write_text("CapEff:\tzz\n")
    assert bpf_likely(str(tmp_path / "status"), str(tmp_path)) is False
