"""Track A: fine-tuning mechanics. LoRA (and QLoRA) runs of the profile's model on the event-record task,
sharing one main run between six experiments; everything written to results/A_finetuning/.

Runs: ``main`` (the profile's default config) is the loss-anatomy run, the Adam-moment run and the baseline of
every sweep; the learning-rate, rank and batch-size sweeps change one thing from it; ``qlora`` is ``main`` on a
4-bit base. Each run is scored on the held-out task prompts (greedy), on general-text perplexity and on the
forgetting probes. Finished runs are cached beside their checkpoints, so an interrupted track resumes where it
stopped (``fresh=True`` starts over).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import altair as alt
import polars as pl
import torch

from lab.train.evaluation import PPL_WINDOW, PPL_WINDOWS, general_text, perplexity, probe_retention, rate_with_ci, task_success
from lab.tracks.A_finetuning.config import TRACK, final_adapter_dir, finetune_config
from lab.train.lora import FinetuneConfig, save_adapter, schedule_steps, train_lora
from lab.train.callbacks import RunLog
from lab.data.records import KEYS, PROBES, answer_for, field_scores, make_task
from lab import paths
from lab.models.loading import load_model
from lab.profiles import Profile, get_profile
from lab.io import atomic_write_text
from lab.results import write_result

EVAL_FILE = "lab_eval.json"


def _main_process() -> bool:
    """False in the non-zero ranks of an ``accelerate launch`` run: they train, but write nothing."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the track and the experiments (groups) it belongs to."""

    name: str
    cfg: FinetuneConfig
    groups: tuple[str, ...]
    rule: str = ""  # batch x LR experiment: "linear" (LR scaled with batch) or "constant"


def plan(cfg: FinetuneConfig) -> list[RunSpec]:
    """Every run of the track; ``main`` first (it is the anatomy run and the baseline of each sweep)."""
    runs = [RunSpec("main", cfg, ("anatomy", "lr", "rank", "batch", "qlora", "moments"), rule="both")]
    runs += [RunSpec(f"lr={lr:g}", replace(cfg, lr=lr), ("lr",)) for lr in (1e-5, 1e-3, 5e-3) if lr != cfg.lr]
    runs += [RunSpec(f"rank={r}", replace(cfg, rank=r), ("rank",)) for r in (1, 16, 64) if r != cfg.rank]
    for b in (cfg.batch_size // 2, cfg.batch_size * 2):
        for rule, lr in (("linear", cfg.lr * b / cfg.batch_size), ("constant", cfg.lr)):
            runs.append(RunSpec(f"batch={b}, lr={lr:g}", replace(cfg, batch_size=b, lr=lr), ("batch",), rule))
    if cfg.quant == "none":
        runs.append(RunSpec("qlora", replace(cfg, quant="nf4"), ("qlora",)))
    return runs


def run_dir(profile: Profile, name: str) -> Path:
    safe = name.replace("=", "").replace(", ", "_")
    return paths.checkpoint_dir(profile.name, TRACK, safe)


# ----------------------------------------------------------------------------- running and scoring


def evaluate_model(model, tokenizer, cfg: FinetuneConfig, profile: Profile) -> dict:
    """Task success (greedy, structural), general-text perplexity and probe retention of one model."""
    data = make_task(cfg.n_train, cfg.n_test, cfg.seed)
    answers = task_success(model, tokenizer, data.test, cfg.max_new_tokens)
    fmt, exact = rate_with_ci(answers["format_ok"]), rate_with_ci(answers["exact"])
    _, text = general_text(profile)
    probes = probe_retention(model, tokenizer, PROBES)
    return {
        "format_k": fmt["k"], "format_rate": fmt["rate"], "format_lo": fmt["lo"], "format_hi": fmt["hi"],
        "exact_k": exact["k"], "exact_rate": exact["rate"], "exact_lo": exact["lo"], "exact_hi": exact["hi"],
        "n_test": fmt["n"], "ppl": perplexity(model, tokenizer, text),
        "probes_retained": int(probes["retained"].sum()), "probes_n": probes.height,
        "answers": answers.to_dicts(), "probe_answers": probes.to_dicts(),
    }


def _cached(folder: Path, key: dict) -> dict | None:
    path = folder / EVAL_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved
    return None


def base_eval(profile: Profile, cfg: FinetuneConfig, fresh: bool) -> dict:
    """The untrained model's scores (cached: they depend only on the task and the model)."""
    folder = run_dir(profile, "base")
    key = {"n_train": cfg.n_train, "n_test": cfg.n_test, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
           "probes": PROBES}
    if not fresh and (hit := _cached(folder, key)):
        return hit["result"]
    t0 = time.perf_counter()
    lm = load_model(profile)
    result = evaluate_model(lm.model, lm.tokenizer, cfg, profile)
    result["weights_mb"] = lm.model.get_memory_footprint() / 2**20
    result["eval_time_s"] = time.perf_counter() - t0
    if _main_process():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / EVAL_FILE, json.dumps({"key": key, "result": result}))
    return result


