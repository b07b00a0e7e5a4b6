"""An inter-process lock for the native build folder that survives a killed owner.

torch.utils.cpp_extension guards a build folder with a bare ``lock`` file and waits, silently and
forever, for it to disappear: a process killed during its first build (Ctrl-C, a CI timeout, OOM)
leaves that file behind and every later process hangs. kdengine takes its own lock first, a file
that records who holds it (host, pid, the process's start time, when), so that a later process can
tell a live build it should wait for from a leftover it can take over:

- owner on this host and no longer running (or its pid reused by another process): stale;
- owner on another host (a shared cache folder), or a record that cannot be read: stale once it
  is older than ``stale_after`` seconds, since no build takes that long.

Whoever holds kdengine's lock is the only process inside ``cpp_extension.load`` for that folder,
so a torch ``lock`` file found then is a leftover too and is removed. Waiting is never silent: the
first wait prints who is building, and again every ``report_every`` seconds, and it gives up with
an error that names the lock file after ``timeout`` seconds.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

LOCK_NAME = "kdengine-build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_STALE_AFTER_S = 3600.0


class BuildLockTimeout(RuntimeError):
    """Another live process held the build lock for longer than the timeout."""


def _process_start_ticks(pid: int) -> Optional[int]:
    """The start time of ``pid`` in clock ticks since boot (Linux), or None where unknown.

    Together with the pid it names one process: a pid reused after the owner died has a
    different start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def _owner_record() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_ticks": _process_start_ticks(pid),
        "time": time.time(),
    }


def read_owner(path: Path) -> Optional[dict]:
    """The owner record in lock file ``path``, or None if it is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(path: Path, stale_after: float = DEFAULT_STALE_AFTER_S) -> Optional[str]:
    """Why the lock at ``path`` is a leftover that may be taken over, or None if its owner may
    still be building (or the file is gone)."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    owner = read_owner(path)
    if owner is None:
        # A killed owner can die between creating the file and writing its record; give a live
        # one a moment to finish writing before calling an empty record stale.
        if age > 10.0:
            return f"its owner record is unreadable and it is {age:.0f} s old"
        return None
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_running(pid):
            return f"process {pid} that took it is no longer running"
        ticks = owner.get("start_ticks")
        now_ticks = _process_start_ticks(pid)
        if ticks is not None and now_ticks is not None and ticks != now_ticks:
            return f"process {pid} that took it has exited (its pid now belongs to another process)"
        return None
    if age > stale_after:
        return f"it was taken {age:.0f} s ago by {owner.get('host')}:{pid}, longer than any build"
    return None


def describe_owner(path: Path) -> str:
    owner = read_owner(path)
    if owner is None:
        return "another process"
    since = time.time() - float(owner.get("time", time.time()))
    return f"process {owner.get('pid')} on {owner.get('host')} (for {since:.0f} s)"


class BuildLock:
    """``with BuildLock(folder): ...`` holds the build lock of ``folder`` (see the module doc).

    ``log`` receives the progress lines (default: stderr), so a wait is never silent.
    """

    def __init__(
        self,
        folder: Path,
        *,
        timeout: Optional[float] = None,
        stale_after: Optional[float] = None,
        poll: float = 0.2,
        report_every: float = 30.0,
        log: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.timeout = _env_seconds("KDENGINE_BUILD_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S) if timeout is None else timeout
        self.stale_after = DEFAULT_STALE_AFTER_S if stale_after is None else stale_after
        self.poll = poll
        self.report_every = report_every
        self.log = log or _stderr_log
        self._fd: Optional[int] = None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.write(fd, json.dumps(_owner_record()).encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def acquire(self) -> None:
        start = time.monotonic()
        next_report = 0.0
        while not self._try_create():
            why = stale_reason(self.path, self.stale_after)
            if why is not None:
                self.log(f"kdengine: removing a stale build lock {self.path} ({why}; a build was "
                         f"interrupted) and building again")
                _unlink(self.path)
                continue
            waited = time.monotonic() - start
            if waited >= self.timeout:
                raise BuildLockTimeout(
                    f"waited {waited:.0f} s for the native build lock {self.path}, held by "
                    f"{describe_owner(self.path)}; if no kdengine build is running, delete that "
                    f"file (KDENGINE_BUILD_LOCK_TIMEOUT sets how long to wait)"
                )
            if waited >= next_report:
                self.log(f"kdengine: waiting for {describe_owner(self.path)}, which is compiling "
                         f"the native kernels in {self.folder} (lock {self.path})")
                next_report = waited + self.report_every
            time.sleep(self.poll)
        torch_lock = self.folder / TORCH_LOCK_NAME
        if torch_lock.exists():
            # Every process takes this lock before torch's, so nobody can be inside torch's now.
            self.log(f"kdengine: removing {torch_lock}, left by an interrupted build")
            _unlink(torch_lock)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _unlink(self.path)

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {raw!r}")
    return value


def _stderr_log(msg: str, stream: Optional[TextIO] = None) -> None:
    print(msg, file=stream or sys.stderr, flush=True)
