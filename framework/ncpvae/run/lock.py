"""One writer per run directory: the operating-system lock a command holds while it writes a run.

Every command that writes a run directory (``train``, ``resume``, ``fit-prior``, ``sample``,
``evaluate``, ``compare-priors``) holds :func:`hold` on it for as long as it runs; a second
writer is refused at once with a :class:`RunLockedError` naming the holder, before it changes
anything. Commands that only read take no lock and are never blocked.

The lock is an exclusive ``flock`` on ``<run>/.lock`` (:data:`ncpvae.run.directory.LOCK_FILE`).
It belongs to the open file, so the kernel drops it when the holding process ends in any way,
``kill -9`` included: a lock never outlives its process. After taking it the holder writes who
it is into the file (:class:`Holder`: pid, command line, host, start time), which is what a
refused writer reports. On release the holder removes the file while still holding it; a
process that took the lock on a file removed meanwhile notices (the path no longer names the
file it locked) and tries again, so removal never lets two writers in. A ``kill -9`` leaves the
file behind, unlocked: the next writer takes it over.

POSIX systems use ``fcntl.flock``; elsewhere the ``filelock`` package (a dependency of PyTorch)
gives the same exclusion without the holder's details.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ncpvae.errors import NcpvaeError
from ncpvae.run.directory import LOCK_FILE

try:
    import fcntl
except ImportError:  # not POSIX: see _hold_portable
    fcntl = None  # type: ignore[assignment]

__all__ = ["Holder", "RunLockedError", "command_line", "hold", "read_holder"]


class RunLockedError(NcpvaeError):
    """Another process is writing the run directory; nothing was changed."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock: what ``<run>/.lock`` holds (as one JSON object)."""

    pid: int
    command: str
    host: str
    started: str  # UTC, ``2026-01-31 12:00:00 UTC``

    @classmethod
    def this_process(cls, command: str | None = None) -> Holder:
        return cls(pid=os.getpid(), command=command or shlex.join(sys.argv),
                   host=socket.gethostname(),
                   started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    def describe(self) -> str:
        """``pid 123 on host h, `ncpvae resume r`, since ...``."""
        return f"pid {self.pid} on host {self.host}, `{self.command}`, since {self.started}"


def command_line(argv: Sequence[str]) -> str:
    """``ncpvae ARGV`` as a shell would quote it, naming the torchrun launch it belongs to."""
    text = shlex.join(["ncpvae", *argv])
    world = os.environ.get("WORLD_SIZE")
    return f"{text} (rank 0 of {world} under torchrun)" if world else text


def read_holder(fd: int) -> Holder | None:
    """The holder recorded in an open lock file (None: not written yet, or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return Holder(pid=int(data["pid"]), command=str(data["command"]),
                      host=str(data["host"]), started=str(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refusal(run: Path, holder: Holder | None) -> RunLockedError:
    """The one-line error of a refused writer: the run, its holder and what to do."""
    if holder is None:
        return RunLockedError(
            f"'{run}' is being written by another process (not identified yet); wait for it to "
            "finish or stop it; the run is unchanged")
    where = "" if holder.host == socket.gethostname() else f" on {holder.host}"
    return RunLockedError(
        f"'{run}' is being written by another process ({holder.describe()}); wait for it to "
        f"finish or stop it (kill {holder.pid}{where}); the run is unchanged")


@contextmanager
def hold(run: str | os.PathLike[str], *, command: str | None = None,
         create: bool = False) -> Iterator[Path | None]:
    """Hold the writer lock of the run directory ``run`` while the block runs.

    Yields the lock file's path, or None where nothing is locked: ``run`` is not a directory
    (without ``create``; the command then fails with its own message), or the directory is one
    this process may not write (it cannot change the run). ``create`` makes the directory first
    (``ncpvae train``: the check for an existing run and its creation then happen under the
    lock) and removes again the folders it made if nothing but the lock was written into them.
    ``command`` is the holder's command line (default: ``sys.argv``).

    Raises :class:`RunLockedError` at once (no waiting) when another process holds the lock.
    """
    path = Path(run)
    made: list[Path] = []
    if create and not path.exists():
        made = [path, *(p for p in path.parents if not p.exists())]
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        yield None
        return
    try:
        if fcntl is None:
            with _hold_portable(path):
                yield path / LOCK_FILE
        else:
            with _hold_flock(path, Holder.this_process(command), create=create) as lock:
                yield lock
    finally:
        for folder in made:  # deepest first; a folder that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def _hold_flock(run: Path, holder: Holder, *, create: bool) -> Iterator[Path | None]:
    lock = run / LOCK_FILE
    fd = _acquire(lock, run, create=create)
    if fd is None:
        yield None
        return
    try:
        data = json.dumps(asdict(holder)).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        yield lock
    finally:
        if _names(lock, fd):  # remove the file before the lock goes (see the module docstring)
            lock.unlink(missing_ok=True)
        os.close(fd)


def _acquire(lock: Path, run: Path, *, create: bool) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive flock (None: not lockable here)."""
    assert fcntl is not None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited (PEP 446)
        except FileNotFoundError:  # the folder went away (another train removed what it made)
            if not create:
                return None
            run.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None  # a directory this process may not write: it cannot change the run
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise _refusal(run, holder) from None
        except OSError as exc:  # a file system without flock (some network mounts)
            os.close(fd)
            warnings.warn(f"cannot lock '{lock}' ({exc.strerror}); another process writing this "
                          "run at the same time would not be detected", stacklevel=3)
            return None
        if _names(lock, fd):
            return fd
        os.close(fd)  # locked a file its holder removed on release: lock the current one


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


@contextmanager
def _hold_portable(run: Path) -> Iterator[None]:
    """Without ``fcntl``: the ``filelock`` package's lock (the holder is not named)."""
    import filelock

    lock = filelock.FileLock(str(run / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise _refusal(run, None) from None
    try:
        yield
    finally:
        lock.release()
