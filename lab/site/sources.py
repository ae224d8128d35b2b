"""What the site's macros read: result files named by a reference, and one cell or a selection of rows of them.

A result reference is ``"<track>/<name>"`` (the ``cpu`` profile) or ``"<profile>/<track>/<name>"``, relative to
:func:`lab.paths.results_root` (so ``LAB_RESULTS_DIR`` works). A macro reads either the result's Parquet
(``data="parquet"``, the default) or the data its chart draws (``data="chart"``: the datasets inlined in the
``.vl.json``), so that a sentence can quote exactly what a figure shows. A missing result raises :class:`LabError`
with the command that makes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from lab.errors import LabError
from lab.paths import results_root
from lab.results import read_manifest
from lab.site.checks import check_result_file

DATA_KINDS = ("parquet", "chart")


def result_ref(ref: str) -> tuple[str, str, str]:
    """``"pretrain/loss"`` -> ``("cpu", "pretrain", "loss")``; ``"gpu/pretrain/x"`` -> ``("gpu", "pretrain", "x")``."""
    parts = ref.strip("/").split("/")
    if len(parts) == 2:
        return "cpu", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise LabError(f"result reference {ref!r} should be 'track/name' or 'profile/track/name'")


def result_file(ref: str, suffix: str) -> Path:
    """The file of a result (``.parquet`` or ``.vl.json``); :class:`LabError` with the command when it is missing."""
    profile, track, name = result_ref(ref)
    path = results_root(profile) / track / f"{name}{suffix}"
    if not path.exists() and track == "bench":
        raise LabError(
            f"{path} is missing (needed by the site): `lab bench all`, `lab bench cost` and "
            f"`lab bench headlines --before <commit>` (each with --profile {profile}) produce results/bench/"
        )
    if not path.exists():
        raise LabError(
            f"{path} is missing (needed by the site): run `lab run {track} --profile {profile}` "
            f"(or `python notebooks/{track}.py -- --profile {profile}`) to produce it"
        )
    return path


def site_path(ref: str, suffix: str) -> str:
    """Site path of a result file, e.g. ``results/pretrain/loss.vl.json``."""
    profile, track, name = result_ref(ref)
    prefix = "results" if profile == "cpu" else f"results/{profile}"
    return f"{prefix}/{track}/{name}{suffix}"


@lru_cache(maxsize=128)
def _read_parquet(path: Path, mtime: float) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception:  # a damaged file: say which and how to fix it, not polars' traceback
        raise LabError(check_result_file(path) or f"{path} is not readable Parquet") from None


@lru_cache(maxsize=128)
def _read_spec(path: Path, mtime: float) -> dict[str, Any]:
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        raise LabError(check_result_file(path) or f"{path} is not readable Vega-Lite JSON") from None


def read_frame_at(path: Path) -> pl.DataFrame:
    """A result's Parquet frame by path (cached while the file is unchanged)."""
    return _read_parquet(path, path.stat().st_mtime)


def read_frame(ref: str) -> pl.DataFrame:
    """The Parquet frame behind a result reference."""
    return read_frame_at(result_file(ref, ".parquet"))


def read_spec(ref: str) -> dict[str, Any]:
    """The Vega-Lite spec of a result reference, as written (do not modify: it is cached)."""
    path = result_file(ref, ".vl.json")
    return _read_spec(path, path.stat().st_mtime)


def chart_frame(ref: str, column: str | None = None) -> pl.DataFrame:
    """The rows a chart draws: its inlined dataset (the one holding ``column`` when it has several)."""
    spec = read_spec(ref)
    datasets = [rows for rows in (spec.get("datasets") or {}).values() if rows]
    if isinstance((spec.get("data") or {}).get("values"), list):
        datasets.append(spec["data"]["values"])
    if column is not None:
        datasets = [rows for rows in datasets if any(column in row for row in rows)]
    if not datasets:
        what = f" with a column {column!r}" if column else ""
        raise LabError(f"the chart {ref!r} inlines no dataset{what}: quote its Parquet instead (data='parquet')")
    return pl.DataFrame(datasets[0], infer_schema_length=None)


def read_provenance(ref: str) -> dict[str, Any]:
    """The manifest entry of a result reference."""
    profile, track, name = result_ref(ref)
    path = results_root(profile) / track / "manifest.json"
    manifest = read_manifest(path) if path.exists() else {}
    if name not in manifest:
        raise LabError(f"{path} has no entry for {name!r}: run `lab run {track} --profile {profile}` to produce it")
    return manifest[name]


def select(
    ref: str,
    columns: Sequence[str],
    *,
    where: Mapping[str, Any] | None = None,
    sort: str | Sequence[str] | None = None,
    data: str = "parquet",
) -> pl.DataFrame:
    """The rows of a result (or of its chart's data) with ``where``'s column values, sorted by ``sort``
    (column names; a leading ``-`` sorts descending), keeping ``columns`` and the filtered and sorted ones."""
    if data not in DATA_KINDS:
        raise LabError(f"data={data!r}: use one of {', '.join(DATA_KINDS)}")
    frame = read_frame(ref) if data == "parquet" else chart_frame(ref, columns[0] if columns else None)
    sort_by = [sort] if isinstance(sort, str) else list(sort or [])
    where = dict(where or {})
    needed = [*columns, *where, *(s.lstrip("-") for s in sort_by)]
    if missing := [c for c in needed if c not in frame.columns]:
        source = "chart data" if data == "chart" else "result"
        raise LabError(
            f"{source} {ref!r} has no column(s) {', '.join(map(repr, missing))} (columns: {', '.join(frame.columns)})"
        )
    for column, value in where.items():
        frame = frame.filter(pl.col(column).is_in(value) if isinstance(value, list) else pl.col(column) == value)
    if sort_by:
        frame = frame.sort(
            [s.lstrip("-") for s in sort_by], descending=[s.startswith("-") for s in sort_by], nulls_last=True
        )
    return frame


def cell(
    ref: str,
    column: str,
    *,
    row: int = -1,
    where: Mapping[str, Any] | None = None,
    sort: str | Sequence[str] | None = None,
    data: str = "parquet",
) -> Any:
    """One value: row ``row`` (after ``where`` and ``sort``; default the last) of ``column``."""
    frame = select(ref, [column], where=where, sort=sort, data=data)
    picked = f" where {dict(where)}" if where else ""
    if frame.height == 0:
        raise LabError(f"result {ref!r} has no rows{picked}: re-run `lab run {result_ref(ref)[1]}` or fix the filter")
    if not -frame.height <= row < frame.height:
        raise LabError(f"result {ref!r} has {frame.height} row(s){picked}: row {row} does not exist")
    value = frame[column][row]
    if value is None:
        raise LabError(f"result {ref!r} column {column!r} row {row}{picked} is null")
    return value
