"""Benchmark (not a test): what the fine-tuning instrumentation costs.

The same short LoRA training, once with every per-step log on (loss, grad norm, LR, tokens/s, peak memory,
Adam-moment snapshots) and once as a bare ``Trainer`` (no logging), alternated ``repeats`` times in one process;
the ratio of median times inside ``Trainer.train`` is printed and written to results/A_finetuning/benchmark.parquet.
Evaluation and checkpoints are off in both, so only the instrumentation differs. Target: at most 5 % overhead.

    python -m lab.finetune_bench [--profile cpu] [--steps 6] [--repeats 2] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import torch

from lab.tracks.A_finetuning.config import TRACK, finetune_config
from lab.train.lora import train_lora
from lab.models.loading import load_model
from lab.profiles import Profile, get_profile
from lab.results import write_result


def instrumentation_overhead(profile: str | Profile | None = None, steps: int = 6, repeats: int = 2,
                             write: bool = False) -> pl.DataFrame:
    """Median training time with all logging on vs off (same run, alternating); prints the ratio."""
    p = get_profile(profile)
    base_cfg = finetune_config(p)
    # every step a moment snapshot: the most instrumentation the track ever uses
    cfg = replace(base_cfg, n_train=steps * base_cfg.batch_size, epochs=1, moments_every=1)
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for mode in ("off", "on"):
                lm = load_model(p)
                res = train_lora(lm, cfg, Path(tmp) / f"{mode}{r}", resume=False, instrument=mode == "on",
                                 do_eval=False, save=False, progress=False)
                times[mode].append(res.trainer_time_s)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    frame = pl.DataFrame({
        "mode": ["logging off (bare Trainer)", "logging on (lab instrumentation)"],
        "median_s": [off, on],
        "runs_s": [", ".join(f"{t:.2f}" for t in times["off"]), ", ".join(f"{t:.2f}" for t in times["on"])],
        "ratio": [1.0, on / off],
        "steps": [steps, steps],
        "threads": [torch.get_num_threads()] * 2,
    })
    print(f"fine-tune instrumentation overhead: {steps} steps x {repeats} repeats, median off {off:.2f} s, "
          f"on {on:.2f} s, ratio {on / off:.3f} ({100 * (on / off - 1):+.1f} %)")
    if write:
        write_result(TRACK, "benchmark", frame, config={"finetune": cfg, "repeats": repeats}, seed=cfg.seed,
                     profile=p.name, wall_time_s=time.perf_counter() - t0)
    return frame


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.finetune_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="also write results/A_finetuning/benchmark.parquet")
    a = ap.parse_args(argv)
    instrumentation_overhead(a.profile, steps=a.steps, repeats=a.repeats, write=a.write)


if __name__ == "__main__":
    main()
