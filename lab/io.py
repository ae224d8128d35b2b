"""Publishing files and folders atomically: the one way the lab writes anything another step reads.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temp file in the same folder, fsync, ``os.replace``;
  a crash leaves the previous file (or none), never a truncated one.
- :func:`publish_dir`: build a folder under a temporary sibling name, then swap it into place; a crash leaves the
  previous folder (or none) and a ``.<name>.<pid>.tmp`` sibling that the next publication of that folder clears.
  Its parts, :func:`new_stage`, :func:`swap_in` and :func:`discard`, are what :func:`lab.results.result_set`
  builds a track's result set with.
- :func:`sha256_file`, :func:`is_temporary`, :func:`parquet_bytes`: helpers of the writers and their checks.

The swap is one ``renameat2(RENAME_EXCHANGE)`` call on Linux, so a reader of the folder (or a kill -9 at any point)
sees the old folder or the new one, never a mix and never none. Elsewhere it is two renames; a kill between them
leaves no folder and the old one under ``.<name>.<pid>.old``, which the next publication puts back first.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path

import polars as pl

try:
    import fcntl
except ImportError:  # not POSIX: no lock, concurrent publishers of one folder are then not serialised
    fcntl = None  # type: ignore[assignment]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == tmp:  # write/fsync name no file; mkstemp names the temp one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """``frame`` serialised as Parquet."""
    buf = io.BytesIO()
    frame.write_parquet(buf)
    return buf.getvalue()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(name: str) -> bool:
    """A writer's temporary (``.<name>.<...>.tmp`` / ``.old``): never part of what a folder publishes."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


# ----------------------------------------------------------------------------- folders


@contextmanager
def publish_dir(folder: Path, *, replace: bool = True) -> Iterator[Path]:
    """``with publish_dir(dst) as work: <write into work>`` — ``dst`` appears complete or not at all.

    Args:
        folder: The folder to publish.
        replace: Replace an existing ``folder``; ``False`` keeps an existing one (another process got there first)
            and discards what was written.

    Yields:
        An empty work folder beside ``folder``; on success it is swapped in as ``folder``, on error it is removed.
    """
    stage = new_stage(folder)
    try:
        yield stage
    except BaseException:
        discard(stage)
        raise
    swap_in(stage, folder, replace=replace)


def new_stage(folder: Path) -> Path:
    """An empty work folder ``.<name>.<pid>.tmp`` beside ``folder``, after clearing what killed writers left."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(folder)
    stage = _sibling(folder, "tmp")
    stage.mkdir()
    return stage


def swap_in(
    stage: Path, folder: Path, *, replace: bool = True, merge: Callable[[Path, Path], None] | None = None
) -> None:
    """Put the finished ``stage`` in place of ``folder`` in one step (see the module docstring).

    Args:
        stage: A folder from :func:`new_stage`.
        folder: Where it goes.
        replace: Replace an existing ``folder``; ``False`` keeps it and discards ``stage``.
        merge: ``merge(current, stage)`` completes the stage from the current folder just before the swap, under a
            lock that serialises publishers of the folder's parent (so none loses what another published).
    """
    stage, folder = Path(stage), Path(folder)
    try:
        with _locked(folder.parent):
            if not folder.exists():
                stage.rename(folder)
                return
            if not replace:
                discard(stage)
                return
            if merge is not None:
                merge(folder, stage)
            if _exchange(stage, folder):
                discard(stage)  # it holds the previous folder now
                return
            old = _sibling(folder, "old")
            folder.rename(old)
            try:
                stage.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            discard(old)
    except BaseException:
        discard(stage)
        raise


def discard(stage: Path) -> None:
    """Remove a work folder (nothing when it is gone already)."""
    shutil.rmtree(stage, ignore_errors=True)


def copy_missing(current: Path, stage: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Copy the entries of ``current`` that ``stage`` lacks into it (links as links; temporaries and ``skip``
    left out), so that a stage holding some new files becomes the whole new folder."""
    for entry in sorted(current.iterdir()):
        target = stage / entry.name
        if is_temporary(entry.name) or entry.name in skip or target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(
                entry, target, symlinks=True, ignore=lambda _d, names: [n for n in names if is_temporary(n)]
            )
        else:
            shutil.copy2(entry, target)


def clear_stale(folder: Path) -> None:
    """Remove the temporaries that killed publishers of ``folder`` left beside it; put back a folder that a kill
    between the two renames of a fallback swap left as ``.<name>.<pid>.old``."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(folder.name)}(?:\.(\d+))?\.(tmp|old)$")
    for entry in sorted(folder.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or (m[1] is not None and _alive(int(m[1]))):
            continue
        if m[2] == "old" and not folder.exists():
            entry.rename(folder)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _sibling(folder: Path, kind: str) -> Path:
    return folder.with_name(f".{folder.name}.{os.getpid()}.{kind}")


def _alive(pid: int) -> bool:
    """Another running process has this id (this process's own leftovers are stale: sets never nest here)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder, held for the swap (a few milliseconds)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with suppress(OSError):  # a file system without locks: publish unserialised rather than not at all
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux ``renameat2``); False where the system cannot."""
    func = getattr(_libc(), "renameat2", None)
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
