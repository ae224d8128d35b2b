"""``lab bench all`` and ``lab bench <workload>``: the speed suite, written to ``results/bench/speed.parquet``.

Each workload's module measures today's baseline path and the fast path alternated in one process
(:mod:`lab.bench.speed`); the matmul peaks that MFU is measured against are taken once per run, before the
workloads. Running one workload replaces its row and keeps the others' (each row carries its own peaks and
commit), so the table can be refreshed a workload at a time.
"""

from __future__ import annotations

import importlib
import time

import polars as pl

from lab.bench import speed
from lab.errors import LabError
from lab.paths import results_root
from lab.profiles import Profile
from lab.results import git_commit, result_set, write_result

FOLDER = "bench"  # results/bench/
# workload -> the function that measures it; in the order the table lists them
WORKLOADS: dict[str, str] = {
    "lora": "lab.bench.lora:measure",
    "generation": "lab.bench.generation:measure",
    "transcoder": "lab.bench.transcoder:measure",
    "harvest": "lab.bench.transcoder:measure_harvest",
    "wind": "lab.bench.wind:measure",
    "pretrain": "lab.bench.pretrain:measure",
    "attribution": "lab.bench.attribution:measure",
}


def measure_fn(workload: str):
    """The ``measure(profile, *, repeats)`` function of ``workload``."""
    if workload not in WORKLOADS:
        raise LabError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)} or 'all'")
    module, name = WORKLOADS[workload].split(":")
    return getattr(importlib.import_module(module), name)


def previous(profile: Profile) -> pl.DataFrame | None:
    """The committed speed table of ``profile``, if there is one."""
    path = results_root(profile.name) / FOLDER / "speed.parquet"
    return pl.read_parquet(path) if path.exists() else None


def run(profile: Profile, workloads: list[str] | None = None, *, repeats: int = speed.MIN_REPEATS) -> pl.DataFrame:
    """Measure ``workloads`` (default: all) and publish results/bench/speed.parquet; returns the whole table."""
    names = list(WORKLOADS) if not workloads else workloads
    fns = {w: measure_fn(w) for w in names}  # every name checked before anything is timed
    t0 = time.perf_counter()
    peak = speed.peaks()
    print(f"matmul peaks: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
    commit = git_commit()
    rows = []
    for name, fn in fns.items():
        print(f"== bench {name} ==", flush=True)
        r = speed.row(fn(profile, repeats=repeats), peak) | {"commit": commit}
        rows.append(r)
        print(
            f"{name}: {r['tokens_per_s_baseline']:.1f} -> {r['tokens_per_s']:.1f} tokens/s, "
            f"{r['speedup']:.2f}x (target {r['target']:g}x), MFU {100 * r['mfu']:.1f} %",
            flush=True,
        )
    table = pl.DataFrame(rows)
    old = previous(profile)
    if old is not None:
        kept = old.filter(~pl.col("workload").is_in(names))
        table = pl.concat([kept, table], how="diagonal_relaxed")
    order = {w: i for i, w in enumerate(WORKLOADS)}
    table = table.sort(pl.col("workload").replace_strict(order, default=len(order)))
    with result_set(FOLDER, profile.name):
        write_result(
            FOLDER,
            "speed",
            table,
            config={"workloads": names, "repeats": repeats},
            seed=None,
            profile=profile.name,
            wall_time_s=time.perf_counter() - t0,
        )
    return table
