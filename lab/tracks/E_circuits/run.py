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
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import polars as pl
import torch

from lab import paths
from lab.data.constraints import (
    CONSTRAINTS,
    concepts,
    constraint_dataset,
    encode_texts,
    held_out_prompts,
    mean_token_loss,
    score_prompts,
)
from lab.data.corpus import load_corpus
from lab.data.records import chat_text
from lab.errors import LabError
from lab.interp import transcoders
from lab.io import atomic_write_text, publish_dir
from lab.models.loading import LoadedModel, load_model
from lab.profiles import Profile
from lab.results import write_result
from lab.tracks.E_circuits import charts, frames
from lab.tracks.E_circuits.config import (
    JSON_EDGE_THRESHOLD,
    JSON_NODE_THRESHOLD,
    LEARNED,
    RECIPES,
    SEED_PROMPTS,
    TRACK,
    CircuitsConfig,
    config_for,
)
from lab.tracks.E_circuits.summary import CircuitsSummary, summarize
from lab.train.lora import FinetuneConfig, fresh_base, load_adapter, train_lora


def run(profile: Profile, *, fresh: bool = False, write: bool = True, progress: bool = True) -> CircuitsSummary:
    """Fine-tune (resuming unless ``fresh``), score every checkpoint, trace and compare their circuits, write."""
    t0 = time.perf_counter()
    cfg = config_for(profile)
    lm = base_model(profile, cfg)
    train_rows, val_rows, val_by_type = corpus_rows(lm.tokenizer, cfg)
    ft = replace(cfg.finetune, n_train=len(train_rows), n_test=len(val_rows))
    trained = train_lora(lm, ft, run_dir(profile), rows=(train_rows, val_rows), resume=not fresh,
                         progress=progress, desc="constraints")
    stages = training_stages(run_dir(profile), trained.total_steps)
    prompts, losses = score_stages(profile, cfg, stages, val_by_type, trained.total_steps)
    checkpoints = frames.checkpoints_frame(prompts, losses)

    t_circuits = time.perf_counter()
    tc_set, tc_meta = circuit_transcoders(profile, cfg, progress=progress)
    records, graph_json = attribution_graphs(profile, cfg, lm.tokenizer, stages, trained.total_steps, tc_set,
                                             tc_meta, progress=progress)
    graphs, compare = frames.graphs_frame(records), frames.compare_frame(records)
    stats, tests = frames.circuit_stats(graphs, compare)
    layers = pl.DataFrame(tc_meta["layers"])
    nodes, edges = frames.graph_frames(records)
    circuits_s = time.perf_counter() - t_circuits
    stopping = frames.stopping_rules(checkpoints, compare, cfg.settle)

    train_log, _, _ = trained.log.frames()
    summary = summarize(
        model=lm.name, cfg=cfg, finetune=ft, n_train=len(train_rows), n_validation=len(val_rows),
        n_prompts=prompts.height // len(stages), steps=trained.total_steps, trainable_params=trained.trainable_params,
        checkpoints=checkpoints, train_log=train_log, transcoders=layers, transcoder_meta=tc_meta, graphs=graphs,
        n_graph_prompts=len(records) // len(stages), circuits_wall_s=circuits_s, stopping=stopping,
        wall_time_s=time.perf_counter() - t0)
    if write:
        results = {"checkpoints": checkpoints, "prompts": prompts, "loss": train_log.select("step", "loss", "lr", "grad_norm"),
                   "transcoders": layers, "graphs": graphs, "circuit_compare": compare, "circuit_stats": stats,
                   "circuit_tests": tests, "stopping": stopping,
                   "stopping_sweep": frames.settle_sweep(checkpoints, compare), "graph_edges": edges,
                   "graph_nodes": nodes, "summary": summary.frame()}
        write_results(profile, provenance_config(cfg, ft, tc_meta), ft.seed, summary.wall_time_s, results, graph_json)
    return summary


# ------------------------------------------------------------------------------------------------- fine-tuning


def run_dir(profile: Profile) -> Path:
    """The LoRA run's folder (its ``checkpoint-<step>`` adapters)."""
    return paths.checkpoint_dir(profile.name, TRACK, "ws3")


