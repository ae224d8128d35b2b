"""Attribution graphs with circuit-tracer, and the numbers that compare one prompt's graphs across models (e.g.
the checkpoints of a fine-tune).

- ``export_model``: a model (LoRA merged in) saved as a folder that circuit-tracer's NNSight backend loads.
- ``replacement_model``: that folder + transcoders (``lab.interp.transcoders``) as a ``NNSightReplacementModel``.
- ``load_hub_transcoders``: circuit-tracer's published transcoder sets (e.g. GemmaScope's) instead of our own.
- ``trace``: one attribution graph (``circuit_tracer.attribute``), pruned with ``prune_graph``, reduced to a small
  JSON-able record: the kept feature nodes and edges, node influence, and per-graph metrics.
- ``trace_prompts`` / ``read_record``: every prompt of a list traced with one model, one record file each
  (resumable), and read back.
- ``compare``: feature-node overlap (Jaccard) and edge-weight correlation between two records of one prompt.
- ``bootstrap_mean`` / ``sign_flip_test``: the statistics across prompts.

Speed (2 CPU cores, SmolLM2-135M, 300 feature nodes): ``attribute`` runs its forward pass on ``batch_size`` copies
of the prompt and then one backward pass per ``batch_size`` source nodes (the logits' pass included, for at most 5
logits), so a small batch is cheaper: batch 8 traces a graph in ~0.55-0.6 of the time batch 64 took. The graph is
the same: which features are attributed depends only on how many are attributed between two re-rankings of the
queue (``batch_size * update_interval``), which ``trace`` holds at :data:`RERANK_EVERY`, and every row is its own
backward contraction (identical rows, checked in tests/test_speed_attribution.py). bf16 is not used on cpu: there it
changes which 300 features are selected (Jaccard 0.63-0.73 against float32, untrained transcoders).

Node keys are strings that mean the same thing in every graph of a prompt: ``F{layer}.{pos}.{feature}`` for a
transcoder feature (meaningful across graphs when the models share their transcoders), ``E{layer}.{pos}`` for an
error node, ``T{pos}`` for a token embedding and ``L{token_id}`` for a logit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.errors import LabError
from lab.io import atomic_write_text, publish_dir

NODE_THRESHOLD = 0.8  # circuit-tracer's defaults for prune_graph / create_graph_files
EDGE_THRESHOLD = 0.98
# feature nodes attributed between two re-rankings of the attribution queue: circuit-tracer's default
# update_interval (4) x the batch of 64 the lab traced with first; every batch size that divides it gives that graph
RERANK_EVERY = 256
# source nodes per backward pass by device type: the fastest on 2 cpu cores; on a GPU the lab's first setting
BATCH_SIZE = {"cpu": 8, "cuda": 64}


def export_model(model, tokenizer, folder: Path) -> Path:
    """Save ``model`` (a PeftModel is merged first) and its tokenizer where circuit-tracer can load them; a folder
    that already holds a saved model is kept as it is (the caller names folders by content)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with publish_dir(folder) as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
    return folder


