"""Track E — circuit-informed fine-tuning: a synthetic constraint corpus (WS2), LoRA fine-tuning with adapters
saved at 25/50/75/100 % of training (WS3), and attribution graphs of the base model and every checkpoint with
circuit-tracer (WS1/WS5).

Per checkpoint (the base model counts as 0 %) and constraint type: held-out accuracy (the right concept's
log-probability beats every alternative's; ``lab.data.constraints.score_prompts``), the mean log-probability margin,
and the validation loss of that type's texts.

Circuits: per-layer transcoders are trained on the base model (``lab.transcoders``, cached build artifact);
every checkpoint's merged model + those transcoders form circuit-tracer's replacement model; each graph prompt
(the two seed prompts and a subset of the held-out constraint prompts, followed at the right concept's logit)
gets an attribution graph, pruned with circuit-tracer's defaults and reduced by ``lab.interp.circuits.trace``.
Checkpoints are compared per prompt (feature-node Jaccard, edge-weight correlation), summarised per constraint
type with bootstrap intervals and a sign-flip test, and two early-stopping rules are compared: stop when the
validation loss rises (loss rule) or when the circuit stops changing (circuit rule).

Writes to results/E_circuits/: ``checkpoints`` (+ chart), ``prompts``, ``loss`` (+ chart), ``transcoders``
(+ chart), ``graphs``, ``circuit_compare``, ``circuit_stats`` (+ chart), ``circuit_tests``, ``stopping``,
``stopping_sweep``, ``graph_nodes`` / ``graph_edges`` (+ chart of one graph per stage), ``summary``; circuit-tracer's own JSON of the
seed prompts' pruned graphs (base and final model) under ``graphs/``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import altair as alt
import polars as pl
import torch

from lab.data.constraints import CONSTRAINTS, concepts, constraint_dataset, encode_texts, held_out_prompts, mean_token_loss, score_prompts
from lab.errors import LabError
from lab.train.lora import FinetuneConfig, fresh_base, load_adapter, train_lora
from lab import paths
from lab.profiles import Profile, get_profile
from lab.results import write_result

TRACK = "E_circuits"
LEARNED = 0.9  # a constraint type counts as learned from the first checkpoint with this held-out accuracy
# circuit-tracer's JSON of the seed prompts' graphs (base and final model) is committed; at its default pruning
# (0.8 / 0.98) one graph is ~2.6 MB, at these thresholds ~0.4 MB. The metrics use the defaults (lab.circuits).
JSON_NODE_THRESHOLD, JSON_EDGE_THRESHOLD = 0.6, 0.9
SEED_PROMPTS = ("Write a poem about trees", "Describe a happy day")  # the seed plan's prompts, in chat format


@dataclass(frozen=True)
class CircuitsConfig:
    """The WS3 fine-tune: corpus size and the LoRA run (``lab.train.lora.FinetuneConfig``)."""

    per_type: int
    finetune: FinetuneConfig
    loss: str = "concept"  # "concept": loss on the concept words only; "all": on every token of the texts
    graph_words: int = 4  # invented words per constraint type whose held-out prompts get attribution graphs
    graph_per_word: int = 2  # held-out prompts per such word
    seed_prompts: int = 2  # how many of SEED_PROMPTS get graphs
    max_feature_nodes: int = 300  # circuit-tracer's cap on feature nodes per graph (cost grows with it: ~100 s at 1000 for a 35-token prompt on 2 cores)
    settle: float = 0.5  # circuit rule: stop once the mean feature Jaccard with the previous checkpoint reaches this
    model: str | None = None  # a hub model instead of the profile's (gpu: Gemma-2-2B, which GemmaScope covers)
    hub_transcoders: str | None = None  # circuit-tracer's hub transcoder set instead of training our own


CONFIGS: dict[str, CircuitsConfig] = {
    "smoke": CircuitsConfig(per_type=8, finetune=FinetuneConfig(lr=2e-3, rank=4, batch_size=4, epochs=2,
                                                                max_seq_len=128, n_evals=2),
                            graph_words=1, graph_per_word=1, seed_prompts=1, max_feature_nodes=100),
    # 51 training texts (80 % of 64), 10 epochs of batch 8: 70 steps on SmolLM2-135M. A first run with the loss on
    # every token and 5 epochs learned the sentence templates and left held-out accuracy at chance.
    "cpu": CircuitsConfig(per_type=32, finetune=FinetuneConfig(lr=1e-3, rank=8, batch_size=8, epochs=10,
                                                               max_seq_len=64, n_evals=4)),
    # Gemma-2-2B in bf16 (merging LoRA into 4-bit weights is lossy) with GemmaScope transcoders from the hub,
    # per the seed plan. Written for a CUDA machine with hub access; never run here (no GPU in this project yet).
    "gpu": CircuitsConfig(per_type=64, finetune=FinetuneConfig(lr=2e-4, rank=16, batch_size=16, epochs=5,
                                                               max_seq_len=64, n_evals=4),
                          max_feature_nodes=4096, model="google/gemma-2-2b", hub_transcoders="gemma"),
}


def track_config(profile: str | Profile | None = None) -> CircuitsConfig:
    p = get_profile(profile)
    if p.name not in CONFIGS:
        raise LabError(f"track {TRACK} has no configuration for profile {p.name!r} (have {', '.join(CONFIGS)})")
    return CONFIGS[p.name]


def run_dir(profile: Profile):
    return paths.checkpoint_dir(profile.name, TRACK, "ws3")


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


# ------------------------------------------------------------------------------------------- circuits (WS1/WS5)

def base_model(p: Profile, cfg: CircuitsConfig):
    """A fresh copy of the model the track fine-tunes: the profile's, or ``cfg.model`` from the hub."""
    if cfg.model is None:
        return fresh_base(p)
    import os

    from lab.models.loading import LoadedModel

    if not torch.cuda.is_available():
        raise LabError(f"Track E's {p.name} profile fine-tunes {cfg.model} on a CUDA GPU (torch.cuda.is_available() "
                       f"is False): use --profile cpu")
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


