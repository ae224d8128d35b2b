"""Publishing files and folders atomically: the one way the lab writes anything another step reads.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temp file in the same folder, fsync, ``os.replace``;
  a crash leaves the previous file (or none), never a truncated one.
- :func:`publish_dir`: build a folder under a temporary sibling name, then swap it into place; a crash leaves the
  previous folder (or none) and a ``.<name>.tmp`` sibling that the next call clears.
- :func:`parquet_bytes`: a polars frame as Parquet bytes, for the writers above.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl


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


@contextmanager
def publish_dir(folder: Path, *, replace: bool = True) -> Iterator[Path]:
    """``with publish_dir(dst) as work: <write into work>`` — ``dst`` appears complete or not at all.

    Args:
        folder: The folder to publish.
        replace: Replace an existing ``folder``; ``False`` keeps an existing one (another process got there first)
            and discards what was written.

    Yields:
        An empty work folder beside ``folder``; on success it is renamed to ``folder``, on error it is removed.
    """
    folder = Path(folder)
    work = folder.with_name(f".{folder.name}.tmp")
    if work.exists():  # left by a killed run
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if folder.exists():
        if not replace:
            shutil.rmtree(work)
            return
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        work.rename(folder)
        shutil.rmtree(old)
    else:
        work.rename(folder)
