"""Pretraining track: a tiny character-level GPT on Shakespeare, written to results/pretrain/."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import altair as alt
import polars as pl
import torch

from lab.data.corpus import load_corpus
from lab import paths
from lab.train.pretraining import TrainLog, train_gpt
from lab.profiles import Profile, get_profile
from lab.results import write_result

TRACK = "pretrain"
NANOGPT_CPU_VAL_LOSS = 1.88  # nanoGPT README, CPU run of train_shakespeare_char (Karpathy)


def loss_frame(log: TrainLog) -> pl.DataFrame:
    """Long format (step, series, loss): per-batch training loss plus train/val estimates at evaluations."""
    steps, evals, _ = log.frames()
    batch = steps.select("step", pl.lit("train (batch)").alias("series"), "loss")
    ev = evals.select("step", (pl.col("split") + " (eval)").alias("series"), "loss")
    return pl.concat([batch, ev])


def plot_loss(df: pl.DataFrame, reference: float | None = NANOGPT_CPU_VAL_LOSS) -> alt.Chart:
    """Training loss per batch (thin) with train/val evaluation points; optional nanoGPT reference line."""
    base = alt.Chart(df).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("loss:Q", title="cross-entropy (nats/char)", scale=alt.Scale(zero=False)),
        color=alt.Color("series:N", title=None, sort=["train (batch)", "train (eval)", "val (eval)"]),
    )
    batch = base.transform_filter(alt.datum.series == "train (batch)").mark_line(opacity=0.35, strokeWidth=1)
    ev = base.transform_filter(alt.datum.series != "train (batch)").mark_line(point=True, strokeWidth=2)
    layers = [batch, ev]
    if reference is not None:
        ref = pl.DataFrame({"loss": [reference], "label": [f"nanoGPT CPU result ({reference})"]})
        rule = alt.Chart(ref).encode(y="loss:Q")
        layers += [rule.mark_rule(strokeDash=[4, 4], color="gray"),
                   rule.mark_text(align="left", dx=4, dy=-6, color="gray").encode(x=alt.value(0), text="label:N")]
    tooltip = [alt.Tooltip("step:Q"), alt.Tooltip("series:N"), alt.Tooltip("loss:Q", format=".3f")]
    layers[1] = layers[1].encode(tooltip=tooltip)
    return alt.layer(*layers).properties(width="container", height=300)


def plot_log(df: pl.DataFrame) -> alt.VConcatChart:
    """Learning rate, gradient norm (before clipping) and throughput per step."""
    base = alt.Chart(df).encode(x=alt.X("step:Q", title="step"))
    panels = [
        base.mark_line().encode(y=alt.Y("lr:Q", title="learning rate", axis=alt.Axis(format=".0e"))),
        base.mark_line(strokeWidth=1).encode(y=alt.Y("grad_norm:Q", title="grad norm (pre-clip)")),
        base.mark_line(strokeWidth=1, opacity=0.6).encode(y=alt.Y("tokens_per_s:Q", title="tokens / s")),
    ]
    return alt.vconcat(*[p.properties(width="container", height=120) for p in panels])


def plot_ablation(df: pl.DataFrame) -> alt.Chart:
    """Validation loss over training for each position-embedding variant."""
    val = df.filter(pl.col("split") == "val")
    return alt.Chart(val).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("loss:Q", title="validation loss (nats/char)", scale=alt.Scale(zero=False)),
        color=alt.Color("pos_emb:N", title="position embedding"),
        tooltip=["pos_emb:N", "step:Q", alt.Tooltip("loss:Q", format=".3f")],
    ).properties(width="container", height=260)


def _gap(evals: pl.DataFrame, step: int) -> float:
    at = evals.filter(pl.col("step") == step)
    return at.filter(pl.col("split") == "val")["loss"].item() - at.filter(pl.col("split") == "train")["loss"].item()


def checkpoint_dir(profile: Profile) -> Path:
    return paths.checkpoint_dir(profile.name, TRACK)


def run(profile: str | Profile | None = None, *, fresh: bool = False, bench: bool = True, write: bool = True,
        on_step: Callable[[int, TrainLog], None] | None = None, progress: bool = True,
        max_iters: int | None = None) -> dict:
    """Train (resuming an interrupted run unless ``fresh``), then write loss, log, samples, summary
    (and the throughput benchmark) to results/pretrain/. Returns the summary row.

    Args:
        profile: Profile name or object (default ``cpu``).
        fresh: Start over instead of resuming from the profile's checkpoint folder.
        bench: Also run the throughput benchmark (``lab.bench.pretrain.pretrain_throughput``).
        write: Write results; ``False`` trains and returns the summary only (interactive exploration).
        on_step: Called after each step with (steps done, log so far).
        progress: tqdm progress bar in the terminal.
        max_iters: Override the profile's iteration count (then checkpoints go to a separate folder).
    """
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = p.pretrain if max_iters is None else replace(p.pretrain, max_iters=max_iters)
    corpus = load_corpus(p)
    device = "cuda" if p.device == "cuda" and torch.cuda.is_available() else "cpu"
    ckpt = checkpoint_dir(p) if max_iters is None else checkpoint_dir(p).with_name(f"{TRACK}-{max_iters}")
    res = train_gpt(cfg, corpus, ckpt, resume=not fresh, on_step=on_step, progress=progress,
                    device=device)
    steps, evals, samples = res.log.frames()
    final = evals.filter(pl.col("step") == cfg.max_iters)
    val = evals.filter(pl.col("split") == "val")
    config = {"pretrain": asdict(cfg), "corpus": corpus.name, "val_works": list(corpus.val_works),
              "resumed_from": res.resumed_from}
    summary = {
        "final_val_loss": final.filter(pl.col("split") == "val")["loss"].item(),
        "final_train_loss": final.filter(pl.col("split") == "train")["loss"].item(),
        "best_val_loss": val["loss"].min(),
        "initial_val_loss": val.filter(pl.col("step") == 0)["loss"].item(),
        "uniform_loss": math.log(res.tokenizer.vocab_size),  # ln V: cross-entropy of a uniform guess
        "gap_first_eval": _gap(evals, cfg.eval_interval),  # val - train at the first evaluation after step 0
        "gap_final": _gap(evals, cfg.max_iters),
        "iters": cfg.max_iters,
        "tokens_seen": cfg.max_iters * cfg.batch_size * cfg.block_size,
        "n_params": res.model.n_params(),
        "vocab_size": res.tokenizer.vocab_size,
        "train_chars": len(corpus.train_text),
        "val_chars": len(corpus.val_text),
        "wall_time_s": res.wall_time_s,
        "train_time_s": res.train_time_s,
        "tokens_per_s": steps["tokens_per_s"].median(),
        # gradient norm before clipping: median over the first and last tenth of training, share of clipped steps
        "grad_norm_first_tenth": steps.head(max(1, cfg.max_iters // 10))["grad_norm"].median(),
        "grad_norm_last_tenth": steps.tail(max(1, cfg.max_iters // 10))["grad_norm"].median(),
        "clipped_fraction": (steps["grad_norm"] > cfg.grad_clip).mean(),
        "resumed_from": res.resumed_from if res.resumed_from is not None else -1,
    }
    if not write:
        return summary
    common = dict(config=config, seed=cfg.seed, profile=p.name, wall_time_s=res.wall_time_s)
    write_result(TRACK, "loss", loss_frame(res.log), chart=plot_loss, **common)
    write_result(TRACK, "log", steps, chart=plot_log, **common)
    write_result(TRACK, "samples", samples, **common)
    write_result(TRACK, "summary", pl.DataFrame([summary]), **common)
    if cfg.pos_emb == "rope":
        # Ablation: nanoGPT's learned absolute position embeddings, everything else identical.
        alt_cfg = replace(cfg, pos_emb="learned")
        base = train_gpt(alt_cfg, corpus, ckpt.with_name(ckpt.name + "-learned"), resume=not fresh,
                         progress=progress, device=device)
        frames, grads = [], []
        for name, r in (("rope", res), ("learned", base)):
            st, ev, _ = r.log.frames()
            frames.append(ev.with_columns(pl.lit(name).alias("pos_emb")))
            grads.append({"pos_emb": name,
                          "grad_norm_last_tenth": st.tail(max(1, cfg.max_iters // 10))["grad_norm"].median(),
                          "clipped_fraction": (st["grad_norm"] > cfg.grad_clip).mean()})
        both = pl.concat(frames)
        ab_common = dict(config={"rope": asdict(cfg), "learned": asdict(alt_cfg)}, seed=cfg.seed, profile=p.name,
                         wall_time_s=base.wall_time_s)
        write_result(TRACK, "ablation", both, chart=plot_ablation, **ab_common)
        final_rows = (both.filter(pl.col("step") == cfg.max_iters)
                      .pivot(on="split", index="pos_emb", values="loss")
                      .select("pos_emb", pl.col("val").alias("final_val_loss"), pl.col("train").alias("final_train_loss"))
                      .with_columns((pl.col("final_val_loss") - pl.col("final_train_loss")).alias("val_minus_train"))
                      .join(pl.DataFrame(grads), on="pos_emb", maintain_order="left"))
        write_result(TRACK, "ablation_summary", final_rows, **ab_common)
    if bench:
        from lab.bench.pretrain import pretrain_throughput

        pretrain_throughput(p, write=True)
    return summary
