"""Track A's tables: pure functions from the runs' logs and scores (as :func:`run.run_one` returns them) to polars
frames, and every aggregation the charts and the summary show."""

from __future__ import annotations

import polars as pl

from lab.data.records import KEYS, answer_for, field_scores, make_task
from lab.tracks.A_finetuning.config import RunSpec
from lab.train.callbacks import RunLog
from lab.train.lora import FinetuneConfig

RUN_SCHEMA = {
    "run": pl.Utf8,
    "groups": pl.Utf8,
    "rule": pl.Utf8,
    "lr": pl.Float64,
    "rank": pl.Int64,
    "batch_size": pl.Int64,
    "quant": pl.Utf8,
    "final_train_loss": pl.Float64,
    "first_eval_loss": pl.Float64,
    "final_eval_loss": pl.Float64,
    "best_eval_loss": pl.Float64,
    "best_eval_step": pl.Int64,
    "format_k": pl.Int64,
    "format_rate": pl.Float64,
    "format_lo": pl.Float64,
    "format_hi": pl.Float64,
    "exact_k": pl.Int64,
    "exact_rate": pl.Float64,
    "exact_lo": pl.Float64,
    "exact_hi": pl.Float64,
    "n_test": pl.Int64,
    "ppl": pl.Float64,
    "ppl_ratio": pl.Float64,
    "probes_retained": pl.Int64,
    "probes_n": pl.Int64,
    "steps": pl.Int64,
    "trainable_params": pl.Int64,
    "weights_mb": pl.Float64,
    "train_time_s": pl.Float64,
    "wall_time_s": pl.Float64,
    "tokens_per_s": pl.Float64,
    "peak_mem_mb": pl.Float64,
}
_SCORES = (
    "format_k",
    "format_rate",
    "format_lo",
    "format_hi",
    "exact_k",
    "exact_rate",
    "exact_lo",
    "exact_hi",
    "n_test",
    "ppl",
    "probes_retained",
    "probes_n",
)
OUTCOME_COLUMNS = [
    "run",
    "lr",
    "rank",
    "batch_size",
    "rule",
    "trainable_params",
    "final_train_loss",
    "final_eval_loss",
    "best_eval_loss",
    "best_eval_step",
    "steps",
    "format_rate",
    "exact_rate",
    "exact_lo",
    "exact_hi",
    "ppl_ratio",
    "probes_retained",
    "probes_n",
]


# ----------------------------------------------------------------------------- runs


def run_row(spec: RunSpec, result: dict, base: dict) -> dict:
    """One row of ``runs``: the run's settings, losses and scores."""
    steps = pl.DataFrame(result["log"]["steps"])
    evals = pl.DataFrame(result["log"]["evals"])
    last_epoch = steps.filter(pl.col("epoch") > spec.cfg.epochs - 1)
    best = evals.sort("eval_loss").row(0, named=True)
    keep = _SCORES + ("steps", "trainable_params", "weights_mb", "train_time_s", "wall_time_s")
    return {
        "run": spec.name,
        "groups": ",".join(spec.groups),
        "rule": spec.rule,
        "lr": spec.cfg.lr,
        "rank": spec.cfg.rank,
        "batch_size": spec.cfg.batch_size,
        "quant": spec.cfg.quant,
        "final_train_loss": last_epoch["loss"].mean(),
        "first_eval_loss": evals.sort("step")["eval_loss"][0],
        "final_eval_loss": evals.sort("step")["eval_loss"][-1],
        "best_eval_loss": best["eval_loss"],
        "best_eval_step": best["step"],
        **{k: result[k] for k in keep},
        "ppl_ratio": result["ppl"] / base["ppl"],
        "tokens_per_s": steps["tokens_per_s"].median(),
        "peak_mem_mb": steps["peak_mem_mb"].max(),
    }


def base_row(base: dict) -> dict:
    """The row of ``runs`` for the untrained model."""
    return {
        "run": "base",
        "groups": "base",
        "rule": "",
        "steps": 0,
        "trainable_params": 0,
        "ppl_ratio": 1.0,
        **{k: base[k] for k in _SCORES + ("weights_mb",)},
    }


def runs_frame(specs: list[RunSpec], results: dict[str, dict], base: dict) -> pl.DataFrame:
    """``runs``: the base model, then every run of the plan."""
    rows = [base_row(base)] + [run_row(s, results[s.name], base) for s in specs]
    return pl.DataFrame(rows, schema=RUN_SCHEMA)


def in_group(runs: pl.DataFrame, group: str) -> pl.DataFrame:
    """The rows of ``runs`` that belong to experiment ``group``."""
    return runs.filter(pl.col("groups").str.split(",").list.contains(group))


def outcomes(runs: pl.DataFrame, group: str, by: str | list[str]) -> pl.DataFrame:
    """``<group>_outcomes``: the settings, losses and scores of one sweep's runs, sorted by the swept setting."""
    return in_group(runs, group).select(OUTCOME_COLUMNS).sort(by)