def run_one(profile: Profile, spec: RunSpec, *, fresh: bool, progress: bool,
            on_step: Callable | None = None) -> dict:
    """Train (or resume, or reuse a finished) run and score it. Returns its logs and scores."""
    folder = run_dir(profile, spec.name)
    key = {"config": asdict(spec.cfg), "probes": PROBES}
    if not fresh and (hit := _cached(folder, key)):
        if spec.name == "main" and not (final_adapter_dir(profile) / "adapter_config.json").exists():
            ck = folder / f"checkpoint-{hit['result']['steps']}"
            final_adapter_dir(profile).mkdir(parents=True, exist_ok=True)
            for f in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(ck / f, final_adapter_dir(profile) / f)
        return hit["result"]
    t0 = time.perf_counter()
    lm = load_model(profile)
    cb = (lambda step, total, log: on_step(spec.name, step, total, log)) if on_step else None
    res = train_lora(lm, spec.cfg, folder, resume=not fresh, progress=progress, on_step=cb, desc=spec.name)
    if spec.name == "main" and _main_process():
        save_adapter(res.model, final_adapter_dir(profile))
    scores = evaluate_model(res.model, res.tokenizer, spec.cfg, profile)
    steps, evals, moments = res.log.frames()
    result = {
        **scores,
        "steps": res.total_steps, "trainable_params": res.trainable_params,
        "weights_mb": res.model.get_base_model().get_memory_footprint() / 2**20,
        "train_time_s": float((steps["tokens"] / steps["tokens_per_s"]).sum()),
        "wall_time_s": time.perf_counter() - t0, "resumed_from": res.resumed_from,
        "log": {"steps": steps.to_dicts(), "evals": evals.to_dicts(), "moments": moments.to_dicts()},
    }
    if _main_process():
        atomic_write_text(folder / EVAL_FILE, json.dumps({"key": key, "result": result}))
    return result


# ----------------------------------------------------------------------------- frames


def divergence_step(evals: pl.DataFrame, tolerance: float = 0.02) -> int | None:
    """The step of the lowest eval loss when the loss ends more than ``tolerance`` (relative) above it; else None."""
    if evals.height < 3:
        return None
    best = evals.sort("eval_loss").row(0, named=True)
    final = evals.sort("step")["eval_loss"][-1]
    return int(best["step"]) if final > best["eval_loss"] * (1 + tolerance) else None


def run_row(spec: RunSpec, result: dict, base: dict) -> dict:
    """One row of ``runs``: the run's settings, losses and scores."""
    steps = pl.DataFrame(result["log"]["steps"])
    evals = pl.DataFrame(result["log"]["evals"])
    last_epoch = steps.filter(pl.col("epoch") > spec.cfg.epochs - 1)
    best = evals.sort("eval_loss").row(0, named=True)
    keep = ("format_k", "format_rate", "format_lo", "format_hi", "exact_k", "exact_rate", "exact_lo", "exact_hi",
            "n_test", "ppl", "probes_retained", "probes_n", "steps", "trainable_params", "weights_mb",
            "train_time_s", "wall_time_s")
    return {
        "run": spec.name, "groups": ",".join(spec.groups), "rule": spec.rule, "lr": spec.cfg.lr,
        "rank": spec.cfg.rank, "batch_size": spec.cfg.batch_size, "quant": spec.cfg.quant,
        "final_train_loss": last_epoch["loss"].mean(), "first_eval_loss": evals.sort("step")["eval_loss"][0],
        "final_eval_loss": evals.sort("step")["eval_loss"][-1], "best_eval_loss": best["eval_loss"],
        "best_eval_step": best["step"], **{k: result[k] for k in keep},
        "ppl_ratio": result["ppl"] / base["ppl"], "tokens_per_s": steps["tokens_per_s"].median(),
        "peak_mem_mb": steps["peak_mem_mb"].max(),
    }


