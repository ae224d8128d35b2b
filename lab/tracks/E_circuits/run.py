"""Track E's outline: fine-tune on the constraint corpus with checkpoints at every quarter, score each checkpoint,
trace every graph prompt at each checkpoint with circuit-tracer, compare the graphs and two stopping rules, write
results/E_circuits/. Also ``build_transcoders`` (``lab transcoders build``) and the notebook's ``final_models``.

Resumable work lives under ``lab.paths.checkpoint_dir(profile, "E_circuits", ...)``: ``ws3/`` holds the LoRA
run's checkpoints, ``circuits/tc-<transcoders>-nodes<N>/`` each stage's merged model and graph records (keyed by
the transcoder build and the adapter's content, so a retrained checkpoint never reuses an old graph). The
transcoders themselves are a build artifact in ``lab.paths.transcoder_dir(profile)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import torch

from lab import paths
from lab.data import constraints
from lab.data.corpus import load_corpus
from lab.errors import LabError
from lab.interp import circuits, quality, transcoders
from lab.models.loading import LoadedModel, load_hub_model, load_model
from lab.plots import chart_for, needs
from lab.profiles import Profile
from lab.results import result_set, write_result
from lab.tracks.E_circuits import charts, config, frames
from lab.tracks.E_circuits.config import CircuitsConfig
from lab.tracks.E_circuits.summary import CircuitsSummary, summarize
from lab.train.evaluation import labelled_token_loss
from lab.train.lora import FinetuneConfig, fresh_base, load_adapter, train_lora

TRACK = config.TRACK


def run(profile: Profile, *, fresh: bool = False, write: bool = True, progress: bool = True) -> CircuitsSummary:
    """Fine-tune (resuming unless ``fresh``), score every checkpoint, trace and compare their circuits, write."""
    t0 = time.perf_counter()
    cfg = config.config_for(profile)
    lm = base_model(profile, cfg)
    train_rows, val_rows, val_by_type = corpus_rows(lm.tokenizer, cfg)
    ft = replace(cfg.finetune, n_train=len(train_rows), n_test=len(val_rows))
    trained = train_lora(
        lm, ft, run_dir(profile), rows=(train_rows, val_rows), resume=not fresh, progress=progress, desc="constraints"
    )
    stages = training_stages(run_dir(profile), trained.total_steps)
    prompts, losses = score_stages(profile, cfg, stages, val_by_type, trained.total_steps)
    checkpoints = frames.checkpoints_frame(prompts, losses)

    t_circuits = time.perf_counter()
    tc_set, tc_meta = circuit_transcoders(profile, cfg, progress=progress)
    records, graph_json = attribution_graphs(
        profile, cfg, lm.tokenizer, stages, trained.total_steps, tc_set, tc_meta, progress=progress
    )
    circuit = frames.circuit_frames(records, tc_meta, checkpoints, cfg.settle)
    runs = {cfg.seeds[0]: (checkpoints, records)}
    for seed in cfg.seeds[1:]:
        runs[seed] = seed_run(profile, cfg, seed, (train_rows, val_rows), val_by_type, tc_set, tc_meta, fresh, progress)
    circuit |= seed_frames(runs, float(circuit["stopping"]["threshold"][0]))
    if cfg.adapt_steps:
        circuit |= adapted_graphs(profile, cfg, lm.tokenizer, stages, trained.total_steps, records, progress)
    labels = feature_labels(profile, cfg, lm.tokenizer, graph_json)
    if labels.height:
        circuit["feature_labels"] = labels
    circuits_s = time.perf_counter() - t_circuits

    train_log, _, _ = trained.log.frames()
    results = {"checkpoints": checkpoints, "prompts": prompts, "loss": train_log.select(*LOSS_COLUMNS)} | circuit
    summary = summarize(
        model=lm.name,
        cfg=cfg,
        finetune=ft,
        trained=trained,
        train_log=train_log,
        results=results,
        transcoder_meta=tc_meta,
        circuits_wall_s=circuits_s,
        wall_time_s=time.perf_counter() - t0,
    )
    if write:
        results["summary"] = summary.frame()
        write_results(profile, provenance_config(cfg, ft, tc_meta), ft.seed, summary.wall_time_s, results, graph_json)
    return summary


# ------------------------------------------------------------------------------------------------- fine-tuning

LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm")  # the training log's columns in the ``loss`` result


def run_dir(profile: Profile, seed: int | None = None) -> Path:
    """The LoRA run's folder (its ``checkpoint-<step>`` adapters): the main run's, or another fine-tune seed's."""
    return paths.checkpoint_dir(profile.name, TRACK, "ws3" if seed is None else f"ws3-seed{seed}")


