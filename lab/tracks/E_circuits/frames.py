"""Track E's frames: pure functions from scores and graph records to the polars frames the track writes and draws.

- checkpoints: ``checkpoints_frame`` (accuracy, margin, validation loss per checkpoint and type), ``learned_at``;
- graphs: ``graphs_frame`` (one row per graph), ``compare_frame`` (graph against previous / final / base),
  ``circuit_stats`` (bootstrap means and sign-flip tests), ``graph_frames`` (nodes and edges to draw);
- stopping: ``stopping_rules`` (loss rule, circuit rule, oracle), ``settle_sweep``;
- ``circuit_frames``: all of the above for one run's graph records, by result name;
- views for the notebook and charts: ``graph_drawing``, ``graph_rows``, ``top_features``, ``concept_logprobs``.
"""

from __future__ import annotations

import polars as pl

from lab.data.constraints import CONSTRAINTS, concepts, continuation_logprob
from lab.errors import LabError
from lab.interp.circuits import bootstrap_mean, compare, sign_flip_test
from lab.interp.graph_tables import (
    accounting_frame,
    accounting_means,
    intervention_fit,
    interventions_frame,
    paraphrase_overlap,
)
from lab.tracks.E_circuits.config import LEARNED, SETTLE_SWEEP

GRAPH_METRICS = (
    "feature_jaccard",
    "feature_jaccard_previous",
    "edge_correlation",
    "error_share",
    "target_from_features",
    "target_prob",
)

# ------------------------------------------------------------------------------------------------- checkpoints