def base_model(profile: Profile, cfg: CircuitsConfig) -> LoadedModel:
    """A fresh copy of the model the track fine-tunes: the profile's, or ``cfg.model`` from the hub."""
    if cfg.model is None:
        return fresh_base(profile)
    import os

    if not torch.cuda.is_available():
        raise LabError(f"Track E's {profile.name} profile fine-tunes {cfg.model} on a CUDA GPU "
                       f"(torch.cuda.is_available() is False): use --profile cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16, device_map="cuda",
                                                     attn_implementation="eager")
    except OSError as e:
        hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise LabError(f"could not load {cfg.model} from the Hugging Face hub{hint}: {str(e).splitlines()[0]}; "
                       f"accept its licence on huggingface.co, log in (`huggingface-cli login`) and unset "
                       f"HF_HUB_OFFLINE") from None
    return LoadedModel(model=model, tokenizer=tok, name=cfg.model, arch=model.config.model_type)


def corpus_rows(tokenizer, cfg: CircuitsConfig) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """The constraint corpus as LoRA rows: train, validation, and validation by constraint type."""
    ds = constraint_dataset(cfg.per_type, cfg.finetune.seed)
    loss_on = concepts() if cfg.loss == "concept" else None
    train = encode_texts(tokenizer, ds["train"]["text"], loss_on)
    val = encode_texts(tokenizer, ds["validation"]["text"], loss_on)
    by_type = {c: [r for r, t in zip(val, ds["validation"]["constraint_type"], strict=True) if t == c]
               for c in CONSTRAINTS}
    if any(not rows for rows in by_type.values()):
        raise LabError(f"the validation split lacks a constraint type: raise per_type (now {cfg.per_type})")
    return train, val, by_type


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every saved checkpoint, in training order."""
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if (p / "adapter_model.safetensors").exists()]
    return sorted(found, key=lambda x: x[0])


def training_stages(folder: Path, total: int) -> list[tuple[int, Path | None]]:
    """``(step, adapter folder)`` of the base model (step 0, no adapter) and the checkpoints at each quarter."""
    stages = [(0, None)] + checkpoints(folder)
    if [s for s, _ in stages[1:]] != sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}):
        raise LabError(f"expected checkpoints at 25/50/75/100 % of {total} steps in {folder}: rerun with --fresh")
    return stages


def score_stages(profile: Profile, cfg: CircuitsConfig, stages: list, val_by_type: dict[str, list[dict]],
                 total: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per stage: every held-out prompt's score (``lab.data.constraints.score_prompts``) and each constraint
    type's validation loss."""
    prompt_frames, loss_rows = [], []
    for i, (step, adapter) in enumerate(stages):
        base = base_model(profile, cfg)
        model = base.model if adapter is None else load_adapter(base, adapter)
        model.eval()
        scored = score_prompts(model, base.tokenizer, held_out_prompts())
        prompt_frames.append(scored.with_columns(checkpoint=pl.lit(i), step=pl.lit(step), fraction=pl.lit(step / total)))
        loss_rows += [{"checkpoint": i, "constraint_type": c, "val_loss": mean_token_loss(model, rows)}
                      for c, rows in val_by_type.items()]
    return pl.concat(prompt_frames), pl.DataFrame(loss_rows)


def final_models(profile: Profile):
    """``(base LoadedModel, fine-tuned model or None)``: the final checkpoint of the last run (the notebook's
    prompt box); None before the track has run on this profile."""
    cfg = config_for(profile)
    saved = checkpoints(run_dir(profile))
    base = base_model(profile, cfg)
    return base, (load_adapter(base_model(profile, cfg), saved[-1][1]) if saved else None)


# ---------------------------------------------------------------------------------------------------- circuits


def build_transcoders(profile: Profile, fresh: bool = False, progress: bool = True) -> str:
    """``lab transcoders build``: train the profile's transcoders (unless built with this recipe, or ``fresh``);
    the one-line report."""
    meta = ensure_transcoders(profile, config_for(profile), fresh=fresh, progress=progress)
    worst = max(meta["layers"], key=lambda r: r["fvu"])
    mean = sum(r["fvu"] for r in meta["layers"]) / meta["n_layers"]
    return (f"transcoders for {meta['model']} in {paths.transcoder_dir(profile.name)}: {meta['n_layers']} layers x "
            f"{meta['d_transcoder']} features (TopK {meta['k']}), trained {meta['train_s']:.0f} s; held-out FVU "
            f"mean {mean:.3f}, worst {worst['fvu']:.3f} (layer {worst['layer']})")