def seed_run(
    profile: Profile,
    cfg: CircuitsConfig,
    seed: int,
    rows: tuple[list[dict], list[dict]],
    val_by_type: dict[str, list[dict]],
    tc_set,
    tc_meta: dict,
    fresh: bool,
    progress: bool,
) -> tuple[pl.DataFrame, list[dict]]:
    """One more fine-tune seed on the main run's corpus: its checkpoints frame and the graph records of the
    stopping prompts (the first held-out prompt of each graph word) at every stage."""
    lm = base_model(profile, cfg)
    ft = replace(cfg.finetune, seed=seed, n_train=len(rows[0]), n_test=len(rows[1]))
    folder = run_dir(profile, seed)
    trained = train_lora(
        lm, ft, folder, rows=rows, resume=not fresh, progress=progress, desc=f"constraints seed {seed}"
    )
    stages = training_stages(folder, trained.total_steps)
    prompts, losses = score_stages(profile, cfg, stages, val_by_type, trained.total_steps)
    stopping = constraints.graph_prompts(lm.tokenizer, (), cfg.graph_words, 1)
    records, _ = attribution_graphs(
        profile, cfg, lm.tokenizer, stages, trained.total_steps, tc_set, tc_meta, progress=progress, prompts=stopping
    )
    return frames.checkpoints_frame(prompts, losses), records


def seed_frames(runs: dict[int, tuple[pl.DataFrame, list[dict]]], threshold: float) -> dict[str, pl.DataFrame]:
    """Every seed's checkpoints and both stopping rules per seed (the circuit rule at the pre-registered
    ``threshold``)."""
    return {
        "seed_checkpoints": pl.concat(
            [ck.with_columns(seed=pl.lit(seed)) for seed, (ck, _) in sorted(runs.items())]
        ).select("seed", pl.exclude("seed")),
        "seed_stopping": frames.seed_stopping(runs, threshold).with_columns(threshold=pl.lit(threshold)),
    }


def base_model(profile: Profile, cfg: CircuitsConfig) -> LoadedModel:
    """A fresh copy of the model the track fine-tunes: the profile's, or ``cfg.model`` from the hub in bf16."""
    return fresh_base(profile) if cfg.model is None else load_hub_model(cfg.model, dtype=torch.bfloat16)


def stage_model(profile: Profile, cfg: CircuitsConfig, adapter: Path | None) -> tuple:
    """``(model, tokenizer)`` of one stage: a fresh base model, with the stage's adapter unless it is the base."""
    lm = base_model(profile, cfg)
    return (lm.model if adapter is None else load_adapter(lm, adapter)), lm.tokenizer


def corpus_rows(tokenizer, cfg: CircuitsConfig) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """The constraint corpus as LoRA rows: train, validation, and validation by constraint type."""
    ds = constraints.constraint_dataset(cfg.per_type, cfg.finetune.seed)
    loss_on = constraints.concepts() if cfg.loss == "concept" else None
    train = constraints.encode_texts(tokenizer, ds["train"]["text"], loss_on)
    val = constraints.encode_texts(tokenizer, ds["validation"]["text"], loss_on)
    by_type = {
        c: [r for r, t in zip(val, ds["validation"]["constraint_type"], strict=True) if t == c]
        for c in constraints.CONSTRAINTS
    }
    if any(not rows for rows in by_type.values()):
        raise LabError(f"the validation split lacks a constraint type: raise per_type (now {cfg.per_type})")
    return train, val, by_type


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every saved checkpoint, in training order."""
    found = [
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-*")
        if (p / "adapter_model.safetensors").exists()
    ]
    return sorted(found, key=lambda x: x[0])


def training_stages(folder: Path, total: int) -> list[tuple[int, Path | None]]:
    """``(step, adapter folder)`` of the base model (step 0, no adapter) and the checkpoints at each quarter."""
    stages = [(0, None)] + checkpoints(folder)
    if [s for s, _ in stages[1:]] != sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}):
        raise LabError(f"expected checkpoints at 25/50/75/100 % of {total} steps in {folder}: rerun with --fresh")
    return stages


def score_stages(
    profile: Profile, cfg: CircuitsConfig, stages: list, val_by_type: dict[str, list[dict]], total: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per stage: every held-out prompt's score (``lab.data.constraints.score_prompts``) and each constraint
    type's validation loss."""
    prompt_frames, loss_rows = [], []
    for i, (step, adapter) in enumerate(stages):
        model, tokenizer = stage_model(profile, cfg, adapter)
        model.eval()
        scored = constraints.score_prompts(model, tokenizer, constraints.held_out_prompts())
        prompt_frames.append(
            scored.with_columns(checkpoint=pl.lit(i), step=pl.lit(step), fraction=pl.lit(step / total))
        )
        loss_rows += [
            {"checkpoint": i, "constraint_type": c, "val_loss": labelled_token_loss(model, rows)}
            for c, rows in val_by_type.items()
        ]
    return pl.concat(prompt_frames), pl.DataFrame(loss_rows)