def checkpoints_frame(prompts: pl.DataFrame, losses: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint and constraint type: accuracy, its count, mean margin and validation loss."""
    agg = prompts.group_by("checkpoint", "step", "fraction", "constraint_type").agg(
        pl.col("correct").mean().alias("accuracy"),
        pl.col("correct").sum().alias("correct"),
        pl.len().alias("n"),
        pl.col("margin").mean().alias("mean_margin"),
    )
    return agg.join(losses, on=["checkpoint", "constraint_type"]).sort("checkpoint", "constraint_type")


def learned_at(frame: pl.DataFrame, ctype: str, threshold: float = LEARNED) -> float | None:
    """The first training fraction at which ``ctype``'s held-out accuracy reaches ``threshold`` (None: never)."""
    hit = frame.filter((pl.col("constraint_type") == ctype) & (pl.col("accuracy") >= threshold)).sort("fraction")
    return float(hit["fraction"][0]) if hit.height else None


# ------------------------------------------------------------------------------------------------------ graphs


def graphs_frame(records: list[dict]) -> pl.DataFrame:
    """One row per graph: every scalar of its record (prompt, checkpoint, target, sizes, scores, timing)."""
    scalar = [k for k, v in records[0].items() if isinstance(v, (int, float, str))]
    return pl.DataFrame([{k: r[k] for k in scalar} for r in records]).with_columns(
        pl.col("target_from_features", "target_from_errors", "target_from_tokens").cast(pl.Float64)
    )


def compare_frame(records: list[dict]) -> pl.DataFrame:
    """Each graph against the same prompt's graph at the previous checkpoint, the final one and the base model:
    feature-node Jaccard and edge-weight correlation (``lab.interp.circuits.compare``)."""
    by = {(r["prompt_id"], r["checkpoint"]): r for r in records}
    last = max(r["checkpoint"] for r in records)
    rows = []
    for r in records:
        i = r["checkpoint"]
        for versus, j in (("previous", i - 1), ("final", last), ("base", 0)):
            if j < 0 or j == i:
                continue
            rows.append(
                {
                    "prompt_id": r["prompt_id"],
                    "constraint_type": r["constraint_type"],
                    "checkpoint": i,
                    "fraction": r["fraction"],
                    "versus": versus,
                    **compare(by[(r["prompt_id"], j)], r),
                }
            )
    return pl.DataFrame(rows)


def circuit_stats(graphs: pl.DataFrame, compare: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per constraint type and checkpoint, each metric's mean over prompts with a 95 % bootstrap interval; and
    paired sign-flip tests across prompts: the change from the base model to the final checkpoint, and whether
    the graphs change less between the last two checkpoints than between the 25 % and 50 % ones (settling)."""
    rows = []
    prev = compare.filter(pl.col("versus") == "previous").select(
        "prompt_id", "checkpoint", pl.col("feature_jaccard").alias("feature_jaccard_previous")
    )
    wide = graphs.join(
        compare.filter(pl.col("versus") == "final").select(
            "prompt_id", "checkpoint", "feature_jaccard", "edge_correlation"
        ),
        on=["prompt_id", "checkpoint"],
        how="left",
    ).join(prev, on=["prompt_id", "checkpoint"], how="left")
    for (ctype, ck), g in wide.group_by("constraint_type", "checkpoint"):
        for m in GRAPH_METRICS:
            mean, lo, hi = bootstrap_mean(g[m].to_list())
            rows.append(
                {
                    "constraint_type": ctype,
                    "checkpoint": ck,
                    "fraction": g["fraction"][0],
                    "metric": m,
                    "mean": mean,
                    "lo": lo,
                    "hi": hi,
                    "n": g.height,
                }
            )
    stats = pl.DataFrame(rows).sort("metric", "constraint_type", "checkpoint")
    tests = []
    last = graphs["checkpoint"].max()

    def paired(ctype: str, metric: str, comparison: str, a: pl.Series, b: pl.Series) -> dict:
        d = (b.cast(pl.Float64) - a.cast(pl.Float64)).to_list()
        mean, lo, hi = bootstrap_mean(d)
        return {
            "constraint_type": ctype,
            "metric": metric,
            "comparison": comparison,
            "a_mean": float(a.mean()),
            "b_mean": float(b.mean()),
            "diff_mean": mean,
            "diff_lo": lo,
            "diff_hi": hi,
            "p_sign_flip": sign_flip_test(d),
            "n": len(d),
        }

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
                tests.append(
                    paired(ctype, f"{m} with previous checkpoint", "last step minus 25->50 %", early[m], late[m])
                )
    return stats, pl.DataFrame(tests)


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
            nodes.append(
                {
                    **tag,
                    "key": f["key"],
                    "kind": "feature",
                    "layer": layer + 1,
                    "pos": pos,
                    "feature": feat,
                    "influence": f["influence"],
                    "label": f"L{layer} #{feat}",
                }
            )
            pos_of[f["key"]] = (pos, layer + 1)
        for pos, label in enumerate(r["tokens"]):
            nodes.append(
                {
                    **tag,
                    "key": f"T{pos}",
                    "kind": "token",
                    "layer": 0,
                    "pos": pos,
                    "feature": -1,
                    "influence": 0.0,
                    "label": label,
                }
            )
            pos_of[f"T{pos}"] = (pos, 0)
        logit = f"L{r['target_id']}"
        nodes.append(
            {
                **tag,
                "key": logit,
                "kind": "logit",
                "layer": r["n_layers"] + 1,
                "pos": last,
                "feature": -1,
                "influence": 1.0,
                "label": r["target_token"],
            }
        )
        pos_of[logit] = (last, r["n_layers"] + 1)
        kept = sorted((e for e in r["edges"] if e[0] in pos_of and e[1] in pos_of), key=lambda e: -abs(e[2]))
        for s, t, w in kept[:keep_edges]:
            (x, y), (x2, y2) = pos_of[s], pos_of[t]
            edges.append({**tag, "source": s, "target": t, "weight": w, "pos": x, "layer": y, "pos2": x2, "layer2": y2})
    return pl.DataFrame(nodes), pl.DataFrame(edges)


# ---------------------------------------------------------------------------------------------------- stopping


def stopping_rules(
    frame: pl.DataFrame, compare: pl.DataFrame, settle: float, overlap: str = "feature_set_jaccard"
) -> pl.DataFrame:
    """Per constraint type, where each early-stopping rule stops, how many steps it trained, and the held-out
    accuracy of the checkpoint it keeps.

    - loss rule (patience 1): after each checkpoint, stop if this type's validation loss rose; keep the previous
      checkpoint. Trains to the checkpoint where the rise is seen.
    - circuit rule: after each checkpoint (from the second), stop if the mean feature overlap ``overlap`` (a
      column of ``compare``: by default positions dropped, as the paraphrase threshold is measured) between this
      checkpoint's graphs and the previous checkpoint's reaches ``settle``; keep this checkpoint.
    - oracle: the first checkpoint whose held-out accuracy reaches ``LEARNED`` (needs the labels; for reference).
    Both rules run to the end when they never fire.
    """
    rows = []
    for ctype in CONSTRAINTS:
        f = frame.filter(pl.col("constraint_type") == ctype).sort("checkpoint")
        stage, acc, loss = (f[c].to_list() for c in ("checkpoint", "accuracy", "val_loss"))
        last = len(stage) - 1
        keep, trained = last, last
        for i in range(2, len(stage)):  # the base (0) is not a candidate; a rise is seen from the second checkpoint
            if loss[i] > loss[i - 1]:
                keep, trained = i - 1, i
                break
        rows.append(
            {
                "constraint_type": ctype,
                "rule": "loss",
                "kept_checkpoint": stage[keep],
                "trained_checkpoint": stage[trained],
            }
        )
        c = (
            compare.filter((pl.col("constraint_type") == ctype) & (pl.col("versus") == "previous"))
            .group_by("checkpoint")
            .agg(pl.col(overlap).mean())
            .sort("checkpoint")
        )
        keep = last
        for i, j in zip(c["checkpoint"].to_list(), c[overlap].to_list(), strict=True):
            if i >= 2 and j >= settle:
                keep = i
                break
        rows.append({"constraint_type": ctype, "rule": "circuit", "kept_checkpoint": keep, "trained_checkpoint": keep})
        hit = [i for i in stage[1:] if acc[i] >= LEARNED]
        o = hit[0] if hit else last
        rows.append({"constraint_type": ctype, "rule": "oracle", "kept_checkpoint": o, "trained_checkpoint": o})
    out = pl.DataFrame(rows)
    info = frame.select(
        "constraint_type",
        pl.col("checkpoint").alias("kept_checkpoint"),
        "fraction",
        "accuracy",
        "val_loss",
        "mean_margin",
    )
    steps = frame.select(
        "constraint_type", pl.col("checkpoint").alias("trained_checkpoint"), pl.col("step").alias("steps_trained")
    )
    return (
        out.join(info, on=["constraint_type", "kept_checkpoint"])
        .join(steps, on=["constraint_type", "trained_checkpoint"])
        .sort("constraint_type", "rule")
    )


def settle_sweep(frame: pl.DataFrame, compare: pl.DataFrame, thresholds=SETTLE_SWEEP) -> pl.DataFrame:
    """The circuit rule at every threshold in ``thresholds``: where it stops, what it keeps, steps, accuracy."""
    rows = []
    for t in thresholds:
        got = stopping_rules(frame, compare, float(t)).filter(pl.col("rule") == "circuit")
        rows.append(got.with_columns(settle=pl.lit(t)))
    return pl.concat(rows).select("settle", *[c for c in rows[0].columns if c != "settle"])


def circuit_threshold(paraphrases: pl.DataFrame, settle: float | None) -> float:
    """The circuit rule's threshold: ``settle`` when the recipe fixes one, else the mean paraphrase overlap (a
    checkpoint's graph has settled when it differs from the previous checkpoint's no more than two wordings of
    one question differ on the base model)."""
    if settle is not None:
        return settle
    if not paraphrases.height:
        raise LabError("the circuit rule's threshold needs two graph prompts per word (graph_per_word >= 2)")
    return float(paraphrases["feature_set_jaccard"].mean())


def seed_stopping(runs: dict[int, tuple[pl.DataFrame, list[dict]]], threshold: float) -> pl.DataFrame:
    """Both stopping rules for each fine-tune seed (``runs``: seed -> its checkpoints frame and graph records),
    the circuit rule at ``threshold``, on the prompts every seed has graphs of."""
    common = set.intersection(*({r["prompt_id"] for r in recs} for _, recs in runs.values()))
    out = []
    for seed, (checkpoints, recs) in sorted(runs.items()):
        cmp = compare_frame([r for r in recs if r["prompt_id"] in common and r["constraint_type"] != "seed"])
        out.append(stopping_rules(checkpoints, cmp, threshold).with_columns(seed=pl.lit(seed)))
    return pl.concat(out).select("seed", pl.exclude("seed"))


def adapted_frame(records: list[dict], adapted: list[dict]) -> pl.DataFrame:
    """Per prompt at the final checkpoint: the error share with the base model's transcoders and with the
    adapted ones; the overlap of the two graphs' features; and, for each, the share of its kept features that
    the base model's graph of the prompt does not have ("new" features)."""
    last = max(r["checkpoint"] for r in records)
    by = {(r["prompt_id"], r["checkpoint"]): r for r in records}
    rows = []
    for a in adapted:
        final, base = by[(a["prompt_id"], last)], by[(a["prompt_id"], 0)]
        keys = {
            name: {f["key"] for f in r["features"]} for name, r in (("final", final), ("adapted", a), ("base", base))
        }
        rows.append(
            {
                "prompt_id": a["prompt_id"],
                "constraint_type": a["constraint_type"],
                "error_share_base_tc": final["error_share"],
                "error_share_adapted_tc": a["error_share"],
                "errors_base_tc": final["accounting"]["errors"] / final["accounting"]["demeaned_logit"],
                "errors_adapted_tc": a["accounting"]["errors"] / a["accounting"]["demeaned_logit"],
                "feature_jaccard": compare(final, a)["feature_jaccard"],
                "new_share_base_tc": len(keys["final"] - keys["base"]) / max(len(keys["final"]), 1),
                "new_share_adapted_tc": len(keys["adapted"] - keys["base"]) / max(len(keys["adapted"]), 1),
            }
        )
    return pl.DataFrame(rows)


def circuit_frames(
    records: list[dict], transcoder_meta: dict, checkpoints: pl.DataFrame, settle: float | None
) -> dict[str, pl.DataFrame]:
    """A run's circuit results by name, in writing order (``graph_edges`` before ``graph_nodes``, whose chart
    reads them back): the transcoders' quality, the graphs, their comparisons and statistics, both stopping rules
    and the circuit rule's threshold sweep, the nodes and edges to draw."""
    graphs, compare = graphs_frame(records), compare_frame(records)
    paraphrases = paraphrase_overlap(records)
    threshold = circuit_threshold(paraphrases, settle)
    stats, tests = circuit_stats(graphs, compare)
    nodes, edges = graph_frames(records)
    checks = interventions_frame(records)
    return {
        "transcoders": transcoder_frame(transcoder_meta),
        "graphs": graphs,
        "accounting": (accounting := accounting_frame(records)),
        "accounting_means": accounting_means(accounting),
        "interventions": checks,
        "intervention_fit": intervention_fit(checks) if checks.height else pl.DataFrame(),
        "circuit_compare": compare,
        "circuit_stats": stats,
        "circuit_tests": tests,
        "paraphrases": paraphrases,
        "stopping": stopping_rules(checkpoints, compare, threshold).with_columns(threshold=pl.lit(threshold)),
        "stopping_sweep": settle_sweep(checkpoints, compare),
        "graph_edges": edges,
        "graph_nodes": nodes,
    }


def transcoder_frame(meta: dict) -> pl.DataFrame:
    """Per layer: held-out FVU, dead share and L0, with the training and held-out token counts (none for hub
    transcoders: their quality is not measured here)."""
    if not meta["layers"]:
        return pl.DataFrame(schema={"layer": pl.Int64, "fvu": pl.Float64, "dead_share": pl.Float64})
    return pl.DataFrame(meta["layers"]).select(
        "layer",
        "fvu",
        "dead_share",
        "l0",
        pl.lit(meta["train_tokens_per_layer"]).alias("train_tokens"),
        pl.col("tokens").alias("eval_tokens"),
    )


# ------------------------------------------------------------------------------------------ views to draw/show


def graph_drawing(nodes: pl.DataFrame, edges: pl.DataFrame, prompt_id: str | None = None) -> pl.DataFrame:
    """One prompt's nodes and edges in one frame (edges have ``kind == "edge"``), what ``charts.plot_graph``
    draws; ``prompt_id`` defaults to the first prompt in ``nodes``."""
    prompt_id = prompt_id or nodes["prompt_id"][0]
    nodes = nodes.filter(pl.col("prompt_id") == prompt_id)
    edges = edges.filter(pl.col("prompt_id") == prompt_id)
    return pl.concat([nodes, edges.with_columns(kind=pl.lit("edge"))], how="diagonal_relaxed")


def graph_rows(graphs: pl.DataFrame, prompt_id: str) -> pl.DataFrame:
    """One prompt's graphs, one row per checkpoint in training order."""
    return graphs.filter(pl.col("prompt_id") == prompt_id).sort("checkpoint")


def top_features(nodes: pl.DataFrame, prompt_id: str, n: int = 5, labels: pl.DataFrame | None = None) -> pl.DataFrame:
    """The ``n`` most influential feature nodes of one prompt's graph at each checkpoint; with ``labels``
    (the ``feature_labels`` result) each feature's label and strongest held-out context, where it has one."""
    top = (
        nodes.filter((pl.col("prompt_id") == prompt_id) & (pl.col("kind") == "feature"))
        .sort("influence", descending=True)
        .group_by("checkpoint", maintain_order=True)
        .head(n)
        .sort("checkpoint")
    )
    cols = ["checkpoint", "label", "pos", "influence"]
    if labels is None or not labels.height:
        return top.select(cols)
    named = labels.select(
        (pl.col("layer") + 1).alias("layer"),  # the drawing's layer: 0 is the tokens
        "feature",
        pl.col("label").alias("fires_on"),
        pl.col("contexts").list.first().alias("context"),
    )
    return top.join(named, on=["layer", "feature"], how="left").select(*cols, "fires_on", "context")


def concept_logprobs(base, tuned, tokenizer, prompt: str) -> pl.DataFrame:
    """Log-probability of each concept word as the next word after ``prompt``, under the base model and (when
    ``tuned`` is not None) the fine-tuned one."""
    rows = []
    for c in sorted(concepts()):
        row = {"concept": c, "base log p": continuation_logprob(base, tokenizer, prompt, " " + c)}
        if tuned is not None:
            row["fine-tuned log p"] = continuation_logprob(tuned, tokenizer, prompt, " " + c)
        rows.append(row)
    return pl.DataFrame(rows)


def prompt_ids(graphs: pl.DataFrame) -> list[str]:
    """The prompts that have graphs, in the order they were traced."""
    return graphs.select("prompt_id").unique(maintain_order=True)["prompt_id"].to_list()
