"""Track A's headline numbers (``results/A_finetuning/summary.parquet``, quoted by its site page)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lab.profiles import Profile
from lab.results import Summary
from lab.tracks.A_finetuning import frames
from lab.tracks.A_finetuning.config import RunSpec
from lab.train.evaluation import PPL_WINDOW, PPL_WINDOWS
from lab.train.lora import FinetuneConfig, schedule_steps

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "main_exact_rate",
    "main_format_rate",
    "main_final_eval_loss",
    "main_ppl_ratio",
    "main_probes_retained",
    "best_lr",
)


@dataclass(frozen=True)
class FinetuneSummary(Summary):
    """The main run against the base model, the sweeps' headlines, and the recipe they ran with. Rates are shares
    of the held-out prompts; losses are nats per answer token; ``ppl`` is perplexity on the general text."""

    model: str  # the base model
    n_train: int  # training examples
    n_test: int  # held-out prompts
    epochs: int
    main_lr: float
    main_rank: int
    main_batch: int
    main_steps: int  # optimisation steps of the main run
    main_trainable_params: int  # LoRA parameters
    base_format_rate: float  # base model: answers that are a valid record
    base_exact_rate: float  # base model: answers with every field right
    base_exact_hi: float  # upper end of its Wilson 95 % interval
    base_ppl: float
    base_probes_retained: int  # probes answered as expected (the base model's own answers)
    probes_n: int
    main_format_rate: float
    main_exact_rate: float
    main_exact_lo: float  # Wilson 95 % interval of main_exact_rate
    main_exact_hi: float
    main_ppl: float
    main_ppl_ratio: float  # main_ppl / base_ppl: forgetting
    main_probes_retained: int
    main_first_eval_loss: float  # before the first step
    main_final_eval_loss: float
    main_best_eval_loss: float
    main_best_eval_step: int
    main_final_train_loss: float  # mean over the last epoch
    divergence_step: int  # step of the lowest eval loss if the loss then rose > 2 %; -1 if it did not
    grad_norm_first: float  # gradient norm before clipping, first step
    grad_norm_max: float
    grad_norm_last: float
    clipped_fraction: float  # share of steps with the norm above max_grad_norm
    main_who_rate: float  # main run: share of answers with this field exactly right
    main_where_rate: float
    main_year_rate: float
    main_misses: int  # held-out prompts the main run got wrong
    main_misses_year_right: int  # ... of which the year was right
    main_tokens_per_s: float  # median over steps
    main_train_time_s: float
    best_lr: float  # the LR sweep's best run (highest exact rate, then lowest final eval loss)
    best_lr_exact_rate: float
    n_runs: int  # fine-tuning runs of the plan
    general_text: str  # what the forgetting perplexity is measured on
    eval_every: int  # steps between eval-loss points
    max_new_tokens: int
    warmup_ratio: float
    max_grad_norm: float
    alpha_per_rank: float
    ppl_tokens: int  # tokens of general text in the perplexity
    n_layers: int  # layers of the base model
    moments_step: int  # the last Adam-moment snapshot
    moments_v_first_layer: float  # mean sqrt(v) over the first layer's LoRA parameters
    moments_v_last_layer: float
    moments_v_min: float
    moments_v_min_layer: int
    moments_v_max_layer: int
    moments_b_over_a: float  # mean sqrt(v) of the B matrices over that of the A matrices
    moments_top_module: str  # module type with the largest mean sqrt(v)
    moments_top_module_over_bottom: float
    track_wall_time_s: float  # this invocation (finished runs are reused)
    train_time_total_s: float  # every run's time in training steps
    # every run's own wall time (load, train, evaluate) plus the base model's evaluation, across resumptions
    runs_wall_time_total_s: float


def summarize(
    profile: Profile,
    cfg: FinetuneConfig,
    specs: list[RunSpec],
    base: dict,
    results: dict[str, dict],
    runs: pl.DataFrame,
    anatomy: pl.DataFrame,
    answers: pl.DataFrame,
    general_text: str,
    wall_time_s: float,
) -> FinetuneSummary:
    """The headline numbers, from the ``runs``, ``anatomy`` and main-run ``answers`` frames and the raw results."""
    main = runs.filter(pl.col("run") == "main").row(0, named=True)
    base_r = runs.filter(pl.col("run") == "base").row(0, named=True)
    div = frames.divergence_step(anatomy.filter(pl.col("eval_loss").is_not_null()).select("step", "eval_loss"))
    misses = answers.filter(~pl.col("exact"))
    best = frames.best_lr(frames.outcomes(runs, "lr", "lr"))
    moments = pl.DataFrame(results["main"]["log"]["moments"])
    rates = frames.field_rates(answers)
    return FinetuneSummary(
        model="SmolLM2-135M-Instruct" if profile.name == "cpu" else profile.lm,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        epochs=cfg.epochs,
        main_lr=cfg.lr,
        main_rank=cfg.rank,
        main_batch=cfg.batch_size,
        main_steps=main["steps"],
        main_trainable_params=main["trainable_params"],
        base_format_rate=base_r["format_rate"],
        base_exact_rate=base_r["exact_rate"],
        base_exact_hi=base_r["exact_hi"],
        base_ppl=base_r["ppl"],
        base_probes_retained=base_r["probes_retained"],
        probes_n=base_r["probes_n"],
        main_format_rate=main["format_rate"],
        main_exact_rate=main["exact_rate"],
        main_exact_lo=main["exact_lo"],
        main_exact_hi=main["exact_hi"],
        main_ppl=main["ppl"],
        main_ppl_ratio=main["ppl_ratio"],
        main_probes_retained=main["probes_retained"],
        main_first_eval_loss=main["first_eval_loss"],
        main_final_eval_loss=main["final_eval_loss"],
        main_best_eval_loss=main["best_eval_loss"],
        main_best_eval_step=main["best_eval_step"],
        main_final_train_loss=main["final_train_loss"],
        divergence_step=div if div is not None else -1,
        **frames.grad_norms(anatomy, cfg.max_grad_norm),
        main_who_rate=rates["who_rate"],
        main_where_rate=rates["where_rate"],
        main_year_rate=rates["year_rate"],
        main_misses=misses.height,
        main_misses_year_right=int(misses["year_ok"].sum()),
        main_tokens_per_s=main["tokens_per_s"],
        main_train_time_s=main["train_time_s"],
        best_lr=best["lr"],
        best_lr_exact_rate=best["exact_rate"],
        n_runs=len(specs),
        general_text=general_text,
        eval_every=schedule_steps(cfg.n_train, cfg)[2],
        max_new_tokens=cfg.max_new_tokens,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        alpha_per_rank=cfg.alpha_per_rank,
        ppl_tokens=PPL_WINDOW * PPL_WINDOWS,
        n_layers=int(moments["layer"].max()) + 1,
        **frames.moments_summary(moments),
        track_wall_time_s=wall_time_s,
        train_time_total_s=float(runs["train_time_s"].drop_nulls().sum()),
        runs_wall_time_total_s=float(runs["wall_time_s"].drop_nulls().sum()) + base["eval_time_s"],
    )
