"""Results writer: Parquet (polars) + Altair chart (.vl.json) + provenance, published as one set per track.

Layout: ``<root>/<track>/<name>.parquet``, ``<root>/<track>/<name>.vl.json`` and one
``<root>/<track>/manifest.json`` mapping each result name to its provenance and each of its files' sha256 and size.
Charts are always built from the Parquet file as written, never from in-memory state the Parquet lacks.

- :func:`write_result` writes one result; inside :func:`result_set` the track's files are staged and swapped in
  together, so a reader never sees a loss curve of one run beside the summary of another.
- :func:`read_manifest`: a manifest, or :class:`LabError` naming the fix (:mod:`lab.site.checks` verifies the files
  against it before the site publishes them).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from lab.errors import LabError
from lab.io import (
    atomic_write_bytes,
    atomic_write_text,
    copy_missing,
    discard,
    is_temporary,
    new_stage,
    parquet_bytes,
    swap_in,
)
from lab.paths import DEFAULT_PROFILE, REPO_ROOT, results_root, shown

PACKAGES = ("torch", "transformers", "peft", "accelerate", "polars", "altair", "numpy", "marimo")


def git_commit() -> str:
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
        "git_commit": git_commit(),
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
    """Write one result: ``<name>.parquet``, optionally ``<name>.vl.json``, and its manifest entry (provenance and
    each file's sha256 and size). Inside :func:`result_set` of the track the files are staged and appear with the
    rest of the set; outside one, each file is replaced atomically on its own.

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
        Path of the Parquet file (in the stage while a set is open).

    Raises:
        LabError: ``frame`` is not a polars frame, the chart holds NaN, or the folder cannot be written (disk full,
            not writable); the previous files are then unchanged.
    """
    if not isinstance(frame, pl.DataFrame):
        raise LabError(f"write_result({track}/{name}) needs a polars DataFrame, got {type(frame).__name__}")
    live = _track_folder(track, profile, root)
    folder = _OPEN_SETS.get(live, live)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pq = folder / f"{name}.parquet"
        written = {pq.name: parquet_bytes(frame)}
        atomic_write_bytes(pq, written[pq.name])
        if chart is not None:
            spec = chart(pl.read_parquet(pq)).to_dict()
            try:  # NaN is not JSON: vega-embed would refuse the whole spec in the browser
                text = json.dumps(spec, indent=1, allow_nan=False)
            except ValueError:
                raise LabError(
                    f"the chart of {track}/{name} contains NaN or infinity: filter them out in its plot function"
                ) from None
            written[f"{name}.vl.json"] = text.encode("utf-8")
            atomic_write_bytes(folder / f"{name}.vl.json", written[f"{name}.vl.json"])
        record = provenance(config=config, seed=seed, profile=profile, wall_time_s=wall_time_s)
        record["files"] = list(written)
        record["sha256"] = {f: hashlib.sha256(data).hexdigest() for f, data in written.items()}
        record["bytes"] = {f: len(data) for f, data in written.items()}
        update_manifest(folder, name, record)
    except OSError as e:
        raise _write_error(e, live, stage=folder if folder != live else None) from e
    return pq


def rechart(track: str, profile: str, charts: dict[str, Callable[..., Any]], *, root: Path | None = None) -> list[str]:
    """Rebuild each ``<name>.vl.json`` of ``charts`` (a track's ``CHARTS``: result name -> ``frame -> chart``) from
    the committed ``<name>.parquet``, without re-running the track; the manifest's sha256 and sizes follow, and the
    new files are published as one set (:func:`result_set`). A chart function with a ``needs`` attribute (names of
    other results of the set) is called ``fn(frame, **{name: frame_of_name})``. Names without a Parquet file are
    skipped. Every chart is built before anything is written, so a failing one leaves the set unchanged.

    Returns:
        The result names whose chart was rebuilt (changed or not).

    Raises:
        LabError: the track has no manifest, a chart holds NaN, or the folder cannot be written.
    """
    live = _track_folder(track, profile, root)
    manifest = read_manifest(live / MANIFEST) if (live / MANIFEST).exists() else None
    if manifest is None:
        raise LabError(f"{shown(live / MANIFEST)} is missing: run `{rerun_command(live)}` first")
    specs: dict[str, bytes] = {}
    for name, fn in charts.items():
        pq = live / f"{name}.parquet"
        if not pq.exists() or name not in manifest:
            continue
        others = {n: pl.read_parquet(live / f"{n}.parquet") for n in getattr(fn, "needs", ())}
        spec = fn(pl.read_parquet(pq), **others).to_dict()
        try:  # as write_result writes it, byte for byte
            specs[name] = json.dumps(spec, indent=1, allow_nan=False).encode("utf-8")
        except ValueError:
            raise LabError(
                f"the chart of {track}/{name} contains NaN or infinity: filter them out in its plot function"
            ) from None
    with result_set(track, profile, root=root) as stage:
        try:
            for name, data in specs.items():
                file = f"{name}.vl.json"
                atomic_write_bytes(stage / file, data)
                record = dict(manifest[name])
                record["files"] = list(dict.fromkeys([*record["files"], file]))
                record["sha256"] = {**record.get("sha256", {}), file: hashlib.sha256(data).hexdigest()}
                record["bytes"] = {**record.get("bytes", {}), file: len(data)}
                update_manifest(stage, name, record)
        except OSError as e:
            raise _write_error(e, live, stage=stage) from e
    return list(specs)


def update_manifest(folder: Path, name: str, record: dict[str, Any]) -> None:
    """Set ``manifest[name] = record`` in ``folder/manifest.json`` atomically (an unreadable manifest is started
    afresh: the files it listed are then unlisted, which :func:`lab.site.checks.check_results` reports)."""
    path = folder / MANIFEST
    manifest = _manifest_or_empty(path)
    manifest[name] = record
    _write_manifest(path, manifest)


# ----------------------------------------------------------------------------- result sets

_OPEN_SETS: dict[Path, Path] = {}  # live track folder -> its stage, while a result_set is open


@contextmanager
def result_set(track: str, profile: str, *, root: Path | None = None) -> Iterator[Path]:
    """``with result_set(track, profile): write_result(...)...`` — the track's files are published together.

    Inside, :func:`write_result` stages the track's files in a work folder beside it; on success the work folder,
    completed with the files of the current set it did not rewrite (and the current manifest's other entries), is
    swapped in with one rename (:func:`lab.io.swap_in`). On an error, Ctrl-C or kill -9 the previous set stays
    whole. A set opened again for the same folder inside the first joins it (pretrain's results, ablation and
    benchmark are one set); ``lab bench`` alone opens a set holding the benchmark only, and keeps the other files.

    Yields:
        The stage folder (results written there can be read back before the set is published).

    Raises:
        LabError: the results folder is not writable or the disk is full; the previous set is then unchanged.
    """
    live = _track_folder(track, profile, root)
    if live in _OPEN_SETS:
        yield _OPEN_SETS[live]
        return
    _check_writable(live)
    try:
        stage = new_stage(live)
    except OSError as e:
        raise _write_error(e, live, stage=live) from e
    _OPEN_SETS[live] = stage
    try:
        yield stage
    except BaseException:
        discard(stage)
        raise
    finally:
        del _OPEN_SETS[live]
    try:
        swap_in(stage, live, merge=_complete_set)
    except OSError as e:
        raise _write_error(e, live, stage=stage) from e


def _complete_set(current: Path, stage: Path) -> None:
    """The stage plus what the current set holds that it did not rewrite, with one merged manifest."""
    copy_missing(current, stage, skip=(MANIFEST,))
    manifest = _manifest_or_empty(current / MANIFEST) | _manifest_or_empty(stage / MANIFEST)
    if manifest:
        _write_manifest(stage / MANIFEST, manifest)


def _track_folder(track: str, profile: str, root: Path | None) -> Path:
    return Path(os.path.abspath((root if root is not None else results_root(profile)) / track))


def _check_writable(folder: Path) -> None:
    for path in (folder, *folder.parents):
        if path.exists():
            if not os.access(path, os.W_OK | os.X_OK):
                raise LabError(
                    f"{shown(path)} is not writable: make it writable (chmod u+w {shown(path)}) and run the command "
                    "again; the results already there are unchanged"
                )
            if path != folder:
                return


def _write_error(e: OSError, live: Path, *, stage: Path | None) -> LabError:
    """One line for a failed write: the file (as it would be published), the reason, the fix, what survived."""
    path = Path(os.fsdecode(e.filename)) if e.filename else live
    if stage is not None and path.is_relative_to(stage):
        path = live / path.relative_to(stage)
    if is_temporary(path.name):  # an atomic write's temp file: name its folder
        path = path.parent
    kept = f"the previous results in {shown(live)} are unchanged" if stage else "the previous file is unchanged"
    return LabError(
        f"could not write {shown(path)} ({e.strerror or e}): free disk space or make {shown(live)} writable, then "
        f"run the command again; {kept}"
    )


# ----------------------------------------------------------------------------- manifests

MANIFEST = "manifest.json"


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """A track's manifest (result name -> provenance); :class:`LabError` naming the fix when it is unreadable."""
    try:
        manifest = json.loads(Path(path).read_bytes())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise LabError(
            f"{shown(path)} is not valid JSON (truncated or corrupt): rerun `{rerun_command(Path(path).parent)}` "
            "to rewrite it"
        ) from None
    if not isinstance(manifest, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("files"), list) for r in manifest.values()
    ):
        raise LabError(
            f"{shown(path)} is not a lab manifest (result name -> provenance with its files): rerun "
            f"`{rerun_command(Path(path).parent)}` to rewrite it"
        )
    return manifest


def _manifest_or_empty(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        return read_manifest(path)
    except LabError:
        return {}


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


def rerun_command(folder: Path) -> str:
    """The command that rewrites a track's results folder, e.g. ``lab run pretrain --profile smoke``."""
    from lab.profiles import PROFILES

    profile = folder.parent.name
    flag = f" --profile {profile}" if profile in PROFILES and profile != DEFAULT_PROFILE else ""
    return f"lab run {folder.name}{flag}"


def read_result(track: str, name: str, *, profile: str = "cpu", root: Path | None = None) -> pl.DataFrame:
    """Read a result's Parquet; a missing one raises :class:`LabError` naming the command that makes it."""
    pq = (root if root is not None else results_root(profile)) / track / f"{name}.parquet"
    if not pq.exists():
        raise LabError(f"{pq} is missing: run `lab run {track} --profile {profile}` to produce it")
    return pl.read_parquet(pq)


TIMINGS = "timings.parquet"  # results/timings.parquet: the main job's wall time per track


def record_timing(track: str, profile: str, wall_s: float, *, root: Path | None = None) -> pl.DataFrame:
    """Replace ``track``'s row of ``<results>/timings.parquet`` (``track, profile, wall_s, commit, finished_at``)
    with this run's wall time, keeping the other tracks' rows; written atomically. Returns the table."""
    path = (root if root is not None else results_root(profile)) / TIMINGS
    row = pl.DataFrame(
        {
            "track": [track],
            "profile": [profile],
            "wall_s": [float(wall_s)],
            "commit": [git_commit()],
            "finished_at": [datetime.now(UTC).isoformat(timespec="seconds")],
        }
    )
    if path.exists():
        try:
            old = pl.read_parquet(path)
        except Exception as e:  # a damaged table is rebuilt from this run on (its rows are measurements, not results)
            print(f"lab: warning: {shown(path)} was unreadable ({type(e).__name__}); starting it again")
            old = row.clear()
        row = pl.concat([old.filter(pl.col("track") != track), row], how="diagonal_relaxed")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, parquet_bytes(row))
    return row


@dataclass(frozen=True)
class Summary:
    """Base of every track's summary: the headline numbers its site pages quote as
    ``value("<track>/summary", "<field>")``. Subclasses declare one typed, commented field per number, in the
    column order of ``summary.parquet``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """``field=value, ...`` with floats to four significant digits: what a script run prints when done."""
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.as_dict().items())

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