def base_row(base: dict) -> dict:
    keep = ("format_k", "format_rate", "format_lo", "format_hi", "exact_k", "exact_rate", "exact_lo", "exact_hi",
            "n_test", "ppl", "probes_retained", "probes_n", "weights_mb")
    return {"run": "base", "groups": "base", "rule": "", "steps": 0, "trainable_params": 0, "ppl_ratio": 1.0,
            **{k: base[k] for k in keep}}


RUN_SCHEMA = {
    "run": pl.Utf8, "groups": pl.Utf8, "rule": pl.Utf8, "lr": pl.Float64, "rank": pl.Int64, "batch_size": pl.Int64,
    "quant": pl.Utf8, "final_train_loss": pl.Float64, "first_eval_loss": pl.Float64, "final_eval_loss": pl.Float64,
    "best_eval_loss": pl.Float64, "best_eval_step": pl.Int64, "format_k": pl.Int64, "format_rate": pl.Float64,
    "format_lo": pl.Float64, "format_hi": pl.Float64, "exact_k": pl.Int64, "exact_rate": pl.Float64,
    "exact_lo": pl.Float64, "exact_hi": pl.Float64, "n_test": pl.Int64, "ppl": pl.Float64, "ppl_ratio": pl.Float64,
    "probes_retained": pl.Int64, "probes_n": pl.Int64, "steps": pl.Int64, "trainable_params": pl.Int64,
    "weights_mb": pl.Float64, "train_time_s": pl.Float64, "wall_time_s": pl.Float64, "tokens_per_s": pl.Float64,
    "peak_mem_mb": pl.Float64,
}


def runs_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=RUN_SCHEMA)


def curves_frame(specs: list[RunSpec], results: dict[str, dict], group: str) -> pl.DataFrame:
    """Long format (run, lr, rank, batch_size, rule, step, examples, kind, loss) for the runs of one experiment."""
    frames = []
    for spec in specs:
        if group not in spec.groups:
            continue
        log = results[spec.name]["log"]
        meta = [pl.lit(spec.name).alias("run"), pl.lit(spec.cfg.lr).alias("lr"), pl.lit(spec.cfg.rank).alias("rank"),
                pl.lit(spec.cfg.batch_size).alias("batch_size")]
        train = pl.DataFrame(log["steps"]).select(*meta, "step", pl.lit("train").alias("kind"), "loss")
        ev = pl.DataFrame(log["evals"]).select(*meta, "step", pl.lit("eval").alias("kind"), pl.col("eval_loss").alias("loss"))
        rules = ["linear", "constant"] if spec.rule == "both" else [spec.rule]
        for rule in rules:
            frames.append(pl.concat([train, ev]).with_columns(pl.lit(rule).alias("rule")))
    out = pl.concat(frames)
    return out.with_columns((pl.col("step") * pl.col("batch_size")).alias("examples"))


def anatomy_frame(result: dict) -> pl.DataFrame:
    """Main run, one row per step (step 0: eval only): train loss, eval loss (where evaluated), grad norm, LR."""
    steps = pl.DataFrame(result["log"]["steps"]).select("step", "epoch", "loss", "grad_norm", "lr", "tokens_per_s",
                                                        "peak_mem_mb")
    evals = pl.DataFrame(result["log"]["evals"])
    return evals.join(steps, on="step", how="full", coalesce=True).sort("step").select(
        "step", "epoch", pl.col("loss").alias("train_loss"), "eval_loss", "grad_norm", "lr", "tokens_per_s",
        "peak_mem_mb")