def circuit_transcoders(p: Profile, cfg: CircuitsConfig, progress: bool = True):
    """``(TranscoderSet, meta)``: ours, built when missing (cpu / smoke), or circuit-tracer's hub set (gpu)."""
    from lab.interp.transcoders import build, load_transcoders

    if cfg.hub_transcoders is None:
        build(p, progress=progress)  # cached: trains only when missing or its config changed
        return load_transcoders(p)
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
    from lab.data.records import chat_text

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


def stopping_rules(frame: pl.DataFrame, compare: pl.DataFrame, settle: float) -> pl.DataFrame:
    """Per constraint type, where each early-stopping rule stops, how many steps it trained, and the held-out
    accuracy of the checkpoint it keeps.

    - loss rule (patience 1): after each checkpoint, stop if this type's validation loss rose; keep the previous
      checkpoint. Trains to the checkpoint where the rise is seen.
    - circuit rule: after each checkpoint (from the second), stop if the mean feature-node Jaccard between this
      checkpoint's graphs and the previous checkpoint's reaches ``settle``; keep this checkpoint.
    - oracle: the first checkpoint whose held-out accuracy reaches ``LEARNED`` (needs the labels; for reference).
    Both rules run to the end when they never fire.
    """
    rows = []
    for ctype in CONSTRAINTS:
        f = frame.filter(pl.col("constraint_type") == ctype).sort("checkpoint")
        ck, steps, acc, loss = (f[c].to_list() for c in ("checkpoint", "step", "accuracy", "val_loss"))
        last = len(ck) - 1
        keep, trained = last, last
        for i in range(2, len(ck)):  # the base (0) is not a candidate; a rise is seen from the second checkpoint
            if loss[i] > loss[i - 1]:
                keep, trained = i - 1, i
                break
        rows.append({"constraint_type": ctype, "rule": "loss", "kept_checkpoint": ck[keep], "trained_checkpoint": ck[trained]})
        c = compare.filter((pl.col("constraint_type") == ctype) & (pl.col("versus") == "previous")) \
            .group_by("checkpoint").agg(pl.col("feature_jaccard").mean()).sort("checkpoint")
        keep = last
        for i, j in zip(c["checkpoint"].to_list(), c["feature_jaccard"].to_list(), strict=True):
            if i >= 2 and j >= settle:
                keep = i
                break
        rows.append({"constraint_type": ctype, "rule": "circuit", "kept_checkpoint": keep, "trained_checkpoint": keep})
        hit = [i for i in ck[1:] if acc[i] >= LEARNED]
        o = hit[0] if hit else last
        rows.append({"constraint_type": ctype, "rule": "oracle", "kept_checkpoint": o, "trained_checkpoint": o})
    out = pl.DataFrame(rows)
    info = frame.select("constraint_type", pl.col("checkpoint").alias("kept_checkpoint"), "fraction", "accuracy",
                        "val_loss", "mean_margin")
    steps = frame.select("constraint_type", pl.col("checkpoint").alias("trained_checkpoint"),
                         pl.col("step").alias("steps_trained"))
    return out.join(info, on=["constraint_type", "kept_checkpoint"]).join(
        steps, on=["constraint_type", "trained_checkpoint"]).sort("constraint_type", "rule")


