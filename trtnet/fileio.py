"""Atomic file writes: an interrupted run never leaves a half-written weights file or engine.

A write goes to `.NAME.XXXX.part` beside NAME and is renamed over NAME only once complete. The writer holds an
exclusive `flock` on its `.part` while writing; the kernel releases it when the process dies, even by SIGKILL.
So the next write of NAME removes the `.NAME.*.part` files nobody holds a lock on: those are the leftovers of a
killed run (a live writer, even a stopped one, keeps its lock). Where `flock` does not exist (Windows), nothing
is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trtnet.errors import TrtnetError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", expected_bytes: int | None = None) -> Iterator[IO]:
    """Write to a temporary file beside `path` and rename it over `path` only on success (text: UTF-8,
    whatever the locale says). With `expected_bytes`, refuse up front when the disk has less free space."""
    path = Path(path)
    fd, tmp = _open_part(path, expected_bytes)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                raise _no_space_error(path, exc, expected_bytes, _tell(f)) from exc
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _open_part(path: Path, expected_bytes: int | None) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise TrtnetError(f"cannot write {path}: it is a directory")
        remove_stale_parts(path)
        _check_free_space(path, expected_bytes)
        while True:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            if _lock(fd, tmp):
                return fd, tmp
            os.close(fd)  # another run's cleanup removed it between mkstemp and our lock: take a new name
    except OSError as exc:
        raise TrtnetError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _lock(fd: int, tmp: str) -> bool:
    """Lock our `.part` and say whether it is still the file at its name."""
    if fcntl is None:
        return True
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.stat(tmp).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def stale_parts(path: str | os.PathLike) -> list[Path]:
    """The `.NAME.*.part` files beside `path` that no live process is writing."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return [Path(e.path) for e in os.scandir(path.parent)
            if e.name.startswith(prefix) and e.name.endswith(".part") and e.is_file(follow_symlinks=False)
            and not _held(e.path)]


def remove_stale_parts(path: str | os.PathLike) -> None:
    for part in stale_parts(path):
        with contextlib.suppress(OSError):
            part.unlink()


def _held(part: str) -> bool:
    try:
        fd = os.open(part, os.O_RDONLY)
    except OSError:
        return True  # gone, or not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock


def _check_free_space(path: Path, expected_bytes: int | None) -> None:
    if not expected_bytes:
        return
    free = shutil.disk_usage(path.parent).free
    if free < expected_bytes:
        raise TrtnetError(f"cannot write {path}: it needs {_mb(expected_bytes)}, the disk has {_mb(free)} free")


def _no_space_error(path: Path, exc: OSError, expected_bytes: int | None, written: int | None) -> TrtnetError:
    try:
        free = _mb(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    needed = _mb(expected_bytes) if expected_bytes else f"more than {_mb(written or 0)}"
    return TrtnetError(f"cannot write {path}: {exc.strerror or 'no space left on device'} (it needs {needed}, "
                       f"{free} free); {path.name} was not replaced")


def _tell(f: IO) -> int | None:
    try:
        return f.tell()
    except (OSError, ValueError):
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