def qlora_frame(runs: pl.DataFrame) -> pl.DataFrame:
    """``qlora``: the main run against the same run on a 4-bit base: memory, loss, success, forgetting, speed."""
    return in_group(runs, "qlora").select(
        "run",
        "quant",
        "weights_mb",
        "final_eval_loss",
        "format_rate",
        "exact_rate",
        "exact_lo",
        "exact_hi",
        "ppl_ratio",
        "tokens_per_s",
        "train_time_s",
    )


def best_lr(lr_outcomes: pl.DataFrame) -> dict:
    """The learning-rate run with the highest exact success (ties: the lower final eval loss)."""
    return lr_outcomes.sort(["exact_rate", "final_eval_loss"], descending=[True, False]).row(0, named=True)


def forgetting_frame(runs: pl.DataFrame) -> pl.DataFrame:
    """``runs`` with each run's first experiment as ``experiment`` (what the forgetting chart colours by)."""
    return runs.with_columns(pl.col("groups").str.split(",").list.first().alias("experiment"))


# ----------------------------------------------------------------------------- curves


def curves_frame(specs: list[RunSpec], results: dict[str, dict], group: str) -> pl.DataFrame:
    """Long format (run, lr, rank, batch_size, rule, step, examples, kind, loss) for the runs of one experiment."""
    frames = []
    for spec in specs:
        if group not in spec.groups:
            continue
        log = results[spec.name]["log"]
        meta = [
            pl.lit(spec.name).alias("run"),
            pl.lit(spec.cfg.lr).alias("lr"),
            pl.lit(spec.cfg.rank).alias("rank"),
            pl.lit(spec.cfg.batch_size).alias("batch_size"),
        ]
        train = pl.DataFrame(log["steps"]).select(*meta, "step", pl.lit("train").alias("kind"), "loss")
        ev = pl.DataFrame(log["evals"]).select(
            *meta, "step", pl.lit("eval").alias("kind"), pl.col("eval_loss").alias("loss")
        )
        rules = ["linear", "constant"] if spec.rule == "both" else [spec.rule]
        for rule in rules:
            frames.append(pl.concat([train, ev]).with_columns(pl.lit(rule).alias("rule")))
    out = pl.concat(frames)
    return out.with_columns((pl.col("step") * pl.col("batch_size")).alias("examples"))


def live_curve(log: RunLog) -> pl.DataFrame:
    """Long format (step, kind, loss) of a run still training: train loss per step, eval loss where evaluated."""
    steps, evals, _ = log.frames()
    return pl.concat(
        [
            steps.select("step", pl.lit("train").alias("kind"), "loss"),
            evals.select("step", pl.lit("eval").alias("kind"), pl.col("eval_loss").alias("loss")),
        ]
    )


def anatomy_frame(result: dict) -> pl.DataFrame:
    """Main run, one row per step (step 0: eval only): train loss, eval loss (where evaluated), grad norm, LR."""
    steps = pl.DataFrame(result["log"]["steps"]).select(
        "step", "epoch", "loss", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb"
    )
    evals = pl.DataFrame(result["log"]["evals"])
    return (
        evals.join(steps, on="step", how="full", coalesce=True)
        .sort("step")
        .select(
            "step",
            "epoch",
            pl.col("loss").alias("train_loss"),
            "eval_loss",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "peak_mem_mb",
        )
    )


def divergence_step(evals: pl.DataFrame, tolerance: float = 0.02) -> int | None:
    """The step of the lowest eval loss when the loss ends more than ``tolerance`` (relative) above it; else None."""
    if evals.height < 3:
        return None
    best = evals.sort("eval_loss").row(0, named=True)
    final = evals.sort("step")["eval_loss"][-1]
    return int(best["step"]) if final > best["eval_loss"] * (1 + tolerance) else None


def grad_norms(anatomy: pl.DataFrame, clip: float) -> dict:
    """The main run's gradient norm before clipping: first, largest, last, and the share of clipped steps."""
    norms = anatomy["grad_norm"].drop_nulls()
    return {
        "grad_norm_first": norms[0],
        "grad_norm_max": anatomy["grad_norm"].max(),
        "grad_norm_last": norms[-1],
        "clipped_fraction": (norms > clip).mean(),
    }


# ----------------------------------------------------------------------------- answers and probes


def samples_frame(base: dict, main: dict, n: int = 8) -> pl.DataFrame:
    """``samples``: the first ``n`` held-out prompts, answered by the base model and by the main run."""
    rows = [
        {
            "prompt": b["prompt"],
            "base_answer": b["answer"],
            "base_exact": b["exact"],
            "finetuned_answer": m["answer"],
            "finetuned_exact": m["exact"],
        }
        for b, m in zip(base["answers"][:n], main["answers"][:n], strict=True)
    ]
    return pl.DataFrame(rows)


def answers_frame(cfg: FinetuneConfig, result: dict) -> pl.DataFrame:
    """Every held-out prompt of one run: the expected and the greedy answer, and which fields are exactly right."""
    test = make_task(cfg.n_train, cfg.n_test, cfg.seed).test
    rows = []
    for ex, a in zip(test, result["answers"], strict=True):
        ok = field_scores(a["answer"], ex.fields)
        rows.append(
            {
                "prompt": ex.prompt,
                "expected": answer_for(ex.who, ex.where, ex.year),
                "answer": a["answer"],
                **{f"{k}_ok": ok[k] for k in KEYS},
                "exact": a["exact"],
            }
        )
    return pl.DataFrame(rows)


