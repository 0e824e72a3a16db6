"""The generic libbpf loader on the real kernel: open, load, attach, iterate, close; and its
failures, each a BpfUnavailable whose message carries libbpf's own log."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from auditd.errors import BpfUnavailable
from auditd.kernel.bpf import iterators
from auditd.kernel.bpf.iterators import Iterators
from auditd.kernel.bpf.libbpf import BpfObject, Libbpf, read_iter, system_libbpf
from auditd.kernel.bpf.records import SOCK_REC, OwnerRecord, OwnerTable

pytestmark = pytest.mark.kernel
BPF_DIR = Path(iterators.OBJECT_DIR)
DATA = Path(__file__).parent.parent / "data" / "bpf"


@pytest.fixture(scope="module")
def refused_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program the verifier refuses, built with the same compiler as the shipped ones."""
    if shutil.which("clang") is None:
        pytest.fail("clang is needed (installed by .ci/run)")
    out = tmp_path_factory.mktemp("bpf") / "refused.bpf.o"
    argv = ["clang", "-target", "bpf", "-O2", "-g", f"-I{BPF_DIR}", "-c"]
    subprocess.run([*argv, str(DATA / "refused.bpf.c"), "-o", str(out)], check=True)
    return out


def test_system_libbpf_is_1x() -> None:
    assert system_libbpf().version >= (1, 0)


def test_open_load_attach_iterate_close() -> None:
    obj = BpfObject.from_file(str(BPF_DIR / "sockets.bpf.o"))
    assert obj.programs() == ["keepalive_sockets"]
    obj.load()
    link = obj.attach("keepalive_sockets")
    assert link.fd >= 0
    data = read_iter(link.iter_fd())
    assert len(data) % SOCK_REC.size == 0
    with pytest.raises(BpfUnavailable, match="has no program nope"):
        obj.attach("nope")
    with pytest.raises(BpfUnavailable, match="has no loaded map"):
        obj.map_fd("nope")
    obj.close()
    obj.close()  # twice is fine
    with pytest.raises(BpfUnavailable, match="is closed"):
        obj.programs()


def test_context_manager_and_autoload() -> None:
    # A program left out of the load is not loaded: attaching it fails in libbpf.
    with BpfObject.from_file(str(BPF_DIR / "owners.bpf.o")) as obj:
        obj.set_autoload("keepalive_owners", False)
        obj.load()
        with pytest.raises(BpfUnavailable, match="attaching keepalive_owners"):
            obj.attach("keepalive_owners")


def test_verifier_refusal_carries_the_verifier_log(refused_object: Path) -> None:
    obj = BpfObject.from_file(str(refused_object))
    with pytest.raises(BpfUnavailable) as info:
        obj.load()
    obj.close()
    message = str(info.value)
    assert message.startswith("BPF: loading refused.bpf.o: Permission denied (libbpf: ")
    assert "invalid mem access" in message
    assert "\n" not in message


def test_not_an_object() -> None:
    with pytest.raises(BpfUnavailable, match=r"BPF object format invalid .*not a proper ELF"):
        BpfObject(b"\x7fELF but not really" * 4, "junk")


def test_missing_library() -> None:
    with pytest.raises(BpfUnavailable, match=r"cannot load libbpf-missing\.so\.1"):
        Libbpf("libbpf-missing.so.1")


def test_library_older_than_1_0(tmp_path: Path) -> None:
    # A shared object without the libbpf 1.x symbols: what an old or foreign libbpf.so.1 is.
    with pytest.raises(BpfUnavailable, match=r"older than libbpf 1\.0"):
        Libbpf("libc.so.6")


def test_iterators_keep_the_error_and_recover(tmp_path: Path) -> None:
    iters = Iterators(directory=str(tmp_path), retry_seconds=0)
    with pytest.raises(BpfUnavailable, match=r"cannot read .*sockets\.bpf\.o"):
        iters.ensure()
    assert iters.error is not None and not iters.loaded
    for name in ("sockets.bpf.o", "owners.bpf.o"):
        shutil.copy(BPF_DIR / name, tmp_path / name)
    iters.ensure()
    assert iters.loaded and iters.error is None
    with socket.socket() as sock:
        owners = OwnerTable(iters.owners())
        assert owners.get(os.fstat(sock.fileno()).st_ino) == OwnerRecord(
            os.getpid(), sock.fileno(), Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        )
    iters.close()
    assert not iters.loaded


def test_shipped_objects_are_stripped() -> None:
    for name in ("sockets.bpf.o", "owners.bpf.o"):
        data = (BPF_DIR / name).read_bytes()
        assert b".debug_info" not in data and b".BTF.ext" in data
        assert os.fsencode(os.getcwd()) not in data