def samples_frame(base: dict, main: dict, n: int = 8) -> pl.DataFrame:
    rows = [{"prompt": b["prompt"], "base_answer": b["answer"], "base_exact": b["exact"],
             "finetuned_answer": m["answer"], "finetuned_exact": m["exact"]}
            for b, m in zip(base["answers"][:n], main["answers"][:n])]
    return pl.DataFrame(rows)


def answers_frame(cfg: FinetuneConfig, result: dict) -> pl.DataFrame:
    """Every held-out prompt of one run: the expected and the greedy answer, and which fields are exactly right."""
    test = make_task(cfg.n_train, cfg.n_test, cfg.seed).test
    rows = []
    for ex, a in zip(test, result["answers"], strict=True):
        ok = field_scores(a["answer"], ex.fields)
        rows.append({"prompt": ex.prompt, "expected": answer_for(ex.who, ex.where, ex.year), "answer": a["answer"],
                     **{f"{k}_ok": ok[k] for k in KEYS}, "exact": a["exact"]})
    return pl.DataFrame(rows)


def fields_frame(named: list[tuple[str, FinetuneConfig, dict]]) -> pl.DataFrame:
    """Per run: the share of held-out answers with each field exactly right, and with all three (exact success)."""
    rows = []
    for name, cfg, result in named:
        a = answers_frame(cfg, result)
        rows.append({"run": name, **{f"{k}_rate": a[f"{k}_ok"].mean() for k in KEYS}, "exact_rate": a["exact"].mean()})
    return pl.DataFrame(rows)


def probes_frame(base: dict, results: dict[str, dict], specs: list[RunSpec]) -> pl.DataFrame:
    rows = []
    for name, res in [("base", base)] + [(s.name, results[s.name]) for s in specs]:
        for p in res["probe_answers"]:
            rows.append({"run": name, "prompt": p["prompt"], "answer": p["answer"], "retained": p["retained"]})
    return pl.DataFrame(rows)


def optimizer_state_bytes(params: list[torch.nn.Parameter], kind: str) -> int:
    """Bytes of optimizer state after one step on random gradients (``adamw`` or bitsandbytes ``adamw8bit``)."""
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    total = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    for p in params:
        p.grad = None
    return int(total)


def optimizer_memory(profile: Profile, cfg: FinetuneConfig) -> pl.DataFrame:
    """Optimizer-state memory measured for LoRA (main config) and full fine-tuning, AdamW and 8-bit AdamW."""
    from lab.train.lora import attach_lora

    rows = []
    lm = load_model(profile)
    n_total = sum(p.numel() for p in lm.model.parameters())
    full = [p for p in lm.model.parameters()]
    peft_model = attach_lora(load_model(profile).model, cfg)
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    for setting, params in (("full fine-tuning", full), (f"LoRA rank {cfg.rank}", lora)):
        n = sum(p.numel() for p in params)
        for kind in ("adamw", "adamw8bit"):
            b = optimizer_state_bytes(params, kind)
            rows.append({"setting": setting, "optimizer": {"adamw": "AdamW (fp32)", "adamw8bit": "AdamW 8-bit"}[kind],
                         "trainable_params": n, "param_tensors": len(params), "state_bytes": b,
                         "state_mb": b / 2**20, "bytes_per_param": b / n,
                         "state_vs_weights": b / (4 * n_total)})
    return pl.DataFrame(rows)


# ----------------------------------------------------------------------------- charts

_W = "container"


