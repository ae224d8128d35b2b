"""Attribution graphs with circuit-tracer, and the numbers that compare one prompt's graphs across models (e.g.
the checkpoints of a fine-tune).

- ``export_model``: a model (LoRA merged in) saved as a folder that circuit-tracer's NNSight backend loads.
- ``replacement_model``: that folder + transcoders (``lab.interp.transcoders``) as a ``NNSightReplacementModel``.
- ``trace``: one attribution graph (``circuit_tracer.attribute``), pruned with ``prune_graph``, reduced to a small
  JSON-able record: the kept feature nodes and edges, node influence, and per-graph metrics.
- ``compare``: feature-node overlap (Jaccard) and edge-weight correlation between two records of one prompt.
- ``bootstrap_mean`` / ``sign_flip_test``: the statistics across prompts.

Node keys are strings that mean the same thing in every graph of a prompt: ``F{layer}.{pos}.{feature}`` for a
transcoder feature (meaningful across graphs when the models share their transcoders), ``E{layer}.{pos}`` for an error node,
``T{pos}`` for a token embedding and ``L{token_id}`` for a logit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lab.errors import LabError
from lab.io import publish_dir

NODE_THRESHOLD = 0.8  # circuit-tracer's defaults for prune_graph / create_graph_files
EDGE_THRESHOLD = 0.98


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

    return NNSightReplacementModel.from_pretrained_and_transcoders(str(folder), transcoders,
                                                                   device=torch.device(device), dtype=dtype)


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
    """The target logit's direct attributions summed by source kind: features, errors, tokens.

    With transcoders whose ``b_dec`` is zero the three add up to the target's logit minus the mean logit
    (circuit-tracer's demeaned logit), which the tests check against the model's own output.
    """
    n_feat, n_err, n_logits = _sizes(graph)
    row = graph.adjacency_matrix[-n_logits + target_index].double()
    return {"from_features": float(row[:n_feat].sum()), "from_errors": float(row[n_feat:n_feat + n_err].sum()),
            "from_tokens": float(row[n_feat + n_err:n_feat + n_err + graph.n_pos].sum())}


def trace(model, prompt: str, *, target_id: int | None = None, max_feature_nodes: int = 300,
          batch_size: int = 64, max_n_logits: int = 5) -> tuple[dict, object]:
    """Attribute ``prompt``'s next token and reduce the pruned graph to a record.

    ``target_id`` (a token id) is the logit the metrics follow; None follows the model's top prediction.
    Returns ``(record, graph)``; the graph is circuit-tracer's, for ``create_graph_files``.
    """
    from circuit_tracer import attribute
    from circuit_tracer.graph import (
        compute_graph_scores,
        compute_node_influence,
        prune_graph,
    )

    targets = None if target_id is None else torch.tensor([target_id])
    graph = attribute(prompt, model, attribution_targets=targets, max_n_logits=max_n_logits,
                      batch_size=batch_size, max_feature_nodes=max_feature_nodes, verbose=False)
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
    err_infl = float(influence[n_feat:n_feat + n_err].sum())
    feat_infl = float(influence[:n_feat].sum())
    tok_infl = float(influence[n_feat + n_err:n_feat + n_err + graph.n_pos].sum())
    replacement, completeness = compute_graph_scores(graph)

    kept = node_mask.nonzero().flatten().tolist()
    feats = [{"key": keys[i], "influence": float(influence[i]),
              "activation": float(graph.activation_values[i])} for i in kept if i < n_feat]
    rows, cols = (edge_mask & (adj != 0)).nonzero(as_tuple=True)
    edges = [[keys[c], keys[r], float(adj[r, c])] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    split = direct_split(graph, ti)
    record = {
        "prompt": prompt, "n_pos": graph.n_pos,
        "input_tokens": graph.input_tokens.tolist(),
        "target_id": graph.logit_targets[ti].vocab_idx, "target_token": graph.logit_targets[ti].token_str,
        "target_prob": float(graph.logit_probabilities[ti]),
        "logit_ids": [t.vocab_idx for t in graph.logit_targets],
        "n_active_features": int(graph.active_features.shape[0]), "n_selected_features": n_feat,
        "n_kept_features": len(feats), "n_kept_edges": len(edges),
        "replacement_score": replacement, "completeness_score": completeness,
        "error_share": err_infl / max(err_infl + feat_infl + tok_infl, 1e-12),
        "feature_share": feat_infl / max(err_infl + feat_infl + tok_infl, 1e-12),
        **{f"target_{k}": v for k, v in split.items()},
        "features": feats, "edges": edges,
    }
    return record, graph


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


def compare(a: dict, b: dict) -> dict[str, float]:
    """Feature-node overlap and edge-weight correlation between two records of the same prompt."""
    if a["input_tokens"] != b["input_tokens"]:
        raise LabError("compare() needs two graphs of the same prompt (their tokens differ)")
    fa = {f["key"] for f in a["features"]}
    fb = {f["key"] for f in b["features"]}
    return {"feature_jaccard": jaccard(fa, fb), "edge_correlation": edge_correlation(a["edges"], b["edges"])}


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
    if 2 ** d.size <= n_perm:
        signs = np.array(np.meshgrid(*[[-1, 1]] * d.size)).reshape(d.size, -1).T
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(n_perm, d.size))
    null = np.abs((signs * d).mean(1))
    return float((null >= observed - 1e-12).mean())
