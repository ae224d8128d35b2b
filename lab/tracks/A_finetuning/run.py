"""Track A's outline: score the base model, train (or resume, or reuse) every run of the plan and score it,
build the frames, summarise, write results/A_finetuning/ and the instrumentation benchmark.

Finished runs are cached beside their checkpoints (``lab_eval.json``, keyed by the run's config and the probes),
so an interrupted track resumes where it stopped; ``fresh=True`` starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import polars as pl

from lab import paths
from lab.bench import finetune as overhead
from lab.data.records import PROBES, make_task
from lab.io import atomic_write_text, publish_dir
from lab.models.loading import load_model
from lab.profiles import Profile
from lab.results import result_set, write_result
from lab.state import read_json
from lab.tracks.A_finetuning import charts, frames
from lab.tracks.A_finetuning.config import TRACK, RunSpec, config_for, final_adapter_dir, plan
from lab.tracks.A_finetuning.summary import FinetuneSummary, summarize
from lab.train.callbacks import RunLog
from lab.train.evaluation import general_text, score_model
from lab.train.lora import FinetuneConfig, attach_lora, save_adapter, train_lora
from lab.train.schedule import optimizer_state_bytes

EVAL_FILE = "lab_eval.json"

# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[[pl.DataFrame], Any]] = {
    "runs": lambda f: charts.plot_forgetting(frames.forgetting_frame(f)),
    "anatomy": charts.plot_anatomy,
    "lr_curves": lambda f: charts.plot_curves(f, "lr", "learning rate"),
    "lr_outcomes": lambda f: charts.plot_outcomes(f, "lr", "learning rate"),
    "rank_curves": lambda f: charts.plot_curves(f, "rank", "LoRA rank"),
    "rank_outcomes": lambda f: charts.plot_outcomes(f, "rank", "LoRA rank"),
    "batch_lr": charts.plot_batch_lr,
    "moments": lambda f: charts.plot_moments(frames.moments_by_layer(f)),
    "moments_by_module": lambda f: charts.plot_moments_by_module(frames.moments_by_module(f)),
}


def run(
    profile: Profile,
    *,
    fresh: bool = False,
    write: bool = True,
    progress: bool = True,
    bench: bool = True,
    on_step: Callable[[str, int, int, RunLog], None] | None = None,
    only: tuple[str, ...] | None = None,
) -> FinetuneSummary:
    """Run every experiment of Track A (resuming unless ``fresh``) and write results/A_finetuning/.

    Args:
        profile: The profile (its main run is ``config.RECIPES[profile.name]``).
        fresh: Retrain every run instead of resuming / reusing finished runs.
        write: Write results (False: only return the summary).
        progress: tqdm bars.
        bench: Also run the instrumentation-overhead benchmark (:func:`benchmark`).
        on_step: Called after every logged step with (run name, step, total steps, log).
        only: Run names to train (default: all of :func:`config.plan`); ``main`` is always included.
    """
    t0 = time.perf_counter()
    cfg = config_for(profile)
    specs = [s for s in plan(cfg) if only is None or s.name in only or s.name == "main"]
    base = base_eval(profile, cfg, fresh)
    results = {s.name: run_one(profile, s, fresh=fresh, progress=progress, on_step=on_step) for s in specs}
    runs = frames.runs_frame(specs, results, base)
    anatomy = frames.anatomy_frame(results["main"])
    answers = frames.answers_frame(cfg, results["main"])
    text_name, _ = general_text(profile)
    summary = summarize(
        profile, cfg, specs, base, results, runs, anatomy, answers, text_name, wall_time_s=time.perf_counter() - t0
    )
    if not write or not _main_process():
        return summary
    prov = dict(
        config={
            "finetune": asdict(cfg),
            "runs": {s.name: asdict(s.cfg) for s in specs},
            "general_text": text_name,
            "probes": PROBES,
        },
        seed=cfg.seed,
        profile=profile.name,
        wall_time_s=summary.track_wall_time_s,
    )
    with result_set(TRACK, profile.name):  # the tables, the benchmark and the summary published together
        write_results(profile, cfg, specs, base, results, runs, anatomy, answers, prov)
        if bench and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # timing one process only means something alone
            benchmark(profile)
        summary = replace(summary, track_wall_time_s=time.perf_counter() - t0)
        write_result(TRACK, "summary", summary.frame(), **prov)
    return summary


def write_results(
    profile: Profile,
    cfg: FinetuneConfig,
    specs: list[RunSpec],
    base: dict,
    results: dict[str, dict],
    runs: pl.DataFrame,
    anatomy: pl.DataFrame,
    answers: pl.DataFrame,
    prov: dict,
) -> None:
    """Every table of the track but the summary, each with its chart (``CHARTS``) where it has one."""

    def w(name: str, frame: pl.DataFrame) -> None:
        write_result(TRACK, name, frame, chart=CHARTS.get(name), **prov)

    with result_set(TRACK, profile.name):  # joins run()'s set
        w("runs", runs)
        w("anatomy", anatomy)
        w("lr_curves", frames.curves_frame(specs, results, "lr"))
        w("lr_outcomes", frames.outcomes(runs, "lr", "lr"))
        w("rank_curves", frames.curves_frame(specs, results, "rank"))
        w("rank_outcomes", frames.outcomes(runs, "rank", "rank"))
        w("batch_lr", frames.curves_frame(specs, results, "batch"))
        w("batch_outcomes", frames.outcomes(runs, "batch", ["batch_size", "rule"]))
        moments = pl.DataFrame(results["main"]["log"]["moments"])
        w("moments", moments)
        w("moments_by_module", moments)
        w("optimizer_memory", optimizer_memory(profile, cfg))
        w("qlora", frames.qlora_frame(runs))
        w("samples", frames.samples_frame(base, results["main"]))
        w("answers", answers)
        w("fields", frames.fields_frame([("base", cfg, base)] + [(s.name, s.cfg, results[s.name]) for s in specs]))
        probes = frames.probes_frame(base, results, specs)
        w("probes", probes)
        w("probes_changed", frames.probes_changed(probes))


def benchmark(profile: Profile, *, steps: int = 6, repeats: int = 2) -> pl.DataFrame:
    """``lab bench finetune``: the instrumentation overhead of the main run's config (:mod:`lab.bench.finetune`),
    written to results/A_finetuning/benchmark.parquet."""
    cfg = config_for(profile)
    t0 = time.perf_counter()
    frame = overhead.run(profile, cfg, steps=steps, repeats=repeats)
    short = overhead.bench_config(cfg, steps)
    with result_set(TRACK, profile.name):  # alone (`lab bench`): the other files of the set are kept
        write_result(
            TRACK,
            "benchmark",
            frame,
            config={"finetune": short, "repeats": repeats},
            seed=short.seed,
            profile=profile.name,
            wall_time_s=time.perf_counter() - t0,
        )
    return frame


# ----------------------------------------------------------------------------- running and scoring


def _main_process() -> bool:
    """False in the non-zero ranks of an ``accelerate launch`` run: they train, but write nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def run_dir(profile: Profile, name: str) -> Path:
    """The checkpoint folder of one run of the plan (or ``base``)."""
    return paths.checkpoint_dir(profile.name, TRACK, name.replace("=", "").replace(", ", "_"))


