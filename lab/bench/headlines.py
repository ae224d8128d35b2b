"""``lab bench headlines --before COMMIT``: each track's headline numbers (its summary module's ``HEADLINES``) as
committed at ``COMMIT`` beside the ones in the working tree, written to ``results/bench/headlines.parquet``.

This is how a change of how the tracks compute (the speed suite's fast paths) shows that the results did not move
beyond their noise: the "before" side is read from git, so the comparison can be remade at any later commit.

It also publishes ``results/bench/main_job.parquet``: each track's last measured wall time on the profile (from
``results/timings.parquet``, which ``lab run`` writes) in track order, and their sum as the row ``all tracks``.
"""

from __future__ import annotations

import io
import subprocess
import time

import polars as pl

from lab.errors import LabError
from lab.paths import DEFAULT_PROFILE, REPO_ROOT, results_root
from lab.profiles import Profile
from lab.results import TIMINGS, result_set, write_result

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
                    "before_value": float(a) if numeric else None,  # the same, as numbers where both are
                    "after_value": float(b) if numeric else None,
                    "change": float(b) - float(a) if numeric else None,
                    "relative_change": (float(b) - float(a)) / abs(float(a)) if numeric and a else None,
                    "same": a == b,
                }
            )
    return pl.DataFrame(rows)


def main_job(profile: Profile, tracks: list[str]) -> pl.DataFrame:
    """``track, wall_s, minutes, commit, finished_at`` per track of ``tracks`` that has a timing on ``profile``,
    then ``all tracks`` (the sum; its commit is the list of the tracks' commits)."""
    path = results_root(profile.name) / TIMINGS
    if not path.exists():
        raise LabError(f"{path} is missing: `lab run all --profile {profile.name}` records each track's time there")
    t = pl.read_parquet(path).filter(pl.col("profile") == profile.name)
    order = {n: i for i, n in enumerate(tracks)}
    t = t.filter(pl.col("track").is_in(tracks)).sort(pl.col("track").replace_strict(order))
    total = pl.DataFrame(
        {
            "track": ["all tracks"],
            "wall_s": [float(t["wall_s"].sum())],
            "commit": [", ".join(dict.fromkeys(c[:7] for c in t["commit"]))],
            "finished_at": [t["finished_at"].max()],
        }
    )
    frame = pl.concat([t.select("track", "wall_s", "commit", "finished_at"), total], how="vertical_relaxed")
    frame = frame.with_columns(minutes=pl.col("wall_s") / 60)
    return frame.select("track", "wall_s", "minutes", "commit", "finished_at")


def run(profile: Profile, before: str, fields_of: dict[str, tuple[str, ...]]) -> pl.DataFrame:
    """Compare and publish results/bench/headlines.parquet and main_job.parquet (the other files of results/bench/
    are kept)."""
    t0 = time.perf_counter()
    frame = compare(profile, before, fields_of)
    job = main_job(profile, list(fields_of))
    record = dict(seed=None, profile=profile.name)
    with result_set(FOLDER, profile.name):
        wall = time.perf_counter() - t0
        write_result(FOLDER, "headlines", frame, config={"before": before}, wall_time_s=wall, **record)
        write_result(FOLDER, "main_job", job, config={"tracks": list(fields_of)}, wall_time_s=0.0, **record)
    for r in job.iter_rows(named=True):
        print(f"main job: {r['track']:<14} {r['minutes']:6.1f} min  ({r['commit']})")
    return frame