def ensure_transcoders(profile: Profile, cfg: CircuitsConfig, *, fresh: bool = False, progress: bool = True) -> dict:
    """The meta of the profile's trained transcoders, building them first when missing, stale or ``fresh``."""
    if cfg.transcoders is None:
        trains = ", ".join(name for name, recipe in RECIPES.items() if recipe.transcoders is not None)
        raise LabError(f"profile {profile.name!r} does not train transcoders: it loads GemmaScope's from the hub "
                       f"(`lab transcoders build` runs for {trains})")
    folder = paths.transcoder_dir(profile.name)
    meta = None if fresh else transcoders.built(cfg.transcoders, folder)
    if meta is None:  # load the model only when there is something to train
        meta = transcoders.build(cfg.transcoders, load_model(profile), folder, corpus=load_corpus(profile),
                                 fresh=fresh, progress=progress)
    return meta


def circuit_transcoders(profile: Profile, cfg: CircuitsConfig, progress: bool = True):
    """``(TranscoderSet, meta)``: ours, built when missing (cpu / smoke), or circuit-tracer's hub set (gpu)."""
    if cfg.hub_transcoders is None:
        ensure_transcoders(profile, cfg, progress=progress)
        return transcoders.load_transcoders(paths.transcoder_dir(profile.name))
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    try:
        tcs, _ = load_transcoder_from_hub(cfg.hub_transcoders, device=torch.device("cuda"), dtype=torch.bfloat16)
    except Exception as e:  # the hub client raises several types (offline, gated, missing)
        raise LabError(f"could not load the {cfg.hub_transcoders!r} transcoders (GemmaScope) from the Hugging Face "
                       f"hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}; the gpu profile needs the "
                       f"network on first use (unset HF_HUB_OFFLINE)") from None
    meta = {"model": cfg.model, "source": f"hub:{cfg.hub_transcoders}", "n_layers": len(tcs),
            "d_transcoder": tcs.d_transcoder, "k": None, "config": {"hub": cfg.hub_transcoders, "seed": 0},
            "layers": [], "train_s": 0.0, "train_tokens_per_layer": 0}
    return tcs, meta


def graph_prompts(tokenizer, cfg: CircuitsConfig) -> list[dict]:
    """The prompts that get attribution graphs: seed prompts (chat format; followed at the top prediction) and,
    per constraint type, ``graph_per_word`` held-out prompts of each of the first ``graph_words`` words
    (followed at the right concept's first token)."""
    rows = [{"prompt_id": f"seed-{i}", "constraint_type": "seed", "word": "", "text": chat_text(tokenizer, s),
             "target": "", "target_id": None} for i, s in enumerate(SEED_PROMPTS[:cfg.seed_prompts])]
    by_word: dict[tuple[str, str], list] = {}
    for hp in held_out_prompts():
        by_word.setdefault((hp.constraint_type, hp.word), []).append(hp)
    for ctype, words in CONSTRAINTS.items():
        for w in list(words)[:cfg.graph_words]:
            for j, hp in enumerate(by_word[(ctype, w)][:cfg.graph_per_word]):
                tid = tokenizer(" " + hp.target, add_special_tokens=False)["input_ids"][0]
                rows.append({"prompt_id": f"{ctype}-{w}-{j}", "constraint_type": ctype, "word": w, "text": hp.prompt,
                             "target": hp.target, "target_id": tid})
    return rows