def final_models(profile: Profile):
    """``(base LoadedModel, fine-tuned model or None)``: the final checkpoint of the last run (the notebook's
    prompt box); None before the track has run on this profile."""
    cfg = config.config_for(profile)
    saved = checkpoints(run_dir(profile))
    base = base_model(profile, cfg)
    return base, (load_adapter(base_model(profile, cfg), saved[-1][1]) if saved else None)


# ---------------------------------------------------------------------------------------------------- circuits

ADAPTER_FILE = "adapter_model.safetensors"  # a checkpoint's weights: their content keys the stage's graphs


def build_transcoders(profile: Profile, fresh: bool = False, progress: bool = True) -> str:
    """``lab transcoders build``: train the profile's transcoders (unless built with this recipe, or ``fresh``);
    the one-line report."""
    meta = ensure_transcoders(profile, config.config_for(profile), fresh=fresh, progress=progress)
    worst = max(meta["layers"], key=lambda r: r["fvu"])
    mean = sum(r["fvu"] for r in meta["layers"]) / meta["n_layers"]
    return (
        f"transcoders for {meta['model']} in {paths.transcoder_dir(profile.name)}: {meta['n_layers']} layers x "
        f"{meta['d_transcoder']} features (TopK {meta['k']}), trained {meta['train_s']:.0f} s; held-out FVU "
        f"mean {mean:.3f}, worst {worst['fvu']:.3f} (layer {worst['layer']})"
    )


def ensure_transcoders(profile: Profile, cfg: CircuitsConfig, *, fresh: bool = False, progress: bool = True) -> dict:
    """The meta of the profile's trained transcoders, building them first when missing, stale or ``fresh``."""
    if cfg.transcoders is None:
        trains = ", ".join(name for name, recipe in config.RECIPES.items() if recipe.transcoders is not None)
        raise LabError(
            f"profile {profile.name!r} does not train transcoders: it loads GemmaScope's from the hub "
            f"(`lab transcoders build` runs for {trains})"
        )
    folder = paths.transcoder_dir(profile.name)
    meta = None if fresh else transcoders.built(cfg.transcoders, folder)
    if meta is None:  # load the model only when there is something to train
        meta = transcoders.build(
            cfg.transcoders, load_model(profile), folder, corpus=load_corpus(profile), fresh=fresh, progress=progress
        )
    return meta


def circuit_transcoders(profile: Profile, cfg: CircuitsConfig, progress: bool = True):
    """``(TranscoderSet, meta)``: ours, built when missing (cpu / smoke), or circuit-tracer's hub set (gpu)."""
    if cfg.hub_transcoders is not None:
        return circuits.load_hub_transcoders(cfg.hub_transcoders, cfg.model, device="cuda", dtype=torch.bfloat16)
    ensure_transcoders(profile, cfg, progress=progress)
    return transcoders.load_transcoders(paths.transcoder_dir(profile.name))