def evaluate_model(model, tokenizer, cfg: FinetuneConfig, profile: Profile) -> dict:
    """Task success on the held-out prompts, general-text perplexity and probe retention of one model."""
    _, text = general_text(profile)
    return score_model(
        model, tokenizer, make_task(cfg.n_train, cfg.n_test, cfg.seed).test, cfg.max_new_tokens, text, PROBES
    )


def _cached(folder: Path, key: dict) -> dict | None:
    path = folder / EVAL_FILE
    if path.exists():
        saved = read_json(path, f"delete {paths.shown(path)} (the run is scored again) or pass --fresh")
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved
    return None


def base_eval(profile: Profile, cfg: FinetuneConfig, fresh: bool) -> dict:
    """The untrained model's scores (cached: they depend only on the task and the model)."""
    folder = run_dir(profile, "base")
    key = {
        "n_train": cfg.n_train,
        "n_test": cfg.n_test,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "probes": PROBES,
    }
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


def run_one(profile: Profile, spec: RunSpec, *, fresh: bool, progress: bool, on_step: Callable | None = None) -> dict:
    """Train (or resume, or reuse a finished) run and score it. Returns its logs and scores."""
    folder = run_dir(profile, spec.name)
    key = {"config": asdict(spec.cfg), "probes": PROBES}
    if not fresh and (hit := _cached(folder, key)):
        if spec.name == "main" and not (final_adapter_dir(profile) / "adapter_config.json").exists():
            _publish_adapter(folder / f"checkpoint-{hit['result']['steps']}", final_adapter_dir(profile))
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
        "steps": res.total_steps,
        "trainable_params": res.trainable_params,
        "weights_mb": res.model.get_base_model().get_memory_footprint() / 2**20,
        "train_time_s": float((steps["tokens"] / steps["tokens_per_s"]).sum()),
        "wall_time_s": time.perf_counter() - t0,
        "resumed_from": res.resumed_from,
        "log": {"steps": steps.to_dicts(), "evals": evals.to_dicts(), "moments": moments.to_dicts()},
    }
    if _main_process():
        atomic_write_text(folder / EVAL_FILE, json.dumps({"key": key, "result": result}))
    return result


def _publish_adapter(checkpoint: Path, folder: Path) -> None:
    """The adapter files of a finished run's last checkpoint, published as the track's final adapter."""
    with publish_dir(folder) as work:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(checkpoint / name, work / name)


def optimizer_memory(profile: Profile, cfg: FinetuneConfig) -> pl.DataFrame:
    """Optimizer-state memory measured for LoRA (main config) and full fine-tuning, AdamW and 8-bit AdamW."""
    lm = load_model(profile)
    n_total = sum(p.numel() for p in lm.model.parameters())
    full = list(lm.model.parameters())
    lora = [p for p in attach_lora(load_model(profile).model, cfg).parameters() if p.requires_grad]
    measured = [
        {
            "setting": setting,
            "kind": kind,
            "trainable_params": sum(p.numel() for p in params),
            "param_tensors": len(params),
            "state_bytes": optimizer_state_bytes(params, kind),
        }
        for setting, params in (("full fine-tuning", full), (f"LoRA rank {cfg.rank}", lora))
        for kind in ("adamw", "adamw8bit")
    ]
    return frames.optimizer_memory_frame(measured, n_total)
