"""Track E — circuit-informed fine-tuning. What runs today: WS2 (the synthetic constraint corpus) and WS3
(LoRA fine-tuning on it with adapters saved at 25/50/75/100 % of training, each reloaded and scored).

Per checkpoint (the base model counts as 0 %) and constraint type: held-out accuracy (the right concept's
log-probability beats every alternative's; ``lab.constraints.score_prompts``), the mean log-probability margin,
and the validation loss of that type's texts. The transcoders, attribution graphs and the circuit-vs-loss
early-stopping comparison (WS1/WS5) are not built yet; nothing here claims them.

Writes to results/E_circuits/: ``checkpoints`` (+ chart), ``prompts``, ``loss`` (+ chart), ``summary``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import altair as alt
import polars as pl
import torch

from lab.constraints import (CONSTRAINTS, concepts, constraint_dataset, encode_texts, held_out_prompts,
                             mean_token_loss, score_prompts)
from lab.errors import LabError
from lab.finetune import FinetuneConfig, fresh_base, load_adapter, train_lora
from lab.models import DATA_DIR
from lab.profiles import Profile, get_profile
from lab.results import write_result

TRACK = "E_circuits"
LEARNED = 0.9  # a constraint type counts as learned from the first checkpoint with this held-out accuracy


@dataclass(frozen=True)
class CircuitsConfig:
    """The WS3 fine-tune: corpus size and the LoRA run (``lab.finetune.FinetuneConfig``)."""

    per_type: int
    finetune: FinetuneConfig
    loss: str = "concept"  # "concept": loss on the concept words only; "all": on every token of the texts


CONFIGS: dict[str, CircuitsConfig] = {
    "smoke": CircuitsConfig(per_type=8, finetune=FinetuneConfig(lr=2e-3, rank=4, batch_size=4, epochs=2,
                                                                max_seq_len=128, n_evals=2)),
    # 51 training texts (80 % of 64), 10 epochs of batch 8: 70 steps on SmolLM2-135M. A first run with the loss on
    # every token and 5 epochs learned the sentence templates and left held-out accuracy at chance.
    "cpu": CircuitsConfig(per_type=32, finetune=FinetuneConfig(lr=1e-3, rank=8, batch_size=8, epochs=10,
                                                               max_seq_len=64, n_evals=4)),
    "gpu": CircuitsConfig(per_type=64, finetune=FinetuneConfig(lr=2e-4, rank=16, batch_size=16, epochs=5,
                                                               max_seq_len=64, n_evals=4, quant="nf4")),
}


def track_config(profile: str | Profile | None = None) -> CircuitsConfig:
    p = get_profile(profile)
    if p.name not in CONFIGS:
        raise LabError(f"track {TRACK} has no configuration for profile {p.name!r} (have {', '.join(CONFIGS)})")
    return CONFIGS[p.name]


def run_dir(profile: Profile):
    return DATA_DIR / "checkpoints" / profile.name / TRACK / "ws3"


def checkpoints(folder) -> list[tuple[int, object]]:
    """``(step, folder)`` of every saved checkpoint, in training order."""
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if (p / "adapter_model.safetensors").exists()]
    return sorted(found, key=lambda x: x[0])


def score_model(model, tokenizer, val: dict[str, list[dict]]) -> tuple[pl.DataFrame, dict[str, float]]:
    """Held-out prompt scores and the validation loss of each constraint type's texts."""
    model.eval()
    prompts = score_prompts(model, tokenizer, held_out_prompts())
    return prompts, {ctype: mean_token_loss(model, rows) for ctype, rows in val.items()}


