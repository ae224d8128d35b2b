"""The pretraining track's headline numbers (``results/pretrain/summary.parquet``, quoted by its site page)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from lab.data.corpus import Corpus
from lab.results import Summary
from lab.tracks.pretrain import frames
from lab.train.pretraining import PretrainConfig, TrainResult

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "final_val_loss",
    "best_val_loss",
    "tokens_per_s",
)


@dataclass(frozen=True)
class PretrainSummary(Summary):
    """One run of the profile's recipe. Losses are cross-entropies in nats per character."""

    final_val_loss: float  # held-out works, at max_iters (final_eval_iters batches)
    final_train_loss: float  # training text, same evaluation
    best_val_loss: float  # lowest validation estimate at any evaluation
    initial_val_loss: float  # at step 0, before any update
    uniform_loss: float  # ln V: cross-entropy of a uniform guess over the vocabulary
    gap_first_eval: float  # val - train at the first evaluation after step 0
    gap_final: float  # val - train at max_iters
    iters: int  # optimisation steps
    tokens_seen: int  # iters x batch_size x block_size
    n_params: int  # model parameters (tied embedding counted once)
    vocab_size: int  # distinct characters of the corpus
    train_chars: int
    val_chars: int
    wall_time_s: float  # summed over interrupted and resumed segments
    train_time_s: float  # in optimisation steps only
    tokens_per_s: float  # median over steps
    grad_norm_first_tenth: float  # gradient norm before clipping, median over the first tenth of training
    grad_norm_last_tenth: float  # ... and over the last tenth
    clipped_fraction: float  # share of steps whose gradient norm exceeded grad_clip
    resumed_from: int  # step the run resumed from; -1 when it ran uninterrupted


def summarize(cfg: PretrainConfig, corpus: Corpus, res: TrainResult) -> PretrainSummary:
    """The headline numbers of one training run."""
    steps, evals, _ = res.log.frames()
    val = evals.filter(pl.col("split") == "val")
    return PretrainSummary(
        final_val_loss=frames.eval_loss(evals, cfg.max_iters, "val"),
        final_train_loss=frames.eval_loss(evals, cfg.max_iters, "train"),
        best_val_loss=val["loss"].min(),
        initial_val_loss=frames.eval_loss(evals, 0, "val"),
        uniform_loss=math.log(res.tokenizer.vocab_size),
        gap_first_eval=frames.eval_gap(evals, cfg.eval_interval),
        gap_final=frames.eval_gap(evals, cfg.max_iters),
        iters=cfg.max_iters,
        tokens_seen=cfg.max_iters * cfg.batch_size * cfg.block_size,
        n_params=res.model.n_params(),
        vocab_size=res.tokenizer.vocab_size,
        train_chars=len(corpus.train_text),
        val_chars=len(corpus.val_text),
        wall_time_s=res.wall_time_s,
        train_time_s=res.train_time_s,
        tokens_per_s=steps["tokens_per_s"].median(),
        **frames.grad_norm_stats(steps, cfg.max_iters, cfg.grad_clip),
        resumed_from=res.resumed_from if res.resumed_from is not None else -1,
    )