def plot_anatomy(df: pl.DataFrame) -> alt.VConcatChart:
    """Train loss per step and eval loss at intervals (lowest eval marked), grad norm before clipping, LR."""
    base = alt.Chart(df).encode(x=alt.X("step:Q", title="step"))
    train = base.mark_line(strokeWidth=1.5).encode(
        y=alt.Y("train_loss:Q", title="loss (nats/token, answer tokens)", scale=alt.Scale(type="log")),
        color=alt.datum("train (batch)"))
    ev = base.transform_filter("isValid(datum.eval_loss)").mark_line(point=True, strokeWidth=2).encode(
        y="eval_loss:Q", color=alt.datum("eval (held-out)"),
        tooltip=["step:Q", alt.Tooltip("eval_loss:Q", format=".3f")])
    best = base.transform_filter("isValid(datum.eval_loss)").transform_window(
        rank="rank()", sort=[alt.SortField("eval_loss")]).transform_filter("datum.rank == 1").mark_rule(
        strokeDash=[4, 4], color="gray").encode(tooltip=[alt.Tooltip("step:Q", title="lowest eval loss at step")])
    loss = alt.layer(train, ev, best).encode(color=alt.Color(title=None)).properties(width=_W, height=240)
    grad = base.transform_filter("isValid(datum.grad_norm)").mark_line(strokeWidth=1).encode(
        y=alt.Y("grad_norm:Q", title="grad norm (pre-clip)")).properties(width=_W, height=110)
    lr = base.transform_filter("isValid(datum.lr)").mark_line().encode(
        y=alt.Y("lr:Q", title="learning rate", axis=alt.Axis(format=".0e"))).properties(width=_W, height=110)
    return alt.vconcat(loss, grad, lr)


def plot_curves(df: pl.DataFrame, color: str, title: str, x: str = "step") -> alt.FacetChart:
    """Train (per step) and eval loss curves of one sweep, one colour per setting, train | eval side by side."""
    return alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=alt.X(f"{x}:Q", title="examples seen" if x == "examples" else "step"),
        y=alt.Y("loss:Q", title="loss (nats/token)", scale=alt.Scale(type="log")),
        color=alt.Color(f"{color}:N", title=title, sort=alt.SortField(color)),
        tooltip=["run:N", f"{x}:Q", alt.Tooltip("loss:Q", format=".3f")],
    ).properties(width=260, height=220).facet(column=alt.Column("kind:N", title=None, sort=["train", "eval"]))


def plot_batch_lr(df: pl.DataFrame) -> alt.FacetChart:
    """Eval loss against examples seen for each batch size: LR scaled with batch (linear rule) vs kept constant."""
    ev = df.filter(pl.col("kind") == "eval")
    return alt.Chart(ev).mark_line(point=True).encode(
        x=alt.X("examples:Q", title="training examples seen"),
        y=alt.Y("loss:Q", title="eval loss (nats/token)", scale=alt.Scale(type="log")),
        color=alt.Color("batch_size:O", title="batch size"),
        tooltip=["run:N", "examples:Q", alt.Tooltip("lr:Q", format=".1e"), alt.Tooltip("loss:Q", format=".3f")],
    ).properties(width=260, height=220).facet(column=alt.Column("rule:N", title="learning rate",
                                                                   sort=["linear", "constant"]))