def checkpoints_frame(prompts: pl.DataFrame, losses: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and constraint type: accuracy, its count, mean margin and validation loss."""
    agg = prompts.group_by("checkpoint", "step", "fraction", "constraint_type").agg(
        pl.col("correct").mean().alias("accuracy"), pl.col("correct").sum().alias("correct"),
        pl.len().alias("n"), pl.col("margin").mean().alias("mean_margin"))
    return agg.join(losses, on=["checkpoint", "constraint_type"]).sort("checkpoint", "constraint_type")


def learned_at(frame: pl.DataFrame, ctype: str, threshold: float = LEARNED) -> float | None:
    """The first training fraction at which ``ctype``'s held-out accuracy reaches ``threshold`` (None: never)."""
    hit = frame.filter((pl.col("constraint_type") == ctype) & (pl.col("accuracy") >= threshold)).sort("fraction")
    return float(hit["fraction"][0]) if hit.height else None


def plot_checkpoints(df: pl.DataFrame) -> alt.VConcatChart:
    """Held-out accuracy and validation loss per constraint type across the checkpoints."""
    base = alt.Chart(df).encode(
        x=alt.X("fraction:Q", title="share of training", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("constraint_type:N", title="constraint"))
    acc = base.mark_line(point=True).encode(
        y=alt.Y("accuracy:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        tooltip=["constraint_type:N", "step:Q", alt.Tooltip("accuracy:Q", format=".0%"), "correct:Q", "n:Q",
                 alt.Tooltip("mean_margin:Q", format=".2f")]).properties(width=420, height=180)
    loss = base.mark_line(point=True).encode(
        y=alt.Y("val_loss:Q", title="validation loss (nats/token)", scale=alt.Scale(zero=False)),
        tooltip=["constraint_type:N", "step:Q", alt.Tooltip("val_loss:Q", format=".3f")]
    ).properties(width=420, height=180)
    return alt.vconcat(acc, loss)


def plot_loss(df: pl.DataFrame) -> alt.Chart:
    """Training loss per step (all tokens of the batch's texts)."""
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("loss:Q", title="training loss (nats/token)", scale=alt.Scale(zero=False)),
        tooltip=["step:Q", alt.Tooltip("loss:Q", format=".3f"), alt.Tooltip("lr:Q", format=".1e")],
    ).properties(width=420, height=200)


def run(profile: str | Profile | None = None, *, fresh: bool = False, write: bool = True,
        progress: bool = True) -> dict:
    """Fine-tune on the constraint corpus (resuming unless ``fresh``), score every checkpoint, write results."""
    t0 = time.perf_counter()
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = track_config(p)
    ds = constraint_dataset(cfg.per_type, cfg.finetune.seed)
    lm = fresh_base(p)
    tok = lm.tokenizer
    if cfg.loss not in ("concept", "all"):
        raise LabError(f"loss must be 'concept' or 'all' (got {cfg.loss!r})")
    loss_on = concepts() if cfg.loss == "concept" else None
    train_rows = encode_texts(tok, ds["train"]["text"], loss_on)
    val_rows = encode_texts(tok, ds["validation"]["text"], loss_on)
    val_by_type = {c: [r for r, t in zip(val_rows, ds["validation"]["constraint_type"], strict=True) if t == c]
                   for c in CONSTRAINTS}
    if any(not rows for rows in val_by_type.values()):
        raise LabError(f"the validation split lacks a constraint type: raise per_type (now {cfg.per_type})")
    ft = replace(cfg.finetune, n_train=len(train_rows), n_test=len(val_rows))
    folder = run_dir(p)
    res = train_lora(lm, ft, folder, rows=(train_rows, val_rows), resume=not fresh, progress=progress,
                     desc="constraints")
    total = res.total_steps

    prompt_frames, loss_rows = [], []
    stages = [(0, None)] + checkpoints(folder)
    if [s for s, _ in stages[1:]] != sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}):
        raise LabError(f"expected checkpoints at 25/50/75/100 % of {total} steps in {folder}: "
                       f"rerun with --fresh")
    for i, (step, ck) in enumerate(stages):
        base = fresh_base(p)
        model = base.model if ck is None else load_adapter(base, ck)
        prompts, losses = score_model(model, base.tokenizer, val_by_type)
        prompt_frames.append(prompts.with_columns(checkpoint=pl.lit(i), step=pl.lit(step),
                                                  fraction=pl.lit(step / total)))
        loss_rows += [{"checkpoint": i, "constraint_type": c, "val_loss": v} for c, v in losses.items()]
    prompts = pl.concat(prompt_frames)
    frame = checkpoints_frame(prompts, pl.DataFrame(loss_rows))
    steps, _, _ = res.log.frames()

    summary: dict = {"model": "SmolLM2-135M-Instruct" if p.name == "cpu" else p.lm,
                     "n_train": len(train_rows), "n_validation": len(val_rows), "n_prompts": prompts.height // len(stages),
                     "steps": total, "lr": ft.lr, "rank": ft.rank, "epochs": ft.epochs, "loss_on": cfg.loss,
                     "trainable_params": res.trainable_params, "learned_threshold": LEARNED}
    for c in CONSTRAINTS:
        rows = frame.filter(pl.col("constraint_type") == c).sort("checkpoint")
        at = learned_at(frame, c)
        summary |= {f"{c}_base_accuracy": rows["accuracy"][0], f"{c}_final_accuracy": rows["accuracy"][-1],
                    f"{c}_base_val_loss": rows["val_loss"][0], f"{c}_final_val_loss": rows["val_loss"][-1],
                    f"{c}_learned_at": at if at is not None else -1.0}
    summary |= {"train_time_s": float((steps["tokens"] / steps["tokens_per_s"]).sum()) if steps.height else 0.0,
                "wall_time_s": time.perf_counter() - t0}
    if write:
        kw = dict(config={"per_type": cfg.per_type, "finetune": asdict(ft), "loss": cfg.loss, "learned_threshold": LEARNED},
                  seed=ft.seed, profile=p.name, wall_time_s=summary["wall_time_s"])
        write_result(TRACK, "checkpoints", frame, chart=plot_checkpoints, **kw)
        write_result(TRACK, "prompts", prompts, **kw)
        write_result(TRACK, "loss", steps.select("step", "loss", "lr", "grad_norm"), chart=plot_loss, **kw)
        write_result(TRACK, "summary", pl.DataFrame([summary]), **kw)
    return summary
