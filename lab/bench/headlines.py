"""``lab bench headlines --before COMMIT``: each track's headline numbers (its summary module's ``HEADLINES``) as
committed at ``COMMIT`` beside the ones in the working tree, written to ``results/bench/headlines.parquet``.

This is how a change of how the tracks compute (the speed suite's fast paths) shows that the results did not move
beyond their noise: the "before" side is read from git, so the comparison can be remade at any later commit.
"""

from __future__ import annotations

import io
import subprocess
import time

import polars as pl

from lab.errors import LabError
from lab.paths import DEFAULT_PROFILE, REPO_ROOT, results_root
from lab.profiles import Profile
from lab.results import result_set, write_result

FOLDER = "bench"


def committed_summary(commit: str, folder: str) -> dict | None:
    """The one row of ``<folder>/summary.parquet`` as committed at ``commit`` (None when it was not there)."""
    out = subprocess.run(
        ["git", "show", f"{commit}:{folder}/summary.parquet"], cwd=REPO_ROOT, capture_output=True, timeout=30
    )
    if out.returncode != 0:
        if b"does not exist" in out.stderr or b"exists on disk, but not in" in out.stderr:
            return None
        raise LabError(f"git cannot read commit {commit!r}: {out.stderr.decode().strip()}: name a commit of this repo")
    return pl.read_parquet(io.BytesIO(out.stdout)).row(0, named=True)


def committed_folder(profile: Profile, track: str) -> str:
    """Where the repository keeps ``track``'s results of ``profile`` (``results/<track>``, or
    ``results/<profile>/<track>`` for a profile other than the default)."""
    parts = ("results",) if profile.name == DEFAULT_PROFILE else ("results", profile.name)
    return "/".join((*parts, track))


def compare(profile: Profile, before: str, fields_of: dict[str, tuple[str, ...]]) -> pl.DataFrame:
    """One row per (track, headline) of ``fields_of`` (track -> its headline fields, :func:`lab.tracks.headlines`):
    its value at ``before`` and now, and the change."""
    root = results_root(profile.name)
    rows = []
    for track, fields in fields_of.items():
        path = root / track / "summary.parquet"
        now = pl.read_parquet(path).row(0, named=True) if path.exists() else {}
        then = committed_summary(before, committed_folder(profile, track)) or {}
        for field in fields:
            a, b = then.get(field), now.get(field)
            numeric = isinstance(a, int | float) and isinstance(b, int | float)
            rows.append(
                {
                    "track": track,
                    "field": field,
                    "before": None if a is None else str(a),
                    "after": None if b is None else str(b),
                    "change": float(b) - float(a) if numeric else None,
                    "relative_change": (float(b) - float(a)) / abs(float(a)) if numeric and a else None,
                    "same": a == b,
                }
            )
    return pl.DataFrame(rows)


def run(profile: Profile, before: str, fields_of: dict[str, tuple[str, ...]]) -> pl.DataFrame:
    """Compare and publish results/bench/headlines.parquet (the other files of results/bench/ are kept)."""
    t0 = time.perf_counter()
    frame = compare(profile, before, fields_of)
    with result_set(FOLDER, profile.name):
        write_result(
            FOLDER,
            "headlines",
            frame,
            config={"before": before},
            seed=None,
            profile=profile.name,
            wall_time_s=time.perf_counter() - t0,
        )
    return frame
