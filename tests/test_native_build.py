"""The native build never hangs on a leftover lock and uses a read-only cache as it is.

The end-to-end tests build a one-function extension (a few seconds of compiling, not the whole
kernel library) in a subprocess with its own ``KDENGINE_CACHE``: killed mid-build, the next run
must take the lock over with a message and finish; a complete build in a read-only folder must
load without writing anything.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdengine import _build_lock
from kdengine._build_lock import LOCK_NAME, TORCH_LOCK_NAME, BuildLock, BuildLockTimeout, stale_reason

TINY_CPP = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
static at::Tensor tiny_twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY_FRAGMENT(kdengine_cpu, m) { m.def("tiny_twice(Tensor x) -> Tensor", &tiny_twice); }
"""

# Runs kdengine's real build entry point on the tiny source tree in argv[1].
LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from kdengine import _native
    _native.CSRC = Path(sys.argv[1])
    _native.load("cpu")
    print("RESULT", torch.ops.kdengine_cpu.tiny_twice(torch.ones(3)).tolist(), flush=True)
""")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_record(path: Path, **fields) -> None:
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": None, "time": time.time()}
    rec.update(fields)
    path.write_text(json.dumps(rec))


# --------------------------------------------------------------------------- source collection


def test_every_source_goes_into_exactly_one_library():
    """csrc/<op>/ and csrc/common/: *.cu and *_cuda.cpp build the CUDA library, other *.cpp the CPU
    one, *_emul.cu (test-only host emulations) neither; object files are named by the source's
    base name, so a name may occur once per library."""
    from kdengine import _native

    cpu, cuda = _native.sources("cpu"), _native.sources("cuda")
    everything = sorted(p for p in _native.CSRC.rglob("*") if p.suffix in (".cpp", ".cu"))
    assert set(cpu).isdisjoint(cuda)
    for f in everything:
        want = (None if f.name.endswith("_emul.cu") else
                "cuda" if f.suffix == ".cu" or f.name.endswith("_cuda.cpp") else "cpu")
        assert (f in cpu, f in cuda) == (want == "cpu", want == "cuda"), f
    for lib in (cpu, cuda):
        names = [f.name for f in lib]
        assert len(names) == len(set(names)), names
    assert {f.parent.name for f in cpu} >= {"common", "kd_loss", "binary", "if_multistep", "topk_kd"}
    assert {f.parent.name for f in cuda} >= {"kd_loss", "binary", "if_multistep"}


def test_build_name_covers_headers_in_every_folder(tmp_path, monkeypatch):
    from kdengine import _native

    csrc = tmp_path / "csrc"
    (csrc / "common").mkdir(parents=True)
    (csrc / "op").mkdir()
    (csrc / "op" / "op.cpp").write_text('#include "common/x.h"\n')
    (csrc / "op" / "op_emul.cu").write_text("// test-only\n")
    header = csrc / "common" / "x.h"
    header.write_text("// one\n")
    monkeypatch.setattr(_native, "CSRC", csrc)
    assert _native.sources("cpu") == [csrc / "op" / "op.cpp"] and _native.sources("cuda") == []
    before = _native.build_paths("cpu")[0]
    header.write_text("// two\n")
    assert _native.build_paths("cpu")[0] != before


def test_kernel_ops_take_their_schema_from_the_one_definition():
    """Every native kernel op of torch.ops.kdengine has the schema of kdengine/_schemas.py (the
    libraries only add kernels) and a CPU kernel; defining again is a no-op."""
    import torch

    from kdengine import _native, _schemas

    if not _native.status("cpu").available:
        pytest.skip(_native.status("cpu").reason)
    _schemas.define()
    for name, schema in _schemas.schemas().items():
        registered = torch._C._get_schema(f"kdengine::{name}", "")
        assert registered == torch._C.parse_schema(f"kdengine::{schema}"), name
        assert _native.has_op("cpu", name), name


# --------------------------------------------------------------------------- the lock itself


def test_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    _write_record(tmp_path / LOCK_NAME, pid=_dead_pid())
    (tmp_path / TORCH_LOCK_NAME).write_text("")  # torch's bare lock, left by the same kill
    lines: list[str] = []
    with BuildLock(tmp_path, timeout=5, log=lines.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (tmp_path / TORCH_LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()
    text = "\n".join(lines)
    assert "stale" in text and "no longer running" in text
    assert TORCH_LOCK_NAME in text


def test_a_live_owner_is_waited_for_aloud_then_a_clear_timeout(tmp_path):
    holder = BuildLock(tmp_path, log=lambda m: None)
    holder.acquire()
    try:
        lines: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(BuildLockTimeout, match=LOCK_NAME) as info:
            BuildLock(tmp_path, timeout=0.6, poll=0.05, log=lines.append).acquire()
        assert time.monotonic() - t0 < 5
        assert lines and "waiting for process" in lines[0] and str(os.getpid()) in lines[0]
        assert "delete that file" in str(info.value)
    finally:
        holder.release()


def test_waiter_proceeds_when_the_owner_finishes(tmp_path):
    import threading

    holder = BuildLock(tmp_path, log=lambda m: None)
    holder.acquire()
    threading.Timer(0.3, holder.release).start()
    with BuildLock(tmp_path, timeout=10, poll=0.05, log=lambda m: None):
        pass


def test_reused_pid_is_stale(tmp_path):
    ticks = _build_lock._process_start_ticks(os.getpid())
    if ticks is None:
        pytest.skip("no /proc/<pid>/stat start time on this system")
    _write_record(tmp_path / LOCK_NAME, start_ticks=ticks + 12345)
    assert "another process" in stale_reason(tmp_path / LOCK_NAME)
    _write_record(tmp_path / LOCK_NAME, start_ticks=ticks)
    assert stale_reason(tmp_path / LOCK_NAME) is None


def test_unreadable_record_is_stale_only_once_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # a kill between creating the file and writing the record
    assert stale_reason(lock) is None
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert "unreadable" in stale_reason(lock)


def test_other_host_is_stale_only_after_stale_after(tmp_path):
    lock = tmp_path / LOCK_NAME
    _write_record(lock, host=socket.gethostname() + "-elsewhere", pid=1)
    assert stale_reason(lock, stale_after=100) is None
    old = time.time() - 200
    os.utime(lock, (old, old))
    assert "longer than any build" in stale_reason(lock, stale_after=100)


def test_bad_timeout_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KDENGINE_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="KDENGINE_BUILD_LOCK_TIMEOUT"):
        BuildLock(tmp_path)


# --------------------------------------------------------------------------- end to end


def _tiny_tree(tmp_path: Path) -> Path:
    csrc = tmp_path / "csrc"
    (csrc / "tiny").mkdir(parents=True)
    (csrc / "tiny" / "tiny.cpp").write_text(TINY_CPP)
    return csrc


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["KDENGINE_CACHE"] = str(cache)
    env.pop("KDENGINE_BUILD_LOCK_TIMEOUT", None)
    return env


def _run_load(csrc: Path, cache: Path, timeout: float, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", LOAD_SCRIPT, str(csrc)], env=_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def _kill_during_build(csrc: Path, cache: Path) -> None:
    """Start a build and SIGKILL it (and its compiler) while it holds its lock(s)."""
    proc = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(csrc)], env=_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            locks = list(cache.rglob(TORCH_LOCK_NAME)) + list(cache.rglob(LOCK_NAME))
            if locks and list(cache.rglob("build.ninja")):  # compiling now
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(cache.rglob(TORCH_LOCK_NAME)) or list(cache.rglob(LOCK_NAME)), \
        "the kill left no lock file, so this test would not test anything"


@pytest.mark.slow
def test_interrupted_first_build_does_not_hang_the_next_run(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build with")
    csrc, cache = _tiny_tree(tmp_path), tmp_path / "cache"
    _kill_during_build(csrc, cache)
    try:
        done = _run_load(csrc, cache, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the run after an interrupted build still waited after 240 s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT [2.0, 2.0, 2.0]" in done.stdout
    assert "stale build lock" in done.stderr or "left by an interrupted build" in done.stderr
    assert "compiling the C++ kernels" in done.stderr
    # The build folder is complete now: the next run loads without compiling or locking.
    again = _run_load(csrc, cache, timeout=120)
    assert again.returncode == 0 and "RESULT" in again.stdout
    assert "compiling" not in again.stderr


def _ro_mount_prefix(folder: Path) -> list[str]:
    """A command prefix that runs the command with ``folder`` bind-mounted read-only over itself
    in a private mount namespace (as root, or in a user namespace where those are allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount the cache read-only")
    f = str(folder)
    script = f'mount --bind "{f}" "{f}" && mount -o remount,ro,bind "{f}" && exec "$@"'
    probe = subprocess.run([unshare, "-rm", "sh", "-c", script, "sh", "touch", f + "/probe"],
                           capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()[:200]}")
    return [unshare, "-rm", "sh", "-c", script, "sh"]


@pytest.mark.slow
def test_read_only_cache_with_a_built_library_is_used_as_is(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build with")
    csrc, cache = _tiny_tree(tmp_path), tmp_path / "cache"
    built = _run_load(csrc, cache, timeout=240)
    assert built.returncode == 0, built.stderr[-3000:]
    # Leftover lock files must not matter either: a complete build is loaded without locking.
    build_dir = next(p.parent for p in cache.rglob("*.so"))
    (build_dir / TORCH_LOCK_NAME).write_text("")
    prefix = _ro_mount_prefix(cache)
    ro = _run_load(csrc, cache, timeout=120, prefix=prefix)
    assert ro.returncode == 0, ro.stderr[-3000:]
    assert "RESULT [2.0, 2.0, 2.0]" in ro.stdout
    assert "Read-only" not in ro.stderr and "compiling" not in ro.stderr


def test_read_only_cache_without_a_library_says_so(tmp_path):
    csrc, cache = _tiny_tree(tmp_path), tmp_path / "cache"
    cache.mkdir()
    prefix = _ro_mount_prefix(cache)
    script = LOAD_SCRIPT.replace('_native.load("cpu")', textwrap.dedent('''
        try:
            _native.load("cpu")
        except _native.NativeBuildError as exc:
            print("ERROR", exc, flush=True)
            raise SystemExit(0)
    ''').strip())
    out = subprocess.run([*prefix, sys.executable, "-c", script, str(csrc)], env=_env(cache),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ERROR" in out.stdout and "KDENGINE_CACHE" in out.stdout
