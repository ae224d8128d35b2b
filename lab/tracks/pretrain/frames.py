"""The pretraining track's tables: pure functions from training logs to polars frames."""

from __future__ import annotations

import polars as pl

from lab.train.pretraining import TrainLog


def loss_frame(log: TrainLog) -> pl.DataFrame:
    """Long format (step, series, loss): per-batch training loss plus train/val estimates at evaluations."""
    steps, evals, _ = log.frames()
    batch = steps.select("step", pl.lit("train (batch)").alias("series"), "loss")
    ev = evals.select("step", (pl.col("split") + " (eval)").alias("series"), "loss")
    return pl.concat([batch, ev])


def eval_loss(evals: pl.DataFrame, step: int, split: str) -> float:
    """The ``split`` loss estimated at ``step``."""
    return evals.filter((pl.col("step") == step) & (pl.col("split") == split))["loss"].item()


def eval_gap(evals: pl.DataFrame, step: int) -> float:
    """Validation minus training loss at the evaluation of ``step`` (the generalisation gap)."""
    at = evals.filter(pl.col("step") == step)
    return at.filter(pl.col("split") == "val")["loss"].item() - at.filter(pl.col("split") == "train")["loss"].item()


def grad_norm_stats(steps: pl.DataFrame, max_iters: int, clip: float) -> dict[str, float]:
    """Gradient norm before clipping: median over the first and last tenth of training, share of clipped steps."""
    tenth = max(1, max_iters // 10)
    return {
        "grad_norm_first_tenth": steps.head(tenth)["grad_norm"].median(),
        "grad_norm_last_tenth": steps.tail(tenth)["grad_norm"].median(),
        "clipped_fraction": (steps["grad_norm"] > clip).mean(),
    }


def ablation_frame(logs: dict[str, TrainLog]) -> pl.DataFrame:
    """Every evaluation (step, split, loss) of each position-embedding variant, tagged ``pos_emb``."""
    return pl.concat([log.frames()[1].with_columns(pl.lit(name).alias("pos_emb")) for name, log in logs.items()])


def ablation_summary_frame(logs: dict[str, TrainLog], max_iters: int, clip: float) -> pl.DataFrame:
    """One row per variant: final val and train loss, their gap, and the late gradient-norm statistics."""
    grads = []
    for name, log in logs.items():
        stats = grad_norm_stats(log.frames()[0], max_iters, clip)
        grads.append(
            {
                "pos_emb": name,
                "grad_norm_last_tenth": stats["grad_norm_last_tenth"],
                "clipped_fraction": stats["clipped_fraction"],
            }
        )
    return (
        ablation_frame(logs)
        .filter(pl.col("step") == max_iters)
        .pivot(on="split", index="pos_emb", values="loss")
        .select("pos_emb", pl.col("val").alias("final_val_loss"), pl.col("train").alias("final_train_loss"))
        .with_columns((pl.col("final_val_loss") - pl.col("final_train_loss")).alias("val_minus_train"))
        .join(pl.DataFrame(grads), on="pos_emb", maintain_order="left")
    )