def attribution_graphs(
    profile: Profile,
    cfg: CircuitsConfig,
    tokenizer,
    stages: list,
    total: int,
    tc_set,
    tc_meta: dict,
    progress: bool,
    prompts: list[dict] | None = None,
) -> tuple[list[dict], list[Path]]:
    """One record (``lab.interp.circuits.trace``) per stage and graph prompt, in stage order, each tagged with
    its stage and prompt; cached per transcoder build, adapter content and prompt. Every record has its
    accounting, the seed prompts' records their intervention checks. Also circuit-tracer's JSON files of the seed
    prompts' graphs at every stage (committed to results/, labelled by ``feature_labels``). ``prompts``: another
    list than the main run's (``lab.data.constraints.graph_prompts``)."""
    from tqdm.auto import tqdm

    tc_key = hashlib.sha256(json.dumps(tc_meta, sort_keys=True).encode()).hexdigest()[:10]
    work = paths.checkpoint_dir(profile.name, TRACK, "circuits", f"tc-{tc_key}-nodes{cfg.max_feature_nodes}")
    if prompts is None:  # the main run's: seed prompts and every graph word's prompts
        prompts = constraints.graph_prompts(
            tokenizer, config.SEED_PROMPTS[: cfg.seed_prompts], cfg.graph_words, cfg.graph_per_word
        )
    seeds = {pr["prompt_id"] for pr in prompts if pr["constraint_type"] == "seed"}
    on_gpu = cfg.model is not None
    records: list[dict] = []
    json_files: list[Path] = []
    bar = tqdm(total=len(stages) * len(prompts), desc="attribution graphs", disable=not progress, unit="graph")
    for i, (step, adapter) in enumerate(stages):
        key = "base" if adapter is None else hashlib.sha256((adapter / ADAPTER_FILE).read_bytes()).hexdigest()[:10]
        stage_dir = work / f"stage-{key}"
        traced = circuits.trace_prompts(
            partial(stage_model, profile, cfg, adapter),
            tc_set,
            prompts,
            stage_dir,
            work / "models" / f"stage-{key}",
            max_feature_nodes=cfg.max_feature_nodes,
            json_for=seeds,
            check_for=seeds,
            check_top=cfg.check_top,
            json_suffix=f"-stage-{i}",
            json_thresholds=(config.JSON_NODE_THRESHOLD, config.JSON_EDGE_THRESHOLD),
            device="cuda" if on_gpu else "cpu",
            dtype=torch.bfloat16 if on_gpu else torch.float32,
            on_traced=bar.update,
        )
        bar.update(len(prompts) - traced)
        json_files += sorted((stage_dir / "json").glob(f"*-stage-{i}.json"))
        stage_tags = {"checkpoint": i, "step": step, "fraction": step / total}
        for pr in prompts:
            prompt_tags = {"prompt_id": pr["prompt_id"], "constraint_type": pr["constraint_type"], "word": pr["word"]}
            tags = stage_tags | prompt_tags | {"n_layers": tc_meta["n_layers"]}
            records.append(circuits.read_record(stage_dir, pr["prompt_id"]) | tags)
    bar.close()
    return records, json_files


def adapted_graphs(
    profile: Profile, cfg: CircuitsConfig, tokenizer, stages: list, total: int, records: list[dict], progress: bool
) -> dict[str, pl.DataFrame]:
    """The alternative explanation of a large error share, tested: the base model's transcoders continued for
    ``cfg.adapt_steps`` steps on the final checkpoint's activations (a fifth of their learning rate), then every
    main prompt traced again at the final checkpoint with them. Returns ``adapted`` (per prompt: error shares and
    feature overlaps with base-model and adapted transcoders, ``frames.adapted_frame``) and ``adapted_quality``
    (per layer: held-out FVU of both sets on the fine-tuned model's activations)."""
    step, adapter = stages[-1]
    key = hashlib.sha256((adapter / ADAPTER_FILE).read_bytes()).hexdigest()[:10]
    base_dir = paths.transcoder_dir(profile.name)
    folder = base_dir.with_name(f"{base_dir.name}-adapted-{key}")
    acfg = replace(cfg.transcoders, steps=cfg.adapt_steps, lr=cfg.transcoders.lr / 5, eval_seqs=200, seed=1)
    model, _ = stage_model(profile, cfg, adapter)
    model = model.merge_and_unload().eval()
    meta = transcoders.built(acfg, folder)
    if meta is None:
        base = load_model(profile)  # only its name and architecture: the weights are the fine-tuned ones
        tuned = LoadedModel(model, tokenizer, f"{base.name}+{key}", base.arch)
        meta = transcoders.build(
            acfg, tuned, folder, corpus=load_corpus(profile), init_from=base_dir, progress=progress
        )
    base_set, base_meta = transcoders.load_transcoders(base_dir)
    eval_ids = transcoders.eval_sequences(acfg, tokenizer, load_corpus(profile))
    base_on_tuned = transcoders.measure(base_set, model, eval_ids, acfg.batch_seqs).rows()
    adapted_set, _ = transcoders.load_transcoders(folder)
    prompts = constraints.graph_prompts(
        tokenizer, config.SEED_PROMPTS[: cfg.seed_prompts], cfg.graph_words, cfg.graph_per_word
    )
    tags = {"checkpoint": len(stages) - 1, "step": step, "fraction": step / total, "n_layers": meta["n_layers"]}
    work = paths.checkpoint_dir(profile.name, TRACK, "circuits", f"adapted-{key}-nodes{cfg.max_feature_nodes}")
    circuits.trace_prompts(
        partial(stage_model, profile, cfg, adapter),
        adapted_set,
        prompts,
        work,
        work / "model",
        max_feature_nodes=cfg.max_feature_nodes,
    )
    adapted = [
        circuits.read_record(work, pr["prompt_id"])
        | tags
        | {"prompt_id": pr["prompt_id"], "constraint_type": pr["constraint_type"], "word": pr["word"]}
        for pr in prompts
    ]
    quality = [
        {
            "layer": b["layer"],
            "fvu_base": b["fvu"],
            "fvu_adapted": a["fvu"],
            "dead_base": b["dead_share"],
            "dead_adapted": a["dead_share"],
            "eval_tokens": a["tokens"],
        }
        for b, a in zip(base_on_tuned, meta["layers"], strict=True)
    ]
    return {"adapted": frames.adapted_frame(records, adapted), "adapted_quality": pl.DataFrame(quality)}