def plot_outcomes(df: pl.DataFrame, x: str, title: str, log_x: bool = True) -> alt.HConcatChart:
    """Task success (exact, with Wilson 95 % interval), perplexity ratio and probe retention against ``x``."""
    scale = alt.Scale(type="log") if log_x else alt.Scale()
    xe = alt.X(f"{x}:Q", title=title, scale=scale)
    base = alt.Chart(df).encode(x=xe)
    success = alt.layer(
        base.mark_errorbar().encode(y=alt.Y("exact_lo:Q", title="exact task success", scale=alt.Scale(domain=[0, 1])),
                                    y2="exact_hi:Q"),
        base.mark_line(point=True).encode(y="exact_rate:Q", tooltip=["run:N", alt.Tooltip("exact_rate:Q", format=".0%"),
                                                                      alt.Tooltip("format_rate:Q", format=".0%")]),
    ).properties(width=200, height=200)
    ppl = base.mark_line(point=True, color="#d62728").encode(
        y=alt.Y("ppl_ratio:Q", title="general-text perplexity / base", scale=alt.Scale(zero=False)),
        tooltip=["run:N", alt.Tooltip("ppl_ratio:Q", format=".3f")]).properties(width=200, height=200)
    probes = base.transform_calculate(share="datum.probes_retained / datum.probes_n").mark_line(
        point=True, color="#2ca02c").encode(
        y=alt.Y("share:Q", title="probe answers unchanged", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        tooltip=["run:N", "probes_retained:Q"]).properties(width=200, height=200)
    return alt.hconcat(success, ppl, probes)


def plot_forgetting(df: pl.DataFrame) -> alt.Chart:
    """Every run: task success against general-text perplexity ratio (forgetting), one colour per experiment."""
    d = df.with_columns(pl.col("groups").str.split(",").list.first().alias("experiment"))
    return alt.Chart(d).mark_point(filled=True, size=80).encode(
        x=alt.X("ppl_ratio:Q", title="general-text perplexity / base model", scale=alt.Scale(type="log")),
        y=alt.Y("exact_rate:Q", title="exact task success", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("experiment:N", title="experiment"),
        shape=alt.Shape("experiment:N"),
        tooltip=["run:N", alt.Tooltip("exact_rate:Q", format=".0%"), alt.Tooltip("ppl_ratio:Q", format=".3f"),
                 "probes_retained:Q"],
    ).properties(width=_W, height=260)


def moments_summary(df: pl.DataFrame) -> dict:
    """Where Adam's second moment is largest at the last snapshot: by layer, by LoRA matrix, by module type."""
    last = df.filter(pl.col("step") == pl.col("step").max())

    def weighted(by: str) -> pl.DataFrame:  # mean sqrt(v) over every parameter in the group
        return (last.group_by(by).agg(((pl.col("v_sqrt_mean") * pl.col("n")).sum() / pl.col("n").sum()).alias("v"))
                .sort(by))

    layers, matrices, modules = weighted("layer"), weighted("matrix"), weighted("module").sort("v")
    v = dict(zip(matrices["matrix"], matrices["v"], strict=True))
    return {"moments_step": int(last["step"].max()), "moments_v_first_layer": layers["v"][0],
            "moments_v_last_layer": layers["v"][-1], "moments_v_min": layers["v"].min(),
            "moments_v_min_layer": int(layers["layer"][layers["v"].arg_min()]),
            "moments_v_max_layer": int(layers["layer"][layers["v"].arg_max()]),
            "moments_b_over_a": v["B"] / v["A"], "moments_top_module": modules["module"][-1],
            "moments_top_module_over_bottom": modules["v"][-1] / modules["v"][0]}


def plot_moments(df: pl.DataFrame) -> alt.FacetChart:
    """sqrt of Adam's second moment (mean per layer, over the adapted modules) by layer and step, A vs B."""
    agg = (df.group_by("step", "layer", "matrix")
           .agg((pl.col("v_sqrt_mean") * pl.col("n")).sum().alias("w"), pl.col("n").sum())
           .with_columns((pl.col("w") / pl.col("n")).alias("v_sqrt_mean")).drop("w", "n")
           .filter(pl.col("v_sqrt_mean") > 0))
    return alt.Chart(agg).mark_rect().encode(
        x=alt.X("step:O", title="step"),
        y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("v_sqrt_mean:Q", title="mean √v", scale=alt.Scale(type="log", scheme="viridis")),
        tooltip=["step:O", "layer:O", "matrix:N", alt.Tooltip("v_sqrt_mean:Q", format=".2e")],
    ).properties(width=260, height=300).facet(column=alt.Column("matrix:N", title="LoRA matrix"))


def plot_moments_by_module(df: pl.DataFrame) -> alt.Chart:
    """At the last snapshot: mean √v per module type and matrix, averaged over layers."""
    last = df.filter(pl.col("step") == pl.col("step").max())
    agg = last.group_by("module", "matrix").agg(pl.col("v_sqrt_mean").mean(), pl.col("update_rms").mean())
    return alt.Chart(agg).mark_bar().encode(
        x=alt.X("module:N", title="adapted module"),
        xOffset="matrix:N",
        y=alt.Y("v_sqrt_mean:Q", title="mean √v (gradient scale)"),
        color=alt.Color("matrix:N", title="LoRA matrix"),
        tooltip=["module:N", "matrix:N", alt.Tooltip("v_sqrt_mean:Q", format=".2e"),
                 alt.Tooltip("update_rms:Q", format=".3f")],
    ).properties(width=_W, height=220)


# ----------------------------------------------------------------------------- the track


def run(profile: str | Profile | None = None, *, fresh: bool = False, write: bool = True, progress: bool = True,
        bench: bool = True, on_step: Callable[[str, int, int, RunLog], None] | None = None,
        only: tuple[str, ...] | None = None) -> dict:
    """Run every experiment of Track A (resuming unless ``fresh``) and write results/A_finetuning/.

    Args:
        profile: Profile name or object (default ``cpu``).
        fresh: Retrain every run instead of resuming / reusing finished runs.
        write: Write results (False: only return the summary).
        progress: tqdm bars.
        bench: Also run the instrumentation-overhead benchmark (``lab.finetune_bench``).
        on_step: Called after every logged step with (run name, step, total steps, log).
        only: Run names to train (default: all of :func:`plan`); ``main`` is always included.
    """
    t0 = time.perf_counter()
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = finetune_config(p)
    specs = [s for s in plan(cfg) if only is None or s.name in only or s.name == "main"]
    base = base_eval(p, cfg, fresh)
    results: dict[str, dict] = {}
    for spec in specs:
        results[spec.name] = run_one(p, spec, fresh=fresh, progress=progress, on_step=on_step)
    runs = runs_frame([base_row(base)] + [run_row(s, results[s.name], base) for s in specs])
    main = runs.filter(pl.col("run") == "main").row(0, named=True)
    anatomy = anatomy_frame(results["main"])
    div = divergence_step(anatomy.filter(pl.col("eval_loss").is_not_null()).select("step", "eval_loss"))
    text_name, _ = general_text(p)
    n_layers = int(pl.DataFrame(results["main"]["log"]["moments"])["layer"].max()) + 1
    outcome_cols = ["run", "lr", "rank", "batch_size", "rule", "trainable_params", "final_train_loss",
                    "final_eval_loss", "best_eval_loss", "best_eval_step", "steps", "format_rate", "exact_rate",
                    "exact_lo", "exact_hi", "ppl_ratio", "probes_retained", "probes_n"]

    def group(name: str) -> pl.DataFrame:
        return runs.filter(pl.col("groups").str.split(",").list.contains(name)).select(outcome_cols)

    lr_out, rank_out = group("lr").sort("lr"), group("rank").sort("rank")
    batch_out = group("batch").sort("batch_size", "rule")
    qlora = runs.filter(pl.col("groups").str.split(",").list.contains("qlora")).select(
        "run", "quant", "weights_mb", "final_eval_loss", "format_rate", "exact_rate", "exact_lo", "exact_hi",
        "ppl_ratio", "tokens_per_s", "train_time_s")
    main_answers = answers_frame(cfg, results["main"])
    misses = main_answers.filter(~pl.col("exact"))
    best_lr = lr_out.sort(["exact_rate", "final_eval_loss"], descending=[True, False]).row(0, named=True)
    base_r = runs.filter(pl.col("run") == "base").row(0, named=True)
    summary = {
        "model": "SmolLM2-135M-Instruct" if p.name == "cpu" else p.lm,
        "n_train": cfg.n_train, "n_test": cfg.n_test, "epochs": cfg.epochs, "main_lr": cfg.lr,
        "main_rank": cfg.rank, "main_batch": cfg.batch_size, "main_steps": main["steps"],
        "main_trainable_params": main["trainable_params"],
        "base_format_rate": base_r["format_rate"], "base_exact_rate": base_r["exact_rate"],
        "base_exact_hi": base_r["exact_hi"], "base_ppl": base_r["ppl"],
        "base_probes_retained": base_r["probes_retained"], "probes_n": base_r["probes_n"],
        "main_format_rate": main["format_rate"], "main_exact_rate": main["exact_rate"],
        "main_exact_lo": main["exact_lo"], "main_exact_hi": main["exact_hi"], "main_ppl": main["ppl"],
        "main_ppl_ratio": main["ppl_ratio"], "main_probes_retained": main["probes_retained"],
        "main_first_eval_loss": main["first_eval_loss"], "main_final_eval_loss": main["final_eval_loss"],
        "main_best_eval_loss": main["best_eval_loss"], "main_best_eval_step": main["best_eval_step"],
        "main_final_train_loss": main["final_train_loss"],
        "divergence_step": div if div is not None else -1,
        "grad_norm_first": anatomy["grad_norm"].drop_nulls()[0], "grad_norm_max": anatomy["grad_norm"].max(),
        "grad_norm_last": anatomy["grad_norm"].drop_nulls()[-1],
        "clipped_fraction": (anatomy["grad_norm"].drop_nulls() > cfg.max_grad_norm).mean(),
        **{f"main_{k}_rate": main_answers[f"{k}_ok"].mean() for k in KEYS},
        "main_misses": misses.height, "main_misses_year_right": int(misses["year_ok"].sum()),
        "main_tokens_per_s": main["tokens_per_s"], "main_train_time_s": main["train_time_s"],
        "best_lr": best_lr["lr"], "best_lr_exact_rate": best_lr["exact_rate"],
        "n_runs": len(specs), "general_text": text_name,
        "eval_every": schedule_steps(cfg.n_train, cfg)[2], "max_new_tokens": cfg.max_new_tokens,
        "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm, "alpha_per_rank": cfg.alpha_per_rank,
        "ppl_tokens": PPL_WINDOW * PPL_WINDOWS, "n_layers": n_layers,
        **moments_summary(pl.DataFrame(results["main"]["log"]["moments"])),
        "track_wall_time_s": time.perf_counter() - t0,  # this invocation (finished runs are reused)
        "train_time_total_s": float(runs["train_time_s"].drop_nulls().sum()),
        # every run's own wall time (load, train, evaluate) plus the base model's evaluation, across resumptions
        "runs_wall_time_total_s": float(runs["wall_time_s"].drop_nulls().sum()) + base["eval_time_s"],
    }
    if not write or not _main_process():
        return summary
    prov = dict(config={"finetune": asdict(cfg), "runs": {s.name: asdict(s.cfg) for s in specs},
                        "general_text": text_name, "probes": PROBES},
                seed=cfg.seed, profile=p.name, wall_time_s=summary["track_wall_time_s"])
    w = lambda name, frame, chart=None: write_result(TRACK, name, frame, chart=chart, **prov)  # noqa: E731
    w("runs", runs, plot_forgetting)
    w("anatomy", anatomy, plot_anatomy)
    w("lr_curves", curves_frame(specs, results, "lr"), lambda f: plot_curves(f, "lr", "learning rate"))
    w("lr_outcomes", lr_out, lambda f: plot_outcomes(f, "lr", "learning rate"))
    w("rank_curves", curves_frame(specs, results, "rank"), lambda f: plot_curves(f, "rank", "LoRA rank"))
    w("rank_outcomes", rank_out, lambda f: plot_outcomes(f, "rank", "LoRA rank"))
    w("batch_lr", curves_frame(specs, results, "batch"), plot_batch_lr)
    w("batch_outcomes", batch_out)
    moments = pl.DataFrame(results["main"]["log"]["moments"])
    w("moments", moments, plot_moments)
    w("moments_by_module", moments, plot_moments_by_module)
    w("optimizer_memory", optimizer_memory(p, cfg))
    w("qlora", qlora)
    w("samples", samples_frame(base, results["main"]))
    w("answers", main_answers)
    w("fields", fields_frame([("base", cfg, base)] + [(sp.name, sp.cfg, results[sp.name]) for sp in specs]))
    probes = probes_frame(base, results, specs)
    w("probes", probes)
    w("probes_changed", probes.filter(~pl.col("retained") & (pl.col("run") != "base")))
    if bench:
        from lab.bench.finetune import instrumentation_overhead

        instrumentation_overhead(p, write=True)
    summary["track_wall_time_s"] = time.perf_counter() - t0
    w("summary", pl.DataFrame([summary]))
    return summary
