"""What the site build and ``lab questions`` check before they publish or cite a result file: no symbolic links,
Parquet readable, Vega-Lite JSON parses and holds no NaN or Infinity, every file listed in its track's
``manifest.json`` with a matching sha256 (:func:`lab.results.write_result` records them). Each problem is one line
naming the file and the fix. The one file outside a track folder, the run log ``results/timings.parquet``
(:data:`lab.results.TIMINGS`, rewritten by every ``lab run``), has no manifest: it is only checked readable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from lab.errors import LabError
from lab.io import sha256_file
from lab.paths import shown
from lab.results import MANIFEST, TIMINGS, read_manifest, rerun_command

RESULT_SUFFIXES = (".parquet", ".vl.json", MANIFEST)  # the files the site publishes and checks


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotFinite(name)


def check_results(root: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Every problem of the results under ``root``, one line each naming the file and the fix: a symbolic link,
    an unreadable Parquet or JSON file, a chart holding NaN or Infinity, a file its folder's manifest does not list
    with a matching sha256, a listed file that is missing. Hidden entries (the writers' temporaries and stages) and
    the top-level folders in ``skip`` are left out, as the site leaves them out."""
    root = Path(root)
    problems: list[str] = []
    if not root.is_dir():
        return problems
    for here, dirs, files in os.walk(root):  # does not follow links: each is reported instead
        folder = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (folder == root and d in skip))
        for name in sorted(dirs + files):
            if (folder / name).is_symlink():
                problems.append(  # named where it lies, not where it points
                    f"{shown(folder)}/{name} is a symbolic link (to {os.readlink(folder / name)}): results hold "
                    "regular files only; delete the link"
                )
        published = sorted(f for f in files if _published(f) and not (folder / f).is_symlink())
        if folder == root and TIMINGS in published:  # the run log: readable, no manifest
            published.remove(TIMINGS)
            if problem := _check_file(folder / TIMINGS, None, against_manifest=False):
                problems.append(problem)
        if published:
            problems += _check_folder(folder, published)
    return problems


def check_result_file(path: Path) -> str | None:
    """The problem of one result file (its folder's manifest read for the sha256), or None when it is sound."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    if path.name == MANIFEST:
        try:
            read_manifest(path)
        except LabError as e:
            return str(e)
        return None
    try:
        listed = _listed(read_manifest(manifest)) if manifest.is_file() else None
    except LabError as e:
        return str(e)
    return _check_file(path, listed)


def _published(name: str) -> bool:
    return not name.startswith(".") and name.endswith(RESULT_SUFFIXES)


def _listed(manifest: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """File name -> the sha256 its manifest entry records (None for an entry written without one)."""
    return {f: (r.get("sha256") or {}).get(f) for r in manifest.values() for f in r["files"]}


def _check_folder(folder: Path, names: list[str]) -> list[str]:
    problems: list[str] = []
    listed: dict[str, str | None] | None = None
    manifest_read = True
    if MANIFEST in names:
        try:
            listed = _listed(read_manifest(folder / MANIFEST))
        except LabError as e:  # one line for the manifest, not one more per file it no longer lists
            problems.append(str(e))
            manifest_read = False
    for name in names:
        if name != MANIFEST and (problem := _check_file(folder / name, listed, against_manifest=manifest_read)):
            problems.append(problem)
    present = set(os.listdir(folder))
    problems += [
        f"{shown(folder / MANIFEST)} lists {f}, which is missing: rerun `{rerun_command(folder)}`"
        for f in sorted(listed or {})
        if f not in present
    ]
    return problems


def _check_file(path: Path, listed: dict[str, str | None] | None, *, against_manifest: bool = True) -> str | None:
    """One result file: readable, finite (charts), and (``against_manifest``) listed in the manifest (``listed``;
    ``None``: there is none) with its hash."""
    fix = f"rerun `{rerun_command(path.parent)}`"
    try:
        if path.name.endswith(".vl.json"):
            json.loads(path.read_bytes(), parse_constant=_refuse_constant)
        else:
            pl.read_parquet(path)
    except _NotFinite as e:
        return f"{shown(path)} holds {e}, which is not JSON (browsers refuse the chart): {fix}"
    except OSError as e:
        return f"{shown(path)} cannot be read ({e.strerror or e}): {fix}"
    except Exception:  # polars and json raise many kinds for a damaged file
        kind = "Vega-Lite JSON" if path.name.endswith(".vl.json") else "Parquet"
        return f"{shown(path)} is not readable {kind} (truncated or corrupt): {fix}"
    if not against_manifest:
        return None
    manifest = shown(path.parent / MANIFEST)
    if listed is None:
        return f"{shown(path)} has no {MANIFEST} beside it: {fix}"
    if path.name not in listed:
        return f"{shown(path)} is not listed in {manifest}: {fix} (or delete the file)"
    if listed[path.name] is None:
        return f"{shown(path)} has no sha256 in {manifest} (written before checksums were recorded): {fix}"
    if sha256_file(path) != listed[path.name]:
        return f"{shown(path)} differs from the sha256 {manifest} records (changed after it was written): {fix}"
    return None