SETTLE_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def settle_sweep(frame: pl.DataFrame, compare: pl.DataFrame, thresholds=SETTLE_SWEEP) -> pl.DataFrame:
    """The circuit rule at every threshold in ``thresholds``: where it stops, what it keeps, steps, accuracy."""
    rows = []
    for t in thresholds:
        got = stopping_rules(frame, compare, t).filter(pl.col("rule") == "circuit")
        rows.append(got.with_columns(settle=pl.lit(t)))
    return pl.concat(rows).select("settle", *[c for c in rows[0].columns if c != "settle"])


GRAPH_METRICS = ("feature_jaccard", "feature_jaccard_previous", "edge_correlation", "error_share",
                 "target_from_features", "target_prob")


def circuit_stats(graphs: pl.DataFrame, compare: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per constraint type and checkpoint, each metric's mean over prompts with a 95 % bootstrap interval; and
    paired sign-flip tests across prompts: the change from the base model to the final checkpoint, and whether
    the graphs change less between the last two checkpoints than between the 25 % and 50 % ones (settling)."""
    from lab.interp.circuits import bootstrap_mean, sign_flip_test

    rows = []
    prev = compare.filter(pl.col("versus") == "previous").select(
        "prompt_id", "checkpoint", pl.col("feature_jaccard").alias("feature_jaccard_previous"))
    wide = graphs.join(compare.filter(pl.col("versus") == "final").select(
        "prompt_id", "checkpoint", "feature_jaccard", "edge_correlation"), on=["prompt_id", "checkpoint"], how="left"
    ).join(prev, on=["prompt_id", "checkpoint"], how="left")
    for (ctype, ck), g in wide.group_by("constraint_type", "checkpoint"):
        for m in GRAPH_METRICS:
            mean, lo, hi = bootstrap_mean(g[m].to_list())
            rows.append({"constraint_type": ctype, "checkpoint": ck, "fraction": g["fraction"][0], "metric": m,
                         "mean": mean, "lo": lo, "hi": hi, "n": g.height})
    stats = pl.DataFrame(rows).sort("metric", "constraint_type", "checkpoint")
    tests = []
    last = graphs["checkpoint"].max()

    def paired(ctype: str, metric: str, comparison: str, a: pl.Series, b: pl.Series) -> dict:
        d = (b.cast(pl.Float64) - a.cast(pl.Float64)).to_list()
        mean, lo, hi = bootstrap_mean(d)
        return {"constraint_type": ctype, "metric": metric, "comparison": comparison, "a_mean": float(a.mean()),
                "b_mean": float(b.mean()), "diff_mean": mean, "diff_lo": lo, "diff_hi": hi,
                "p_sign_flip": sign_flip_test(d), "n": len(d)}

    for ctype in graphs["constraint_type"].unique().sort().to_list():
        g = graphs.filter(pl.col("constraint_type") == ctype)
        base = g.filter(pl.col("checkpoint") == 0).sort("prompt_id")
        final = g.filter(pl.col("checkpoint") == last).sort("prompt_id")
        for m in ("error_share", "target_from_features", "target_prob", "n_kept_features"):
            tests.append(paired(ctype, m, "final minus base", base[m], final[m]))
        # does the circuit settle? overlap with the previous checkpoint late in training vs early
        prev = compare.filter((pl.col("constraint_type") == ctype) & (pl.col("versus") == "previous"))
        if last >= 3:
            early = prev.filter(pl.col("checkpoint") == 2).sort("prompt_id")
            late = prev.filter(pl.col("checkpoint") == last).sort("prompt_id")
            for m in ("feature_jaccard", "edge_correlation"):
                tests.append(paired(ctype, f"{m} with previous checkpoint", "last step minus 25->50 %",
                                    early[m], late[m]))
    return stats, pl.DataFrame(tests)


def plot_transcoders(df: pl.DataFrame) -> alt.HConcatChart:
    """Held-out FVU and the share of never-active features per layer."""
    base = alt.Chart(df).encode(x=alt.X("layer:O", title="layer"))
    f = base.mark_bar().encode(y=alt.Y("fvu:Q", title="held-out FVU", scale=alt.Scale(domain=[0, 1])),
                               tooltip=["layer:O", alt.Tooltip("fvu:Q", format=".3f"), alt.Tooltip("l0:Q", format=".1f"),
                                        alt.Tooltip("dead_share:Q", format=".1%")]).properties(width=420, height=160)
    d = base.mark_bar(color="#999").encode(
        y=alt.Y("dead_share:Q", title="never-active features", axis=alt.Axis(format="%")),
        tooltip=["layer:O", alt.Tooltip("dead_share:Q", format=".1%")]).properties(width=420, height=100)
    return alt.vconcat(f, d)


_METRIC_TITLES = {"feature_jaccard": "feature overlap with final (Jaccard)",
                  "feature_jaccard_previous": "feature overlap with previous checkpoint",
                  "edge_correlation": "edge-weight correlation with final",
                  "error_share": "error-node share of influence",
                  "target_from_features": "direct attribution from features to target logit",
                  "target_prob": "probability of the target token"}


def plot_circuit_stats(df: pl.DataFrame) -> alt.VConcatChart:
    """Each circuit metric's mean (95 % bootstrap interval) per constraint type across checkpoints."""
    charts = []
    df = df.filter(pl.col("mean").is_not_nan())  # no overlap "with the previous checkpoint" at the base model
    for m, title in _METRIC_TITLES.items():
        d = df.filter(pl.col("metric") == m)
        base = alt.Chart(d).encode(
            x=alt.X("fraction:Q", title="share of training", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("constraint_type:N", title="prompts"))
        line = base.mark_line(point=True).encode(
            y=alt.Y("mean:Q", title=title, scale=alt.Scale(zero=False)),
            tooltip=["constraint_type:N", "checkpoint:Q", alt.Tooltip("mean:Q", format=".3f"),
                     alt.Tooltip("lo:Q", format=".3f"), alt.Tooltip("hi:Q", format=".3f"), "n:Q"])
        band = base.mark_errorbar().encode(y=alt.Y("lo:Q", title=title), y2="hi:Q")
        charts.append((line + band).properties(width=420, height=130))
    return alt.vconcat(*charts)


def graph_frames(records: list[dict], keep_nodes: int = 60, keep_edges: int = 80) -> tuple[pl.DataFrame, pl.DataFrame]:
    """For drawing each graph: the ``keep_nodes`` most influential kept features, the tokens and the target
    logit, and the ``keep_edges`` strongest kept edges among them."""
    nodes, edges = [], []
    for r in records:
        tag = {"checkpoint": r["checkpoint"], "fraction": r["fraction"], "prompt_id": r["prompt_id"]}
        last = r["n_pos"] - 1
        pos_of = {}
        for f in sorted(r["features"], key=lambda f: -f["influence"])[:keep_nodes]:
            layer, pos, feat = (int(x) for x in f["key"][1:].split("."))
            nodes.append({**tag, "key": f["key"], "kind": "feature", "layer": layer + 1, "pos": pos, "feature": feat,
                          "influence": f["influence"], "label": f"L{layer} #{feat}"})
            pos_of[f["key"]] = (pos, layer + 1)
        for pos, label in enumerate(r["tokens"]):
            nodes.append({**tag, "key": f"T{pos}", "kind": "token", "layer": 0, "pos": pos, "feature": -1,
                          "influence": 0.0, "label": label})
            pos_of[f"T{pos}"] = (pos, 0)
        lk = f"L{r['target_id']}"
        nodes.append({**tag, "key": lk, "kind": "logit", "layer": r["n_layers"] + 1, "pos": last, "feature": -1,
                      "influence": 1.0, "label": r["target_token"]})
        pos_of[lk] = (last, r["n_layers"] + 1)
        kept = sorted((e for e in r["edges"] if e[0] in pos_of and e[1] in pos_of), key=lambda e: -abs(e[2]))
        for s, t, w in kept[:keep_edges]:
            (x, y), (x2, y2) = pos_of[s], pos_of[t]
            edges.append({**tag, "source": s, "target": t, "weight": w, "pos": x, "layer": y, "pos2": x2, "layer2": y2})
    return pl.DataFrame(nodes), pl.DataFrame(edges)


def plot_graph(nodes: pl.DataFrame, edges: pl.DataFrame, prompt_id: str | None = None) -> alt.FacetChart:
    """One prompt's pruned attribution graph per checkpoint, drawn offline: token position across, layer up
    (0 = token embeddings, top = the target logit); features sized by influence on the target, edges red when
    positive and blue when negative. ``prompt_id`` defaults to the first prompt in ``nodes``."""
    prompt_id = prompt_id or nodes["prompt_id"][0]
    nodes = nodes.filter(pl.col("prompt_id") == prompt_id)
    edges = edges.filter(pl.col("prompt_id") == prompt_id)
    data = pl.concat([nodes, edges.with_columns(kind=pl.lit("edge"))], how="diagonal_relaxed")
    base = alt.Chart(data)
    e = base.transform_filter("datum.kind == 'edge'").mark_rule(opacity=0.35).encode(
        x=alt.X("pos:Q", title="token position"), y=alt.Y("layer:Q", title="layer (0 = embeddings)"),
        x2="pos2:Q", y2="layer2:Q",
        color=alt.condition("datum.weight > 0", alt.value("#d62728"), alt.value("#1f77b4")),
        strokeWidth=alt.StrokeWidth("weight:Q", legend=None, scale=alt.Scale(type="sqrt", range=[0.3, 3])))
    n = base.transform_filter("datum.kind != 'edge'").mark_circle(opacity=0.85).encode(
        x="pos:Q", y="layer:Q", size=alt.Size("influence:Q", legend=None, scale=alt.Scale(range=[15, 250])),
        color=alt.Color("kind:N", title="node", scale=alt.Scale(domain=["token", "feature", "logit"])),
        tooltip=["label:N", "kind:N", "layer:Q", "pos:Q", alt.Tooltip("influence:Q", format=".3f")])
    return alt.layer(e, n).properties(width=230, height=260).facet(
        column=alt.Column("fraction:Q", title="share of training", header=alt.Header(format=".0%")))


def circuits(p: Profile, cfg: CircuitsConfig, tokenizer, stages: list[tuple[int, object]], total: int,
             progress: bool = True) -> dict:
    """Attribution graphs for every stage and graph prompt (cached per stage and prompt); frames and stats."""
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from tqdm.auto import tqdm

    from lab.interp.circuits import compare, export_model, replacement_model, trace
    t0 = time.perf_counter()
    tc_set, meta = circuit_transcoders(p, cfg, progress=progress)
    # cached per transcoder build and per adapter content, so a retrained checkpoint never reuses an old graph
    tc_key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    work = run_dir(p).parent / "circuits" / f"tc-{tc_key}-nodes{cfg.max_feature_nodes}"
    prompts = graph_prompts(tokenizer, cfg)
    records: list[dict] = []
    attr_s: list[float] = []
    json_files: list[Path] = []  # circuit-tracer's JSON of the seed prompts (base and final), for results/
    bar = tqdm(total=len(stages) * len(prompts), desc="attribution graphs", disable=not progress, unit="graph")
    for i, (step, ck) in enumerate(stages):
        key = "base" if ck is None else hashlib.sha256((ck / "adapter_model.safetensors").read_bytes()).hexdigest()[:10]
        stage_dir = work / f"stage-{key}"
        todo = [pr for pr in prompts if not (stage_dir / f"{pr['prompt_id']}.json").exists()]
        if todo:
            lm = base_model(p, cfg)
            model = lm.model if ck is None else load_adapter(lm, ck)
            folder = export_model(model, lm.tokenizer, work / "models" / f"stage-{key}")
            on_gpu = cfg.model is not None
            rm = replacement_model(folder, tc_set, device="cuda" if on_gpu else "cpu",
                                   dtype=torch.bfloat16 if on_gpu else torch.float32)
            stage_dir.mkdir(parents=True, exist_ok=True)
            for pr in todo:
                t1 = time.perf_counter()
                rec, graph = trace(rm, pr["text"], target_id=pr["target_id"], max_feature_nodes=cfg.max_feature_nodes)
                rec["attribution_s"] = time.perf_counter() - t1
                rec["tokens"] = [lm.tokenizer.decode([t]) for t in rec["input_tokens"]]
                if pr["constraint_type"] == "seed" and i in (0, len(stages) - 1):
                    create_graph_files(graph, f"{pr['prompt_id']}-stage-{i}", str(stage_dir / "json"),
                                       scan=tc_set.scan, node_threshold=JSON_NODE_THRESHOLD,
                                       edge_threshold=JSON_EDGE_THRESHOLD)
                tmp = stage_dir / f"{pr['prompt_id']}.json.tmp"
                tmp.write_text(json.dumps(rec))
                tmp.replace(stage_dir / f"{pr['prompt_id']}.json")
                bar.update(1)
            del rm, model, lm
        bar.update(len(prompts) - len(todo))
        json_files += [f for f in (stage_dir / "json").glob(f"*-stage-{i}.json")]
        for pr in prompts:
            rec = json.loads((stage_dir / f"{pr['prompt_id']}.json").read_text())
            rec |= {"checkpoint": i, "step": step, "fraction": step / total, "prompt_id": pr["prompt_id"],
                    "constraint_type": pr["constraint_type"], "word": pr["word"], "n_layers": meta["n_layers"]}
            records.append(rec)
            attr_s.append(rec["attribution_s"])
    bar.close()

    scalar = [k for k, v in records[0].items() if isinstance(v, (int, float, str))]
    graphs = pl.DataFrame([{k: r[k] for k in scalar} for r in records]).with_columns(
        pl.col("target_from_features", "target_from_errors", "target_from_tokens").cast(pl.Float64))
    by = {(r["prompt_id"], r["checkpoint"]): r for r in records}
    last = len(stages) - 1
    cmp_rows = []
    for r in records:
        i = r["checkpoint"]
        for versus, j in (("previous", i - 1), ("final", last), ("base", 0)):
            if j < 0 or j == i:
                continue
            cmp_rows.append({"prompt_id": r["prompt_id"], "constraint_type": r["constraint_type"], "checkpoint": i,
                             "fraction": r["fraction"], "versus": versus,
                             **compare(by[(r["prompt_id"], j)], r)})
    cmp = pl.DataFrame(cmp_rows)
    stats, tests = circuit_stats(graphs, cmp)
    layers = pl.DataFrame(meta["layers"])
    nodes, edges = graph_frames(records)
    return {"graphs": graphs, "compare": cmp, "stats": stats, "tests": tests, "transcoders": layers, "nodes": nodes,
            "edges": edges, "json_files": json_files, "meta": meta, "attr_s": attr_s, "wall_s": time.perf_counter() - t0,
            "n_prompts": len(prompts)}


def run(profile: str | Profile | None = None, *, fresh: bool = False, write: bool = True,
        progress: bool = True) -> dict:
    """Fine-tune on the constraint corpus (resuming unless ``fresh``), score every checkpoint, write results."""
    t0 = time.perf_counter()
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = track_config(p)
    ds = constraint_dataset(cfg.per_type, cfg.finetune.seed)
    lm = base_model(p, cfg)
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
        base = base_model(p, cfg)
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
    summary |= {"train_time_s": float((steps["tokens"] / steps["tokens_per_s"]).sum()) if steps.height else 0.0}

    circ = circuits(p, cfg, tok, stages, total, progress=progress)
    stop = stopping_rules(frame, circ["compare"], cfg.settle)
    sweep = settle_sweep(frame, circ["compare"])
    tq = circ["transcoders"]
    summary |= {"transcoder_layers": tq.height, "transcoder_features": circ["meta"]["d_transcoder"],
                "transcoder_k": circ["meta"]["k"], "transcoder_fvu_mean": float(tq["fvu"].mean()),
                "transcoder_fvu_max": float(tq["fvu"].max()), "transcoder_fvu_min": float(tq["fvu"].min()),
                "transcoder_worst_layer": int(tq.sort("fvu")["layer"][-1]),
                "transcoder_dead_share_mean": float(tq["dead_share"].mean()),
                "transcoder_train_s": circ["meta"]["train_s"],
                "transcoder_tokens_per_layer": circ["meta"]["train_tokens_per_layer"],
                "graph_prompts": circ["n_prompts"], "graphs": circ["graphs"].height,
                "attribution_s_median": float(pl.Series(circ["attr_s"]).median()),
                "attribution_s_total": float(sum(circ["attr_s"])), "circuits_wall_s": circ["wall_s"],
                "settle_threshold": cfg.settle}
    for row in stop.iter_rows(named=True):
        k = f"{row['constraint_type']}_{row['rule']}"
        summary |= {f"{k}_stop_fraction": row["fraction"], f"{k}_steps": row["steps_trained"],
                    f"{k}_accuracy": row["accuracy"]}
    summary["wall_time_s"] = time.perf_counter() - t0
    if write:
        kw = dict(config={"per_type": cfg.per_type, "finetune": asdict(ft), "loss": cfg.loss, "learned_threshold": LEARNED,
                          "graph_words": cfg.graph_words, "graph_per_word": cfg.graph_per_word,
                          "max_feature_nodes": cfg.max_feature_nodes, "settle": cfg.settle,
                          "transcoders": circ["meta"]["config"]},
                  seed=ft.seed, profile=p.name, wall_time_s=summary["wall_time_s"])
        write_result(TRACK, "checkpoints", frame, chart=plot_checkpoints, **kw)
        write_result(TRACK, "prompts", prompts, **kw)
        write_result(TRACK, "loss", steps.select("step", "loss", "lr", "grad_norm"), chart=plot_loss, **kw)
        write_result(TRACK, "transcoders", tq, chart=plot_transcoders, **kw)
        write_result(TRACK, "graphs", circ["graphs"], **kw)
        write_result(TRACK, "circuit_compare", circ["compare"], **kw)
        write_result(TRACK, "circuit_stats", circ["stats"], chart=plot_circuit_stats, **kw)
        write_result(TRACK, "circuit_tests", circ["tests"], **kw)
        write_result(TRACK, "stopping", stop, **kw)
        write_result(TRACK, "stopping_sweep", sweep, **kw)
        edges_path = write_result(TRACK, "graph_edges", circ["edges"], **kw)
        nodes_path = write_result(TRACK, "graph_nodes", circ["nodes"],
                                  chart=lambda nodes: plot_graph(nodes, pl.read_parquet(edges_path)), **kw)
        _copy_graph_json(circ["json_files"], nodes_path.parent / "graphs")
        write_result(TRACK, "summary", pl.DataFrame([summary]), **kw)
    return summary


def _copy_graph_json(files: list[Path], dst: Path) -> None:
    """circuit-tracer's frontend JSON of the seed prompts' graphs into results/ (the folder replaced whole)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for f in files:
        shutil.copy(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
