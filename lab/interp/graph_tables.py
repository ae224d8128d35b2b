"""Tables of attribution-graph records (``lab.interp.circuits.trace_prompts``'s, tagged with ``prompt_id``,
``constraint_type``, ``checkpoint`` and ``fraction``): the full accounting of each graph's followed logit, the
intervention checks and how well they fit, and the base model's paraphrase overlap.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from lab.interp.circuits import feature_set, jaccard

# the demeaned logit's parts (lab.interp.graph_checks.account), in the order the page lists them
ACCOUNT_PARTS = ("selected_features", "unselected_features", "errors", "tokens", "b_dec", "bos_mlp", "residual")
TAGS = ("prompt_id", "constraint_type", "checkpoint", "fraction")


def accounting_frame(records: list[dict]) -> pl.DataFrame:
    """One row per graph: its demeaned logit, each part of it in logit units and each part's share of it (the
    shares add up to 1; a part that pushes against the logit has a negative share)."""
    rows = []
    for r in records:
        a = r["accounting"]
        row = {k: r[k] for k in TAGS} | {"demeaned_logit": a["demeaned_logit"]}
        row |= {p: a[p] for p in ACCOUNT_PARTS}
        row |= {f"{p}_share": a[p] / a["demeaned_logit"] for p in ACCOUNT_PARTS}
        rows.append(row)
    return pl.DataFrame(rows)


def accounting_means(accounting: pl.DataFrame) -> pl.DataFrame:
    """Per prompt group and checkpoint: the mean share of the demeaned logit from each part (``accounting_frame``
    averaged over the group's graphs), and the largest |residual| in logit units."""
    return (
        accounting.group_by("constraint_type", "checkpoint", "fraction")
        .agg(
            pl.len().alias("graphs"),
            *[pl.col(f"{p}_share").mean() for p in ACCOUNT_PARTS if p != "residual"],
            pl.col("residual").abs().max().alias("residual_max"),
        )
        .sort("constraint_type", "checkpoint")
    )


def interventions_frame(records: list[dict]) -> pl.DataFrame:
    """One row per intervention of the checked graphs (``lab.interp.graph_checks.intervene``)."""
    rows = [{k: r[k] for k in TAGS} | row for r in records for row in r.get("interventions", [])]
    return pl.DataFrame(rows)


def intervention_fit(frame: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint: how well the graphs' predicted direct effects match the measured changes of the target
    logit: Pearson r and the share with the predicted sign, through the whole model and with everything else
    frozen (which should match exactly), over every checked feature and scale."""
    rows = []
    for (ck,), g in frame.group_by("checkpoint"):
        row = {"checkpoint": ck, "fraction": g["fraction"][0], "n": g.height}
        for name, col in (("whole", "measured"), ("frozen", "measured_direct")):
            row[f"r_{name}"] = float(np.corrcoef(g["predicted"].to_numpy(), g[col].to_numpy())[0, 1])
            row[f"same_sign_{name}"] = float(((g["predicted"] * g[col]) > 0).mean())
        row["median_ratio_whole"] = float((g["measured"] / g["predicted"]).median())
        rows.append(row)
    return pl.DataFrame(rows).sort("checkpoint")


def paraphrase_overlap(records: list[dict]) -> pl.DataFrame:
    """The base model's variability, what the circuit rule's threshold is set from before any fine-tuned graph
    is read: for each invented word with two or more held-out graph prompts at checkpoint 0, the overlap of the
    first two prompts' feature sets (layer and feature, positions dropped: the prompts differ in tokens)."""
    by_word: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["checkpoint"] == 0 and r["constraint_type"] != "seed":
            by_word.setdefault((r["constraint_type"], r["word"]), []).append(r)
    rows = [
        {
            "constraint_type": ctype,
            "word": word,
            "prompt_a": rs[0]["prompt_id"],
            "prompt_b": rs[1]["prompt_id"],
            "feature_set_jaccard": jaccard(feature_set(rs[0]), feature_set(rs[1])),
        }
        for (ctype, word), rs in sorted(by_word.items())
        if len(rs) >= 2
    ]
    return pl.DataFrame(
        rows,
        schema={
            "constraint_type": pl.String,
            "word": pl.String,
            "prompt_a": pl.String,
            "prompt_b": pl.String,
            "feature_set_jaccard": pl.Float64,
        },
    )
