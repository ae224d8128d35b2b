"""The pretraining track's outline: train (or resume) the profile's recipe, summarise, write results/pretrain/,
then the position-embedding ablation and the throughput benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import polars as pl

from lab import paths
from lab.bench import pretrain as throughput
from lab.data.corpus import Corpus, load_corpus
from lab.profiles import Profile
from lab.results import result_set, write_result
from lab.tracks.pretrain import charts, frames
from lab.tracks.pretrain.config import TRACK, config_for
from lab.tracks.pretrain.summary import PretrainSummary, summarize
from lab.train.pretraining import PretrainConfig, TrainLog, TrainResult, train_gpt

# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[[pl.DataFrame], Any]] = {
    "loss": charts.plot_loss,
    "log": charts.plot_log,
    "ablation": charts.plot_ablation,
}


def run(
    profile: Profile,
    *,
    fresh: bool = False,
    write: bool = True,
    progress: bool = True,
    bench: bool = True,
    on_step: Callable[[int, TrainLog], None] | None = None,
    max_iters: int | None = None,
) -> PretrainSummary:
    """Train (resuming an interrupted run unless ``fresh``), then write loss, log, samples, summary, the
    position-embedding ablation and the throughput benchmark to results/pretrain/.

    Args:
        profile: The profile (its recipe is ``config.RECIPES[profile.name]``).
        fresh: Start over instead of resuming from the profile's checkpoint folder.
        write: Write results; ``False`` trains and returns the summary only (interactive exploration).
        progress: tqdm progress bar in the terminal.
        bench: Also run the throughput benchmark (:func:`benchmark`).
        on_step: Called after each step with (steps done, log so far).
        max_iters: Override the recipe's iteration count (then checkpoints go to a separate folder).
    """
    cfg = config_for(profile) if max_iters is None else replace(config_for(profile), max_iters=max_iters)
    corpus = load_corpus(profile)
    ckpt = checkpoint_folder(profile, max_iters)
    res = train_gpt(cfg, corpus, ckpt, resume=not fresh, on_step=on_step, progress=progress, device=device(profile))
    summary = summarize(cfg, corpus, res)
    if not write:
        return summary
    steps, _, samples = res.log.frames()
    config = {
        "pretrain": asdict(cfg),
        "corpus": corpus.name,
        "val_works": list(corpus.val_works),
        "resumed_from": res.resumed_from,
    }
    common = dict(config=config, seed=cfg.seed, profile=profile.name, wall_time_s=res.wall_time_s)
    with result_set(TRACK, profile.name):  # published together: these, the ablation and the benchmark
        write_result(TRACK, "loss", frames.loss_frame(res.log), chart=CHARTS["loss"], **common)
        write_result(TRACK, "log", steps, chart=CHARTS["log"], **common)
        write_result(TRACK, "samples", samples, **common)
        write_result(TRACK, "summary", summary.frame(), **common)
        if cfg.pos_emb == "rope":
            ablation(profile, cfg, corpus, res, ckpt, fresh=fresh, progress=progress)
        if bench:
            benchmark(profile)
    return summary


def ablation(
    profile: Profile, cfg: PretrainConfig, corpus: Corpus, rope: TrainResult, ckpt: Path, *, fresh: bool, progress: bool
) -> None:
    """nanoGPT's learned absolute position embeddings, everything else identical to the RoPE run ``rope``:
    write ``ablation`` (every evaluation of both) and ``ablation_summary`` (one row each)."""
    learned_cfg = replace(cfg, pos_emb="learned")
    learned = train_gpt(
        learned_cfg,
        corpus,
        ckpt.with_name(ckpt.name + "-learned"),
        resume=not fresh,
        progress=progress,
        device=device(profile),
    )
    logs = {"rope": rope.log, "learned": learned.log}
    common = dict(
        config={"rope": asdict(cfg), "learned": asdict(learned_cfg)},
        seed=cfg.seed,
        profile=profile.name,
        wall_time_s=learned.wall_time_s,
    )
    with result_set(TRACK, profile.name):  # joins run()'s set
        write_result(TRACK, "ablation", frames.ablation_frame(logs), chart=CHARTS["ablation"], **common)
        one_row_each = frames.ablation_summary_frame(logs, cfg.max_iters, cfg.grad_clip)
        write_result(TRACK, "ablation_summary", one_row_each, **common)


def benchmark(profile: Profile, *, steps: int = 200, warmup: int = 20) -> pl.DataFrame:
    """``lab bench pretrain``: lab's training loop vs a plain reference loop (:mod:`lab.bench.pretrain`) on the
    profile's recipe, written to results/pretrain/benchmark.parquet. Smoke times at most 20 steps after 3."""
    if profile.name == "smoke":
        steps, warmup = min(steps, 20), min(warmup, 3)
    cfg = config_for(profile)
    corpus = load_corpus(profile)
    t0 = time.perf_counter()
    frame = throughput.run(cfg, corpus, steps=steps, warmup=warmup)
    with result_set(TRACK, profile.name):  # alone (`lab bench`): the other files of the set are kept
        write_result(
            TRACK,
            "benchmark",
            frame,
            config={"steps": steps, "warmup": warmup},
            seed=cfg.seed,
            profile=profile.name,
            wall_time_s=time.perf_counter() - t0,
        )
    return frame


def checkpoint_folder(profile: Profile, max_iters: int | None = None) -> Path:
    """The run's checkpoints: one folder per profile, a separate one when ``max_iters`` overrides the recipe."""
    folder = paths.checkpoint_dir(profile.name, TRACK)
    return folder if max_iters is None else folder.with_name(f"{TRACK}-{max_iters}")


def device(profile: Profile) -> str:
    """The profile's device; a CUDA profile on a machine without CUDA is refused (never silently run on the CPU)."""
    return profile.require_device()