def feature_labels(profile: Profile, cfg: CircuitsConfig, tokenizer, json_files: list[Path]) -> pl.DataFrame:
    """Every feature of the published graphs with its label and top-activating held-out contexts
    (``lab.interp.quality.feature_labels``, from the transcoder build's held-out record); empty for hub
    transcoders, whose training text is not here."""
    if cfg.hub_transcoders is not None:
        return pl.DataFrame()
    top = transcoders.top_contexts(paths.transcoder_dir(profile.name))
    features = sorted({f for path in json_files for f in circuits.json_features(path)})
    return quality.label_frame(top, tokenizer, features)


# ------------------------------------------------------------------------------------------------------ writing


def provenance_config(cfg: CircuitsConfig, ft: FinetuneConfig, tc_meta: dict) -> dict:
    """The config recorded beside every result: the recipe as run, with the transcoders' build config."""
    return {
        "per_type": cfg.per_type,
        "finetune": asdict(ft),
        "loss": cfg.loss,
        "learned_threshold": config.LEARNED,
        "graph_words": cfg.graph_words,
        "graph_per_word": cfg.graph_per_word,
        "max_feature_nodes": cfg.max_feature_nodes,
        "settle": cfg.settle,
        "seeds": list(cfg.seeds),
        "adapt_steps": cfg.adapt_steps,
        "transcoders": tc_meta["config"],
    }


@needs("graph_edges")
def _graph(nodes: pl.DataFrame, graph_edges: pl.DataFrame) -> Any:
    """One prompt's graph per checkpoint (the edges are written before the nodes)."""
    return charts.plot_graph(frames.graph_drawing(nodes, graph_edges))


# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[..., Any]] = {
    "checkpoints": charts.plot_checkpoints,
    "loss": charts.plot_loss,
    "transcoders": charts.plot_transcoders,
    "circuit_stats": charts.plot_circuit_stats,
    # charts.plot_accounting, plot_interventions and plot_adapted join this registry with the first committed run
    # that writes their results (tests/test_charts.py holds the registry to the committed results)
    "graph_nodes": _graph,
}


def write_results(
    profile: Profile,
    provenance: dict,
    seed: int,
    wall_time_s: float,
    results: dict[str, pl.DataFrame],
    json_files: list,
) -> None:
    """Every result (the graph drawing reads the edges back), then circuit-tracer's JSON under ``graphs/``, all
    published as one set."""
    kw = dict(config=provenance, seed=seed, profile=profile.name, wall_time_s=wall_time_s)
    with result_set(TRACK, profile.name) as folder:  # the stage: results written so far can be read back from it

        def read(name: str) -> pl.DataFrame:
            return pl.read_parquet(folder / f"{name}.parquet")

        for name, frame in results.items():
            write_result(TRACK, name, frame, chart=chart_for(CHARTS, name, read), **kw)
        (folder / "graphs").mkdir()  # replaces the previous graphs/ whole
        labels = {}
        if "feature_labels" in results:
            labels = {(r["layer"], r["feature"]): r["label"] for r in results["feature_labels"].iter_rows(named=True)}
        for f in json_files:
            circuits.write_labelled(f, folder / "graphs" / f.name, labels)
