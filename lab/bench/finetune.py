"""Benchmark (not a test): what the fine-tuning instrumentation costs.

The same short LoRA training, once with every per-step log on (loss, grad norm, LR, tokens/s, peak memory,
Adam-moment snapshots) and once as a bare ``Trainer`` (no logging), alternated ``repeats`` times in one process;
the ratio of median times inside ``Trainer.train`` is printed and returned. Evaluation and checkpoints are off in
both, so only the instrumentation differs. Target: at most 5 % overhead. ``lab bench finetune`` runs it through
the track that records it.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import polars as pl
import torch

from lab.bench import check_counts
from lab.profiles import Profile
from lab.train.lora import FinetuneConfig, fresh_base, train_lora


def bench_config(cfg: FinetuneConfig, steps: int) -> FinetuneConfig:
    """``cfg`` shortened to ``steps`` steps of one epoch, with a moment snapshot every step (the most
    instrumentation a run ever uses)."""
    return replace(cfg, n_train=steps * cfg.batch_size, epochs=1, moments_every=1)


def run(profile: Profile, cfg: FinetuneConfig, *, steps: int = 6, repeats: int = 2) -> pl.DataFrame:
    """Median training time of :func:`bench_config` ``(cfg, steps)`` on the profile's base model with all logging
    on vs off (same process, alternating, a fresh model each time). Prints the ratio; writes nothing.

    Returns:
        Two rows (off, on): median seconds, every run's seconds, ratio to off, steps, torch threads.
    """
    check_counts(steps=steps, repeats=repeats)
    short = bench_config(cfg, steps)
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for mode in ("off", "on"):
                res = train_lora(
                    fresh_base(profile),
                    short,
                    Path(tmp) / f"{mode}{r}",
                    resume=False,
                    instrument=mode == "on",
                    do_eval=False,
                    save=False,
                    progress=False,
                )
                times[mode].append(res.trainer_time_s)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    frame = pl.DataFrame(
        {
            "mode": ["logging off (bare Trainer)", "logging on (lab instrumentation)"],
            "median_s": [off, on],
            "runs_s": [", ".join(f"{t:.2f}" for t in times["off"]), ", ".join(f"{t:.2f}" for t in times["on"])],
            "ratio": [1.0, on / off],
            "steps": [steps, steps],
            "threads": [torch.get_num_threads()] * 2,
        }
    )
    print(
        f"fine-tune instrumentation overhead: {steps} steps x {repeats} repeats, median off {off:.2f} s, "
        f"on {on:.2f} s, ratio {on / off:.3f} ({100 * (on / off - 1):+.1f} %)"
    )
    return frame