def replacement_model(folder: Path, transcoders, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """circuit-tracer's NNSight replacement model of the saved model in ``folder`` (float32 on cpu by default)."""
    from circuit_tracer.replacement_model.replacement_model_nnsight import (
        NNSightReplacementModel,
    )

    return NNSightReplacementModel.from_pretrained_and_transcoders(
        str(folder), transcoders, device=torch.device(device), dtype=dtype
    )


def load_hub_transcoders(name: str, model: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """circuit-tracer's transcoder set ``name`` from the Hugging Face hub (``"gemma"``: GemmaScope's, for
    Gemma-2-2B), made for the hub model ``model``: ``(TranscoderSet, meta)``, the meta shaped like a build's
    (``lab.interp.transcoders.build``; no per-layer quality, no training)."""
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    try:
        transcoders, _ = load_transcoder_from_hub(name, device=torch.device(device), dtype=dtype)
    except Exception as e:  # the hub client raises several types (offline, gated, missing)
        raise LabError(
            f"could not load circuit-tracer's {name!r} transcoders from the Hugging Face hub: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; they are downloaded on first use "
            f"(connect to the network and unset HF_HUB_OFFLINE)"
        ) from None
    meta = {
        "model": model,
        "source": f"hub:{name}",
        "n_layers": len(transcoders),
        "d_transcoder": transcoders.d_transcoder,
        "k": None,
        "config": {"hub": name, "seed": 0},
        "layers": [],
        "train_s": 0.0,
        "train_tokens_per_layer": 0,
    }
    return transcoders, meta


def _sizes(graph) -> tuple[int, int, int]:
    """How many feature, error and logit nodes the graph has (tokens: ``graph.n_pos``)."""
    return len(graph.selected_features), graph.cfg.n_layers * graph.n_pos, len(graph.logit_targets)


def _keys(graph) -> list[str]:
    """One key per adjacency row/column: selected features, error nodes, tokens, logits (circuit-tracer's order)."""
    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    feats = graph.active_features[graph.selected_features].tolist()
    keys = [f"F{layer}.{pos}.{feat}" for layer, pos, feat in feats]
    keys += [f"E{layer}.{pos}" for layer in range(n_layers) for pos in range(n_pos)]
    keys += [f"T{pos}" for pos in range(n_pos)]
    keys += [f"L{t.vocab_idx}" for t in graph.logit_targets]
    return keys


def direct_split(graph, target_index: int) -> dict[str, float]:
    """The target logit's direct attributions in the graph, summed by source kind: the selected features, errors,
    tokens. They are not the whole demeaned logit: the unselected features and two nodeless terms are missing
    (``lab.interp.graph_checks.account`` has them all)."""
    n_feat, n_err, n_logits = _sizes(graph)
    row = graph.adjacency_matrix[-n_logits + target_index].double()
    return {
        "from_features": float(row[:n_feat].sum()),
        "from_errors": float(row[n_feat : n_feat + n_err].sum()),
        "from_tokens": float(row[n_feat + n_err : n_feat + n_err + graph.n_pos].sum()),
    }


def trace(
    model,
    prompt: str,
    *,
    target_id: int | None = None,
    max_feature_nodes: int = 300,
    batch_size: int | None = None,
    max_n_logits: int = 5,
) -> tuple[dict, object]:
    """Attribute ``prompt``'s next token and reduce the pruned graph to a record.

    ``target_id`` (a token id) is the logit the metrics follow; None follows the model's top prediction.
    ``batch_size`` (a divisor of :data:`RERANK_EVERY`; None: :data:`BATCH_SIZE` of the model's device) sets the
    speed, not the graph.
    Returns ``(record, graph)``; the graph is circuit-tracer's, for ``create_graph_files``.
    """
    from circuit_tracer import attribute
    from circuit_tracer.graph import (
        compute_graph_scores,
        compute_node_influence,
        prune_graph,
    )

    if batch_size is None:
        batch_size = BATCH_SIZE.get(torch.device(model.device).type, 64)
    if not (isinstance(batch_size, int) and batch_size >= 1 and RERANK_EVERY % batch_size == 0):
        raise LabError(
            f"trace(batch_size={batch_size!r}): the batch size must divide {RERANK_EVERY} (the feature nodes "
            f"attributed between re-rankings), e.g. 8 or 64"
        )
    targets = None if target_id is None else torch.tensor([target_id])
    graph = attribute(
        prompt,
        model,
        attribution_targets=targets,
        max_n_logits=max_n_logits,
        batch_size=batch_size,
        update_interval=RERANK_EVERY // batch_size,
        max_feature_nodes=max_feature_nodes,
        verbose=False,
    )
    graph.to("cpu")
    keys = _keys(graph)
    n_feat, n_err, n_logits = _sizes(graph)
    ti = 0 if target_id is None else [t.vocab_idx for t in graph.logit_targets].index(target_id)
    adj = graph.adjacency_matrix
    node_mask, edge_mask, _ = prune_graph(graph, NODE_THRESHOLD, EDGE_THRESHOLD)

    # influence on the followed logit alone (circuit-tracer's normalised influence, one-hot logit weight)
    weights = torch.zeros(adj.shape[0])
    weights[adj.shape[0] - n_logits + ti] = 1.0
    influence = compute_node_influence(adj, weights)
    err_infl = float(influence[n_feat : n_feat + n_err].sum())
    feat_infl = float(influence[:n_feat].sum())
    tok_infl = float(influence[n_feat + n_err : n_feat + n_err + graph.n_pos].sum())
    replacement, completeness = compute_graph_scores(graph)

    kept = node_mask.nonzero().flatten().tolist()
    feats = [
        {"key": keys[i], "influence": float(influence[i]), "activation": float(graph.activation_values[i])}
        for i in kept
        if i < n_feat
    ]
    rows, cols = (edge_mask & (adj != 0)).nonzero(as_tuple=True)
    edges = [[keys[c], keys[r], float(adj[r, c])] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    split = direct_split(graph, ti)
    record = {
        "prompt": prompt,
        "n_pos": graph.n_pos,
        "input_tokens": graph.input_tokens.tolist(),
        "target_id": graph.logit_targets[ti].vocab_idx,
        "target_token": graph.logit_targets[ti].token_str,
        "target_prob": float(graph.logit_probabilities[ti]),
        "logit_ids": [t.vocab_idx for t in graph.logit_targets],
        "n_active_features": int(graph.active_features.shape[0]),
        "n_selected_features": n_feat,
        "n_kept_features": len(feats),
        "n_kept_edges": len(edges),
        "replacement_score": replacement,
        "completeness_score": completeness,
        "error_share": err_infl / max(err_infl + feat_infl + tok_infl, 1e-12),
        "feature_share": feat_infl / max(err_infl + feat_infl + tok_infl, 1e-12),
        **{f"target_{k}": v for k, v in split.items()},
        "features": feats,
        "edges": edges,
    }
    return record, graph


def trace_prompts(
    load: Callable[[], tuple[Any, Any]],
    transcoders,
    prompts: list[dict],
    out_dir: Path,
    model_dir: Path,
    *,
    max_feature_nodes: int,
    json_for: Collection[str] = (),
    json_suffix: str = "",
    json_thresholds: tuple[float, float] = (NODE_THRESHOLD, EDGE_THRESHOLD),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_traced: Callable[[], object] | None = None,
    batch_size: int | None = None,
    check_for: Collection[str] = (),
    check_scales: tuple[float, ...] = (0.0, 2.0),
    check_top: int = 8,
) -> int:
    """Trace each prompt that has no record in ``out_dir`` yet with one model; how many were traced.

    ``prompts`` are dicts with ``prompt_id``, ``text`` and ``target_id`` (``lab.data.constraints.graph_prompts``).
    ``load()`` returns ``(model, tokenizer)`` and is called only when a record is missing; the model is exported
    to ``model_dir`` (``export_model``) and wrapped with ``transcoders``. Each record (``trace``'s, with
    ``attribution_s`` and the decoded ``tokens``) is written atomically to ``out_dir/<prompt_id>.json``, so an
    interrupted call resumes at the next prompt. For the ids in ``json_for`` circuit-tracer's graph JSON is written
    too, as ``out_dir/json/<prompt_id><json_suffix>.json`` (beside circuit-tracer's ``graph-metadata.json``
    index), pruned at ``json_thresholds`` (node, edge).
    ``on_traced()`` runs after each prompt (e.g. a progress bar's ``update``); ``batch_size`` is ``trace``'s.
    Every record also holds its full accounting (``lab.interp.graph_checks.account``: the followed logit split into
    selected and unselected features, errors, tokens and the nodeless terms); for the ids in ``check_for`` also
    the intervention checks of its ``check_top`` strongest features at each of ``check_scales``
    (``graph_checks.intervene``).
    """
    out_dir = Path(out_dir)
    todo = [pr for pr in prompts if not (out_dir / f"{pr['prompt_id']}.json").exists()]
    if not todo:
        return 0
    from circuit_tracer.utils.create_graph_files import create_graph_files

    from lab.interp import graph_checks

    model, tokenizer = load()
    if hasattr(model, "merge_and_unload"):  # the model the interventions run on is the exported one
        model = model.merge_and_unload()
    model.eval()
    replacement = replacement_model(export_model(model, tokenizer, model_dir), transcoders, device=device, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pr in todo:
        t0 = time.perf_counter()
        record, graph = trace(
            replacement,
            pr["text"],
            target_id=pr["target_id"],
            max_feature_nodes=max_feature_nodes,
            batch_size=batch_size,
        )
        record["attribution_s"] = time.perf_counter() - t0
        record["tokens"] = [tokenizer.decode([t]) for t in record["input_tokens"]]
        t0 = time.perf_counter()
        record["accounting"] = graph_checks.account(
            replacement, graph.input_tokens, record["target_id"], graph.selected_features
        )
        if pr["prompt_id"] in check_for:
            ti = record["logit_ids"].index(record["target_id"])
            record["interventions"] = [
                row
                for scale in check_scales
                for row in graph_checks.intervene(replacement, model, graph, ti, top=check_top, scale=scale)
            ]
        record["checks_s"] = time.perf_counter() - t0
        if pr["prompt_id"] in json_for:
            node_threshold, edge_threshold = json_thresholds
            create_graph_files(
                graph,
                f"{pr['prompt_id']}{json_suffix}",
                str(out_dir / "json"),
                scan=transcoders.scan,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
            )
        atomic_write_text(out_dir / f"{pr['prompt_id']}.json", json.dumps(record))
        if on_traced is not None:
            on_traced()
    return len(todo)


FEATURE_NODE = "cross layer transcoder"  # circuit-tracer's feature_type of a transcoder feature in graph JSON


def json_features(path: Path) -> list[tuple[int, int]]:
    """The (layer, feature) of every transcoder feature node in one of circuit-tracer's graph JSON files (its
    ``node_id`` is ``layer_feature_position``)."""
    nodes = json.loads(Path(path).read_text())["nodes"]
    return [tuple(int(x) for x in n["node_id"].split("_")[:2]) for n in nodes if n["feature_type"] == FEATURE_NODE]


def write_labelled(src: Path, dst: Path, labels: dict[tuple[int, int], str]) -> None:
    """Copy a graph JSON file with each feature node's ``clerp`` (the label circuit-tracer's viewer shows) set
    from ``labels``."""
    graph = json.loads(Path(src).read_text())
    for n in graph["nodes"]:
        if n["feature_type"] == FEATURE_NODE:
            layer, feat = (int(x) for x in n["node_id"].split("_")[:2])
            n["clerp"] = labels.get((layer, feat), n.get("clerp", ""))
    atomic_write_text(Path(dst), json.dumps(graph))


def read_record(out_dir: Path, prompt_id: str) -> dict:
    """The record ``trace_prompts`` wrote for ``prompt_id`` in ``out_dir``."""
    return json.loads((Path(out_dir) / f"{prompt_id}.json").read_text())


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 for two empty sets."""
    return len(a & b) / len(a | b) if (a | b) else 1.0


def edge_correlation(a: list, b: list) -> float:
    """Pearson correlation of edge weights over the union of two graphs' kept edges (absent = 0); NaN when
    fewer than three edges or one side is constant."""
    wa = {(s, t): w for s, t, w in a}
    wb = {(s, t): w for s, t, w in b}
    union = sorted(set(wa) | set(wb))
    if len(union) < 3:
        return float("nan")
    x = np.array([wa.get(e, 0.0) for e in union])
    y = np.array([wb.get(e, 0.0) for e in union])
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def feature_set(record: dict) -> set[tuple[int, int]]:
    """The (layer, feature) pairs of a record's kept feature nodes, positions dropped: comparable between two
    prompts of different tokens (e.g. paraphrases)."""
    return {tuple(int(x) for x in f["key"][1:].split(".")[::2]) for f in record["features"]}


def compare(a: dict, b: dict) -> dict[str, float]:
    """Feature-node overlap (by (layer, position, feature) and, positions dropped, by (layer, feature)) and
    edge-weight correlation between two records of the same prompt."""
    if a["input_tokens"] != b["input_tokens"]:
        raise LabError("compare() needs two graphs of the same prompt (their tokens differ)")
    fa = {f["key"] for f in a["features"]}
    fb = {f["key"] for f in b["features"]}
    return {
        "feature_jaccard": jaccard(fa, fb),
        "feature_set_jaccard": jaccard(feature_set(a), feature_set(b)),
        "edge_correlation": edge_correlation(a["edges"], b["edges"]),
    }


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval over the values (NaNs dropped); (nan, nan, nan) when empty."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def sign_flip_test(diffs, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(diffs) == 0 by random sign flips (exact when 2^n <= n_perm)."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    if d.size == 0:
        return float("nan")
    observed = abs(d.mean())
    if 2**d.size <= n_perm:
        signs = np.array(np.meshgrid(*[[-1, 1]] * d.size)).reshape(d.size, -1).T
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(n_perm, d.size))
    null = np.abs((signs * d).mean(1))
    return float((null >= observed - 1e-12).mean())
