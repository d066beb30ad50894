"""One training run per directory: a lock file holding the owner's pid.

On POSIX the lock is an flock on `<run dir>/train.lock`: the kernel drops it when the owner exits
in any way, SIGKILL included, so a lock left by a dead run is simply taken over.  Where flock is
missing (Windows) the file is created exclusively and a lock whose pid is no longer alive is
stale and taken over.  The pid in the file is only for the message a second run prints.
Re-entrant within a process: the trainer and the CLI around it may both hold it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: fall back to pid liveness
    fcntl = None

LOCK_NAME = "train.lock"
_held: dict[str, list] = {}  # resolved lock path -> [fd, refcount]


class RunLockedError(OutputError):
    """Another live process trains in this directory."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _owner(path: Path) -> tuple[int, str]:
    """(pid, description) read from a lock file; (0, '') when unreadable."""
    try:
        lines = path.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return 0, ""
    extra = ", ".join(x for x in lines[1:3] if x)
    return pid, extra


def _refuse(run_dir: Path, path: Path) -> RunLockedError:
    pid, extra = _owner(path)
    who = f"pid {pid}" + (f" ({extra})" if extra else "") if pid else "another process"
    return RunLockedError(f"{run_dir} is in use by another diffae train run ({who}); wait for it to finish, "
                          f"stop it, or choose another output directory (lock file {path})")


def _describe() -> str:
    return f"{os.getpid()}\n{socket.gethostname()}\nsince {time.strftime('%Y-%m-%d %H:%M:%S')}\n"


class RunLock:
    """with RunLock(run_dir): ...  raises RunLockedError naming the owner's pid if another live
    process holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create run directory {self.run_dir}: {exc.strerror or exc}") from None
        key = str(self.path.resolve())
        if key in _held:
            _held[key][1] += 1
        else:
            fd = self._lock_flock() if fcntl is not None else self._lock_exclusive()
            _held[key] = [fd, 1]
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.path.resolve())
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        try:  # unlink while still holding the lock; a waiter re-checks the inode
            self.path.unlink()
        except OSError:
            pass
        if fd is not None:
            os.close(fd)  # closing drops the flock

    # --- POSIX: flock ---------------------------------------------------------------------------
    def _lock_flock(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create lock file {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refuse(self.run_dir, self.path) from None
            except OSError:  # a filesystem without flock: use the pid protocol instead
                os.close(fd)
                return self._lock_exclusive()
            try:  # the file we locked may have been unlinked by its releasing owner meanwhile
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, _describe().encode())
            return fd

    # --- fallback: exclusive create + pid liveness -----------------------------------------------
    def _lock_exclusive(self):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, _ = _owner(self.path)
                if pid == 0 and _age(self.path) < 10.0:  # its owner may be writing its pid right now
                    raise _refuse(self.run_dir, self.path) from None
                if pid == os.getpid() or _pid_alive(pid):
                    raise _refuse(self.run_dir, self.path) from None
                try:  # stale: its owner is gone
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            except OSError as exc:
                raise OutputError(f"cannot create lock file {self.path}: {exc.strerror or exc}") from None
            os.write(fd, _describe().encode())
            os.close(fd)
            return None
        raise _refuse(self.run_dir, self.path)
