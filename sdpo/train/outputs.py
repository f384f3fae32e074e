"""What the trainer writes into ``--output-dir``: one handling for failed writes, atomic
replacement of a file or folder, and the lock that keeps a second run out of the folder.

Every writer of the trainer (metrics.jsonl, checkpoints, the export, validation images, tracker
files, config.json) runs inside ``writing(...)``: a full disk, a read-only file system, a quota or
a permission error becomes one ``WriteError`` naming the file and the cause, which
``sdpo-train`` prints as one line with exit status 1. The libraries under those writers do not
all raise OSError: torch's zip writer turns a failed ``write`` into ``RuntimeError: [enforce fail
at inline_container.cc:...] unexpected pos``, and safetensors raises ``SafetensorError: ... I/O
error: ... (os error 28)``. ``save_torch`` hands torch a file object that records the OSError its
write raised, so the cause is known exactly; elsewhere ``write_failure`` reads the errno from the
message or, failing that, looks at the folder (free space, read-only mount, permission).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from sdpo.train.errors import UsageError

# The causes a user fixes on the machine (free space, remount, permissions), in their words.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}

# Below this much free space a folder counts as full when a library's error gives no errno: a
# write that fails with more free than this has another cause (1 MiB: more than one block and
# one zip record header of torch's writer, far less than any checkpoint file).
FULL_BELOW_BYTES = 1 << 20

# Messages of library errors that mean "a write to the file failed": torch's zip writer (the
# short write of its C++ writer) and safetensors' I/O error.
_LIBRARY_WRITE_FAILURE = re.compile(
    r"inline_container\.cc|PytorchStreamWriter|unexpected pos|I/O error|IoError|os error \d+"
)
_OS_ERROR_NUMBER = re.compile(r"os error (\d+)|Errno (\d+)|code: (\d+)")

LOCK_FILE = ".sdpo-train.lock"

# The descriptors of the locks this process holds: a forked child (a DataLoader worker) closes its
# copies (close_inherited_locks), else a worker that outlives a killed trainer (up to 5 s, its
# watchdog's period) would keep the folder locked.
_HELD_LOCKS: set[int] = set()


class WriteError(RuntimeError):
    """A file of the run could not be written (full disk, read-only, quota, permission): one
    line naming the file and the cause. Earlier checkpoints are untouched."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate if candidate.is_dir() else candidate.parent
    return Path(".")


def _probe(path: Path) -> str | None:
    """The cause seen from the folder itself: full, mounted read-only, or not writable."""
    folder = _nearest_existing(Path(path))
    try:
        if shutil.disk_usage(folder).free < FULL_BELOW_BYTES:
            return WRITE_ERRNOS[errno.ENOSPC]
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return WRITE_ERRNOS[errno.EROFS]
    except OSError:
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return WRITE_ERRNOS[errno.EACCES]
    return None


def write_failure(error: BaseException, path: str | Path) -> str | None:
    """Why writing ``path`` failed, in a few words, when ``error`` is a failed write (an OSError,
    torch's zip writer error, a safetensors I/O error); None when it is something else (a bug,
    which keeps its traceback)."""
    if isinstance(error, WriteError):
        return str(error)
    if isinstance(error, OSError):
        if error.errno in WRITE_ERRNOS:
            return WRITE_ERRNOS[error.errno]
        return (error.strerror or str(error)).lower()
    text = str(error)
    if not isinstance(error, RuntimeError) and type(error).__name__ != "SafetensorError":
        return None
    if not _LIBRARY_WRITE_FAILURE.search(text):
        return None
    match = _OS_ERROR_NUMBER.search(text)
    if match:
        number = int(next(group for group in match.groups() if group))
        return WRITE_ERRNOS.get(number, os.strerror(number).lower())
    return _probe(Path(path)) or f"the write failed ({text.splitlines()[0][:120]})"


@contextlib.contextmanager
def writing(what: str, path: str | Path, doing: str = "writing") -> Iterator[None]:
    """Turns a failed write inside the block into WriteError('WHAT: CAUSE while DOING PATH')."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        reason = write_failure(error, path)
        if reason is None:
            raise
        raise WriteError(f"{what}: {reason} while {doing} {path}") from error


def as_write_error(error: OSError) -> WriteError | None:
    """For ``sdpo-train``'s last line of defence: an OSError of a full disk, a read-only file
    system or a quota that escaped every ``writing`` block, as the same one line."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    where = f" while writing {error.filename}" if error.filename else ""
    return WriteError(f"output: {WRITE_ERRNOS[error.errno]}{where}")


class _RecordingFile:
    """A binary file for ``torch.save`` that keeps the OSError its ``write`` raised: torch's zip
    writer replaces it with a RuntimeError ('unexpected pos'), and this is how the cause is kept."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.name = getattr(handle, "name", None)  # as a file object's: the path written
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _open_for_writing(path: Path):
    return open(path, "wb")


def save_torch(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)``, where a failed write raises the OSError that caused it."""
    with _open_for_writing(Path(path)) as handle:
        recorder = _RecordingFile(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError as error:
            if recorder.error is not None:
                raise recorder.error from error
            raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` to write (a file or a folder); on success it
    replaces ``path`` in one rename, on failure it is removed and ``path`` is left as it was."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(temporary)
        raise
    if temporary.is_dir() and path.exists():
        _remove(path)  # os.replace cannot put a folder over another (or over a file)
    os.replace(temporary, path)


class OutputLock:
    """An exclusive ``flock`` on ``DIR/.sdpo-train.lock`` for as long as the run lives: the kernel
    drops it when the process ends in any way (kill -9 too), so no stale lock is ever left to
    clear by hand. The file holds the holder's pid and host, for the refusal message."""

    def __init__(self, descriptor: int | None, path: Path) -> None:
        self.descriptor, self.path = descriptor, path

    def release(self) -> None:
        if self.descriptor is not None:
            # The file stays: removing it would let a run that opened it a moment ago lock an
            # unlinked file while a third run creates and locks a new one.
            with contextlib.suppress(OSError):
                fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            _HELD_LOCKS.discard(self.descriptor)
            self.descriptor = None


def close_inherited_locks() -> None:
    """In a forked child: closes its copies of the parent's lock descriptors. The parent's lock
    stays (it is released only when every copy is closed, or by an explicit unlock)."""
    for descriptor in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_LOCKS.clear()


def lock_output_dir(output_dir: str | Path) -> OutputLock:
    """Takes ``output_dir``'s lock (creating the folder), or UsageError naming the run that holds
    it. A file system without locks (some network mounts) gives a warning and no lock."""
    folder = Path(output_dir)
    path = folder / LOCK_FILE
    with writing("output_dir", folder, "creating"):
        folder.mkdir(parents=True, exist_ok=True)
    with writing("output_dir", path):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 256, 0).decode(errors="replace").split()
        os.close(descriptor)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "pid not yet written"
        raise UsageError(
            f"output_dir: {folder} is in use by another sdpo-train run ({who}; lock {path}); "
            "wait for it to end, stop it, or give another --output-dir"
        ) from None
    except OSError as error:  # ENOLCK, EINVAL: no locks on this file system
        os.close(descriptor)
        print(
            f"sdpo-train: warning: cannot lock {path} ({error.strerror}); a second run on this "
            "folder would not be refused",
            file=sys.stderr,
            flush=True,
        )
        return OutputLock(None, path)
    lock = OutputLock(descriptor, path)
    _HELD_LOCKS.add(descriptor)
    try:
        with writing("output_dir", path):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        lock.release()
        raise
    return lock