def attribution_graphs(profile: Profile, cfg: CircuitsConfig, tokenizer, stages: list, total: int, tc_set,
                       tc_meta: dict, progress: bool = True) -> tuple[list[dict], list[Path]]:
    """One record (``lab.interp.circuits.trace``) per stage and graph prompt, in stage order, each tagged with
    its stage and prompt; cached per transcoder build, adapter content and prompt. Also circuit-tracer's JSON
    files of the seed prompts' graphs at the base and final stage (committed to results/)."""
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from tqdm.auto import tqdm

    from lab.interp.circuits import export_model, replacement_model, trace

    tc_key = hashlib.sha256(json.dumps(tc_meta, sort_keys=True).encode()).hexdigest()[:10]
    work = paths.checkpoint_dir(profile.name, TRACK, "circuits", f"tc-{tc_key}-nodes{cfg.max_feature_nodes}")
    prompts = graph_prompts(tokenizer, cfg)
    on_gpu = cfg.model is not None
    records: list[dict] = []
    json_files: list[Path] = []
    bar = tqdm(total=len(stages) * len(prompts), desc="attribution graphs", disable=not progress, unit="graph")
    for i, (step, adapter) in enumerate(stages):
        key = "base" if adapter is None else \
            hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:10]
        stage_dir = work / f"stage-{key}"
        todo = [pr for pr in prompts if not (stage_dir / f"{pr['prompt_id']}.json").exists()]
        if todo:
            lm = base_model(profile, cfg)
            model = lm.model if adapter is None else load_adapter(lm, adapter)
            folder = export_model(model, lm.tokenizer, work / "models" / f"stage-{key}")
            replacement = replacement_model(folder, tc_set, device="cuda" if on_gpu else "cpu",
                                            dtype=torch.bfloat16 if on_gpu else torch.float32)
            stage_dir.mkdir(parents=True, exist_ok=True)
            for pr in todo:
                t1 = time.perf_counter()
                rec, graph = trace(replacement, pr["text"], target_id=pr["target_id"],
                                   max_feature_nodes=cfg.max_feature_nodes)
                rec["attribution_s"] = time.perf_counter() - t1
                rec["tokens"] = [lm.tokenizer.decode([t]) for t in rec["input_tokens"]]
                if pr["constraint_type"] == "seed" and i in (0, len(stages) - 1):
                    create_graph_files(graph, f"{pr['prompt_id']}-stage-{i}", str(stage_dir / "json"),
                                       scan=tc_set.scan, node_threshold=JSON_NODE_THRESHOLD,
                                       edge_threshold=JSON_EDGE_THRESHOLD)
                atomic_write_text(stage_dir / f"{pr['prompt_id']}.json", json.dumps(rec))
                bar.update(1)
            del replacement, model, lm
        bar.update(len(prompts) - len(todo))
        json_files += sorted((stage_dir / "json").glob(f"*-stage-{i}.json"))
        for pr in prompts:
            rec = json.loads((stage_dir / f"{pr['prompt_id']}.json").read_text())
            rec |= {"checkpoint": i, "step": step, "fraction": step / total, "prompt_id": pr["prompt_id"],
                    "constraint_type": pr["constraint_type"], "word": pr["word"], "n_layers": tc_meta["n_layers"]}
            records.append(rec)
    bar.close()
    return records, json_files


# ------------------------------------------------------------------------------------------------------ writing


def provenance_config(cfg: CircuitsConfig, ft: FinetuneConfig, tc_meta: dict) -> dict:
    """The config recorded beside every result: the recipe as run, with the transcoders' build config."""
    return {"per_type": cfg.per_type, "finetune": asdict(ft), "loss": cfg.loss, "learned_threshold": LEARNED,
            "graph_words": cfg.graph_words, "graph_per_word": cfg.graph_per_word,
            "max_feature_nodes": cfg.max_feature_nodes, "settle": cfg.settle, "transcoders": tc_meta["config"]}


CHARTS = {"checkpoints": charts.plot_checkpoints, "loss": charts.plot_loss, "transcoders": charts.plot_transcoders,
          "circuit_stats": charts.plot_circuit_stats}


def write_results(profile: Profile, config: dict, seed: int, wall_time_s: float, results: dict[str, pl.DataFrame],
                  json_files: list[Path]) -> None:
    """Every result (the graph drawing reads the edges back), then circuit-tracer's JSON under ``graphs/``."""
    kw = dict(config=config, seed=seed, profile=profile.name, wall_time_s=wall_time_s)
    folder = paths.track_results(TRACK, profile.name)

    def graph_chart(nodes: pl.DataFrame):  # one prompt's graph per checkpoint; the edges are written first
        return charts.plot_graph(frames.graph_drawing(nodes, pl.read_parquet(folder / "graph_edges.parquet")))

    for name, frame in results.items():
        write_result(TRACK, name, frame, chart=graph_chart if name == "graph_nodes" else CHARTS.get(name), **kw)
    with publish_dir(folder / "graphs") as out:  # the folder replaced whole
        for f in json_files:
            shutil.copy(f, out / f.name)