def field_rates(answers: pl.DataFrame) -> dict[str, float]:
    """Share of answers with each field (who, where, year) exactly right, as ``<field>_rate``."""
    return {f"{k}_rate": answers[f"{k}_ok"].mean() for k in KEYS}


def fields_frame(named: list[tuple[str, FinetuneConfig, dict]]) -> pl.DataFrame:
    """Per run: the share of held-out answers with each field exactly right, and with all three (exact success)."""
    rows = []
    for name, cfg, result in named:
        a = answers_frame(cfg, result)
        rows.append({"run": name, **field_rates(a), "exact_rate": a["exact"].mean()})
    return pl.DataFrame(rows)


def probes_frame(base: dict, results: dict[str, dict], specs: list[RunSpec]) -> pl.DataFrame:
    """``probes``: every run's answer to each probe prompt and whether it is the base model's."""
    rows = []
    for name, res in [("base", base)] + [(s.name, results[s.name]) for s in specs]:
        for p in res["probe_answers"]:
            rows.append({"run": name, "prompt": p["prompt"], "answer": p["answer"], "retained": p["retained"]})
    return pl.DataFrame(rows)


def probes_changed(probes: pl.DataFrame) -> pl.DataFrame:
    """The probe answers a fine-tuned run changed."""
    return probes.filter(~pl.col("retained") & (pl.col("run") != "base"))


# ----------------------------------------------------------------------------- Adam's moments and optimizer memory


def _weighted_v(last: pl.DataFrame, by: str) -> pl.DataFrame:
    """Mean sqrt(v) over every parameter in each group of ``by`` (weighted by the parameter count ``n``)."""
    return last.group_by(by).agg(((pl.col("v_sqrt_mean") * pl.col("n")).sum() / pl.col("n").sum()).alias("v")).sort(by)


def moments_summary(moments: pl.DataFrame) -> dict:
    """Where Adam's second moment is largest at the last snapshot: by layer, by LoRA matrix, by module type."""
    last = moments.filter(pl.col("step") == pl.col("step").max())
    layers, matrices = _weighted_v(last, "layer"), _weighted_v(last, "matrix")
    modules = _weighted_v(last, "module").sort("v")
    v = dict(zip(matrices["matrix"], matrices["v"], strict=True))
    return {
        "moments_step": int(last["step"].max()),
        "moments_v_first_layer": layers["v"][0],
        "moments_v_last_layer": layers["v"][-1],
        "moments_v_min": layers["v"].min(),
        "moments_v_min_layer": int(layers["layer"][layers["v"].arg_min()]),
        "moments_v_max_layer": int(layers["layer"][layers["v"].arg_max()]),
        "moments_b_over_a": v["B"] / v["A"],
        "moments_top_module": modules["module"][-1],
        "moments_top_module_over_bottom": modules["v"][-1] / modules["v"][0],
    }


def moments_by_layer(moments: pl.DataFrame) -> pl.DataFrame:
    """(step, layer, matrix, v_sqrt_mean): mean sqrt(v) over each layer's adapted modules, weighted by parameter
    count; zero rows (A before B has moved) dropped, so a log colour scale can draw the rest."""
    return (
        moments.group_by("step", "layer", "matrix")
        .agg((pl.col("v_sqrt_mean") * pl.col("n")).sum().alias("w"), pl.col("n").sum())
        .with_columns((pl.col("w") / pl.col("n")).alias("v_sqrt_mean"))
        .drop("w", "n")
        .filter(pl.col("v_sqrt_mean") > 0)
    )


def moments_by_module(moments: pl.DataFrame) -> pl.DataFrame:
    """(module, matrix, v_sqrt_mean, update_rms) at the last snapshot, averaged over layers."""
    last = moments.filter(pl.col("step") == pl.col("step").max())
    return last.group_by("module", "matrix").agg(pl.col("v_sqrt_mean").mean(), pl.col("update_rms").mean())


OPTIMIZERS = {"adamw": "AdamW (fp32)", "adamw8bit": "AdamW 8-bit"}


def optimizer_memory_frame(measured: list[dict], n_total: int) -> pl.DataFrame:
    """``optimizer_memory``: measured state bytes per (setting, optimizer kind), per parameter and against the
    model's fp32 weights (``n_total`` parameters)."""
    return pl.DataFrame(
        [
            {
                "setting": m["setting"],
                "optimizer": OPTIMIZERS[m["kind"]],
                "trainable_params": m["trainable_params"],
                "param_tensors": m["param_tensors"],
                "state_bytes": m["state_bytes"],
                "state_mb": m["state_bytes"] / 2**20,
                "bytes_per_param": m["state_bytes"] / m["trainable_params"],
                "state_vs_weights": m["state_bytes"] / (4 * n_total),
            }
            for m in measured
        ]
    )
