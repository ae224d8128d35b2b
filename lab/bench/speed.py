"""The speed suite's common parts: timing alternated in one process, this machine's matmul peaks, and one row of
``results/bench/speed.parquet`` per workload.

Every workload module (``lab/bench/<workload>.py``) has ``measure(profile, *, repeats) -> Measurement``: the same work
done by today's baseline path (fp32 eager, one model at a time) and by the fast path, alternated ``repeats`` times
in the same process, with how many tokens one call processes and how many FLOPs one token costs. :func:`row` turns
that into the published row (tokens/s of both, speedup, model-FLOPs utilisation against the peak of the fast path's
number format measured in the same run). Nothing here writes; ``lab bench`` (``lab.tracks.bench``) does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lab.bench import check_counts

MIN_REPEATS = 5  # medians of at least this many alternated calls per path


@dataclass(frozen=True)
class Measurement:
    """One workload timed both ways (seconds per call, every call), and what a call computes."""

    workload: str  # e.g. "lora"
    baseline: str  # the path it is compared with, in words: "fp32 eager Trainer step"
    fast: str  # the fast path, in words: "bf16 base weights + fp32 LoRA, autocast"
    tokens_per_call: int  # tokens one call processes (the same in both paths)
    baseline_s: tuple[float, ...]
    fast_s: tuple[float, ...]
    flops_per_token: float  # model FLOPs of one token of this work (6N for a training step, 2N for a forward ...)
    fast_dtype: str = "bf16"  # "bf16" or "fp32": the peak the fast path's MFU is measured against
    target: float = 1.0  # speedup the issue asks for
    note: str = ""  # anything a reader needs to read the row (sizes, recipe)


def alternate(paths: dict[str, Callable[[], Any]], *, repeats: int = MIN_REPEATS, warmup: int = 1):
    """Seconds per call of each path, called in turn ``repeats`` times after ``warmup`` untimed rounds (so both see
    the same machine state: caches, clocks, other load)."""
    check_counts(repeats=repeats, warmup=warmup)
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: tuple(t) for name, t in times.items()}


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = MIN_REPEATS, inner: int = 8) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n``×``n`` by ``n``×``n`` matmul in ``dtype`` at the current thread count: the
    peak this machine reaches on a shape that suits its matrix units (the denominator of MFU)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e9


def peaks() -> dict[str, float]:
    """Matmul peaks of this run: ``{"fp32": GFLOP/s, "bf16": GFLOP/s}``."""
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}


def row(m: Measurement, peak: dict[str, float]) -> dict[str, Any]:
    """The published row of one measurement (medians of its calls)."""
    base, fast = statistics.median(m.baseline_s), statistics.median(m.fast_s)
    tps_base, tps = m.tokens_per_call / base, m.tokens_per_call / fast
    return {
        "workload": m.workload,
        "baseline": m.baseline,
        "fast_path": m.fast,
        "tokens_per_s_baseline": tps_base,
        "tokens_per_s": tps,
        "speedup": base / fast,
        "target": m.target,
        "meets_target": base / fast >= m.target,
        "mfu": tps * m.flops_per_token / (peak[m.fast_dtype] * 1e9),
        "mfu_baseline": tps_base * m.flops_per_token / (peak["fp32"] * 1e9),
        "peak_gflops_fp32": peak["fp32"],
        "peak_gflops_bf16": peak["bf16"],
        "threads": torch.get_num_threads(),
        "repeats": len(m.fast_s),
        "baseline_s": ", ".join(f"{t:.4g}" for t in m.baseline_s),
        "fast_s": ", ".join(f"{t:.4g}" for t in m.fast_s),
        "tokens_per_call": m.tokens_per_call,
        "flops_per_token": m.flops_per_token,
        "note": m.note,
    }
