"""A lock on a run's output folder, held for the life of the run: one run writes a folder at a time.

The lock is ``<folder>/.cstoolkit.lock``, locked with ``fcntl.flock`` and holding the holder's PID.
The kernel drops a flock when its process ends (also on ``kill -9``), so the lock of a run that died
is simply taken over; where ``flock`` is missing (Windows, some network file systems) the PID in
the file is checked for a live process instead.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".cstoolkit.lock"

#: errno values of file systems that do not do flock (the PID check is used instead)
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError):
        return None


class FolderLock:
    """``with FolderLock(folder): ...`` (or :meth:`acquire` / :meth:`release`).

    :meth:`acquire` raises a :class:`UserError` at ``where`` naming the PID of a live holder.
    """

    def __init__(self, folder: str | Path, where: str = "runtime.output_dir"):
        self.folder = Path(folder)
        self.where = where
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy(self, pid: int | None) -> UserError:
        holder = f"PID {pid}" if pid is not None else "a process that has not written its PID yet"
        return UserError(self.where, f"{self.folder} is in use by another cstoolkit run ({holder})",
                         "wait for it to end or stop it, or set another runtime.output_dir")

    def acquire(self) -> "FolderLock":
        """Take the lock (the folder must exist); a live holder is a :class:`UserError` naming its PID."""
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                owner = _read_pid(fd)
                if not self._lock(fd, owner):
                    raise self._busy(owner)
                # the holder that just let go may have removed the file (and another run made a new one):
                # a lock on a file no longer at the path locks nothing
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        if owner is not None and owner != os.getpid():
            log.info("taking over the lock of %s from PID %d (no longer running)", self.folder, owner)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    @staticmethod
    def _lock(fd: int, owner: int | None) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
        return owner is None or owner == os.getpid() or not pid_alive(owner)

    def release(self) -> None:
        """Remove the lock file and let go (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
