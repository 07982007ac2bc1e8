"""Files that are whole or absent: atomic writes of a file or a folder (a temporary beside it, synced, then
renamed), writability checks before any work, one file lock (an flock on `<path>.lock`, shared or exclusive,
for checkpoints and token files), one sweep for the temporaries a killed run left, and OS errors in words."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Callable

from common import UserError, first_line

# ----------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    """The process umask. Reading it means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on any failure it
    is removed, so `path` only ever holds a complete file (the old one or the new one). The file gets
    the mode open() gives a new file (0666 less the umask), not mkstemp's private 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)  # the data is on the disk before the name points at it: after a power cut the
        os.replace(tmp, path)  # old file or the whole new one, never an empty "new" one
        fsync_path(directory, folder=True)  # and the rename itself is on the disk
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync_path(path: str, folder: bool = False) -> None:
    """Flush a file's (or a folder's entries') writes to the disk. A folder on a file system that cannot
    sync one (EINVAL) is let be."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not folder or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def os_reason(error: OSError) -> str:
    """An OSError's cause in a few words: "no space left on device", "permission denied"."""
    return os.strerror(error.errno).lower() if error.errno else first_line(error)


def check_writable(folder: str, flag: str) -> None:
    """Make `folder` and write, sync and remove a small file in it, so that an output folder a run cannot
    use (a file in the way, permissions, a read-only or full disk) stops it before any work, not at the
    first save after an epoch of it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lightgpt-probe-")
        try:
            os.write(fd, b"LightGPT checks that it can write here\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {folder} ({os_reason(e)})") from None


def remove_stale_temporaries(path: str, before: float) -> tuple[int, int]:
    """Remove the temporary files atomic_path(path) left when a run died while saving (kill -9, a power
    cut, a launcher's SIGKILL after its grace period), written before `before`: the time this run took the
    path's FileLock, so whoever wrote them is gone. Returns how many files and bytes were removed."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.[a-z0-9_]{8}\.tmp")  # atomic_path's names: mkstemp's 8 letters
    count = size = 0
    for entry in os.scandir(folder):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):  # another process sharing the lock removed it first
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime < before:
                    os.remove(entry.path)
                    count, size = count + 1, size + st.st_size
    return count, size


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; on success every file in it is synced and it is renamed to
    `path` (an existing one, which check_output allowed, is replaced), on any failure it is removed."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    os.chmod(tmp, 0o777 & ~current_umask())  # the mode a new folder gets, not mkdtemp's private 0700
    try:
        yield tmp
        for entry in os.scandir(tmp):
            fsync_path(entry.path)
        old = None
        if os.path.isdir(path):  # --overwrite: move the old folder aside, the new one in, then delete the old
            old = tmp[: -len(".tmp")] + ".old"
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_path(parent, folder=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- locks


class FileLock:
    """An flock on a lock file: exclusive while a run writes what it guards, shared while one only checks it.
    The kernel drops an flock when its holder dies, kill -9 included, so a crashed run leaves nothing stuck.
    The file is removed by whoever holds it last, exclusively; a process that finds its lock on a removed
    file opens the path afresh. An exclusive holder writes who it is (pid, host, start) into the file, so
    that a process it blocks can say who has it."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None
        self.exclusive = False
        self.since: float | None = None  # when this process took the lock

    def acquire(self, exclusive: bool = True, when_held: Callable[[str], None] | None = None) -> bool:
        """Take the lock. When another process holds it, when_held(what the holder wrote) is called first: it
        may raise (to give up at once) or return (to wait for the lock). False on a file system without flock;
        an OSError when the lock file can be neither made nor opened (a read-only folder without one)."""
        self.release(remove=False)  # from shared to exclusive: let go first, as flock would
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            fd = self._open()
            try:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    if when_held is not None:
                        when_held(os.pread(fd, 200, 0).decode(errors="replace").strip())
                    fcntl.flock(fd, mode)
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):  # not a lock file removed meanwhile
                    break
            except FileNotFoundError:
                pass  # removed meanwhile: open it afresh
            except OSError:  # a file system without flock
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self.fd, self.exclusive, self.since = fd, exclusive, time.time()
        if exclusive:
            with contextlib.suppress(OSError):  # a lock file opened read-only names no holder
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return True

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            try:
                return os.open(self.path, os.O_RDONLY)  # a read-only folder that has a lock file
            except OSError:
                raise e from None

    def release(self, remove: bool = True) -> None:
        """Let go; the last holder (exclusive, or shared with no other holder left) removes the file."""
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                if not self.exclusive:  # the last run holding it removes it; others still hold theirs
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.remove(self.path)  # while still held: no one can have locked this file meanwhile
        os.close(self.fd)  # drops the lock
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None


def write_refusal(folder: str) -> str | None:
    """Why the disk refuses a small write into `folder` (a full disk, a quota), or None when it takes one: for
    writers that report a failed write only as torch's zip writer does ("unexpected pos 704 vs 598")."""
    probe = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return os_reason(e)
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None
