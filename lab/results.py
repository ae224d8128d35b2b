"""Results writer: Parquet (polars) + Altair chart (.vl.json) + provenance, all written atomically.

Layout: ``<root>/<track>/<name>.parquet``, ``<root>/<track>/<name>.vl.json`` and one
``<root>/<track>/manifest.json`` mapping each result name to its provenance. Charts are always
built from the Parquet file as written, never from in-memory state the Parquet lacks.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from lab.errors import LabError
from lab.io import atomic_write_bytes, atomic_write_text, parquet_bytes
from lab.paths import REPO_ROOT, results_root

PACKAGES = ("torch", "transformers", "peft", "accelerate", "polars", "altair", "numpy", "marimo")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lab", "notebooks"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def _jsonable(config: Any) -> Any:
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    return json.loads(json.dumps(config, default=str))


def provenance(*, config: Any, seed: int | None, profile: str, wall_time_s: float) -> dict[str, Any]:
    """The provenance record stored beside every result."""
    return {
        "config": _jsonable(config),
        "seed": seed,
        "profile": profile,
        "git_commit": _git_commit(),
        "packages": _versions(),
        "hardware": _hardware(),
        "wall_time_s": round(float(wall_time_s), 3),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(
    track: str,
    name: str,
    frame: pl.DataFrame,
    *,
    config: Any,
    seed: int | None,
    profile: str,
    wall_time_s: float,
    chart: Callable[[pl.DataFrame], Any] | None = None,
    root: Path | None = None,
) -> Path:
    """Write one result: ``<name>.parquet``, optionally ``<name>.vl.json``, and its manifest entry.

    Args:
        track: Track folder, e.g. ``"pretrain"``.
        name: Result name inside the track.
        frame: The data.
        config: The experiment's config (dataclass or dict), stored as provenance.
        seed: Random seed used, or None.
        profile: Profile name.
        wall_time_s: Wall time of the work that produced ``frame``.
        chart: ``frame -> alt.Chart``; called on the frame *read back from the Parquet file*.
        root: Results root; defaults to :func:`results_root` of ``profile``.

    Returns:
        Path of the Parquet file.
    """
    if not isinstance(frame, pl.DataFrame):
        raise LabError(f"write_result({track}/{name}) needs a polars DataFrame, got {type(frame).__name__}")
    folder = (root if root is not None else results_root(profile)) / track
    folder.mkdir(parents=True, exist_ok=True)
    pq = folder / f"{name}.parquet"
    atomic_write_bytes(pq, parquet_bytes(frame))
    if chart is not None:
        spec = chart(pl.read_parquet(pq)).to_dict()
        try:  # NaN is not JSON: vega-embed would refuse the whole spec in the browser
            text = json.dumps(spec, indent=1, allow_nan=False)
        except ValueError:
            raise LabError(
                f"the chart of {track}/{name} contains NaN or infinity: filter them out in its plot function"
            ) from None
        atomic_write_text(folder / f"{name}.vl.json", text)
    record = provenance(config=config, seed=seed, profile=profile, wall_time_s=wall_time_s)
    record["files"] = [pq.name] + ([f"{name}.vl.json"] if chart is not None else [])
    update_manifest(folder, name, record)
    return pq


def update_manifest(folder: Path, name: str, record: dict[str, Any]) -> None:
    """Set ``manifest[name] = record`` in ``folder/manifest.json`` atomically."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[name] = record
    atomic_write_text(path, json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


def read_result(track: str, name: str, *, profile: str = "cpu", root: Path | None = None) -> pl.DataFrame:
    """Read a result's Parquet; a missing one raises :class:`LabError` naming the command that makes it."""
    pq = (root if root is not None else results_root(profile)) / track / f"{name}.parquet"
    if not pq.exists():
        raise LabError(f"{pq} is missing: run `lab run {track} --profile {profile}` to produce it")
    return pl.read_parquet(pq)


@dataclass(frozen=True)
class Summary:
    """Base of every track's summary: the headline numbers its site pages quote as
    ``value("<track>/summary", "<field>")``. Subclasses declare one typed, commented field per number, in the
    column order of ``summary.parquet``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def frame(self) -> pl.DataFrame:
        """One row, one column per field (what ``summary.parquet`` holds)."""
        return pl.DataFrame([asdict(self)])


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0
