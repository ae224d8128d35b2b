"""Training a transformer on the HMM wind tunnel (:mod:`lab.data.hmm`): fresh HMMs every step, the authors' soft
cross-entropy against the exact forward-algorithm posterior, KL and entropy MAE logged at the training length and
at a longer one (the length-extrapolation test).

The loop is :func:`lab.train.windtunnel.fit`'s (AdamW, warmup then cosine, clipping, bf16 autocast and compile as
``TrainConfig`` says) with the HMM's batches and loss; a finished run is cached the same way
(:func:`lab.train.windtunnel.save_run`, keyed by the model, config, seed and both lengths).
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import torch
import torch.nn as nn

from lab.data.hmm import VOCAB, HMMBatch, hmm_metrics, sample_hmm_batch, seq_len, soft_cross_entropy, state_log_probs
from lab.errors import LabError
from lab.models.gpt import GPT, GPTConfig
from lab.models.windtunnel import ModelSpec
from lab.train.pretraining import autocast, training_forward
from lab.train.schedule import adamw
from lab.train.windtunnel import RunResult, TrainConfig, load_cached, logits_of, run_folder, save_run


def build_hmm_model(spec: ModelSpec, K_max: int) -> GPT:
    """A GPT over the HMM vocabulary whose positions reach ``K_max`` observations (seed torch first)."""
    if spec.kind != "transformer":
        raise LabError(f"the HMM wind tunnel trains a transformer, got a {spec.kind}")
    return GPT(
        GPTConfig(
            vocab_size=VOCAB,
            block_size=seq_len(K_max),
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            d_model=spec.d_model,
            pos_emb="learned",
        )
    )


@torch.no_grad()
def evaluate_hmm(model: nn.Module, batch: HMMBatch, chunk: int = 512) -> dict[str, float]:
    """KL (bits) and entropy MAE (bits) of the model's state posteriors on ``batch``, and both at its last position."""
    was = model.training
    model.eval()
    logp = torch.cat(
        [state_log_probs(logits_of(model, batch.tokens[i : i + chunk])) for i in range(0, len(batch.tokens), chunk)]
    )
    model.train(was)
    m = hmm_metrics(logp, batch.posterior)
    return {
        "kl_bits": m["kl"].mean().item(),
        "mae_bits": m["abs_err"].mean().item(),
        "kl_last_bits": m["kl"][:, -1].mean().item(),
    }


def per_position(model: nn.Module, batch: HMMBatch) -> pl.DataFrame:
    """KL and entropy MAE (bits) at every observation position t = 1..K of ``batch``."""
    with torch.no_grad():
        m = hmm_metrics(state_log_probs(logits_of(model.eval(), batch.tokens)), batch.posterior)
    return pl.DataFrame(
        {
            "t": list(range(1, batch.K + 1)),
            "kl_bits": m["kl"].mean(0).tolist(),
            "mae_bits": m["abs_err"].mean(0).tolist(),
            "h_bayes": m["h_bayes"].mean(0).tolist(),
        }
    )


def train_hmm(
    spec: ModelSpec,
    cfg: TrainConfig,
    seed: int,
    ckpt_root: Path,
    *,
    K: int,
    K_long: int,
    fresh: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train (or load) one transformer on HMM sequences of ``K`` observations; its log holds the metrics at ``K``
    (``kl_bits``, ``mae_bits``) and at ``K_long`` (``long_kl_bits``, ``long_mae_bits``) on fixed evaluation sets."""
    if K_long < K:
        raise LabError(f"the extrapolation length K_long={K_long} must be at least the training length K={K}")
    name = f"hmm-K{K}"
    folder = run_folder(ckpt_root, name, K_long, spec, cfg, seed, K)  # (the V and match slots hold the lengths)
    torch.manual_seed(seed)
    model = build_hmm_model(spec, K_long)
    if not fresh and (cached := load_cached(name, folder, model)) is not None:
        return cached
    ev_gen = torch.Generator().manual_seed(cfg.eval_seed)
    ev, ev_long = sample_hmm_batch(cfg.eval_sequences, K, ev_gen), sample_hmm_batch(cfg.eval_sequences, K_long, ev_gen)
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    step_forward = training_forward(lambda tokens: logits_of(model, tokens), cfg.compile)
    rows, losses, train_s = [], [], 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=name, unit="step", leave=False)

    def log_eval(step: int) -> None:
        short, long = evaluate_hmm(model, ev), evaluate_hmm(model, ev_long)
        rows.append(
            {
                "step": step,
                "train_s": train_s,
                "train_loss": sum(losses) / len(losses) if losses else float("nan"),
                **short,
                **{f"long_{k}": v for k, v in long.items()},
            }
        )
        losses.clear()
        if bar is not None:
            bar.set_postfix(kl=f"{short['kl_bits']:.4f}")

    model.train()
    log_eval(0)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        b = sample_hmm_batch(cfg.batch_size, K, gen)
        with autocast(cfg.precision, "cpu"):
            logits = step_forward(b.tokens)
        loss = soft_cross_entropy(state_log_probs(logits), b.posterior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_s += time.perf_counter() - t0
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log_eval(step + 1)
    if bar is not None:
        bar.close()
    model.eval()
    return save_run(folder, name, K_long, spec, cfg, seed, K, model, pl.DataFrame(rows), train_s)
