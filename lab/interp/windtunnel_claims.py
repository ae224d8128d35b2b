"""The wind tunnel's mechanistic claims judged on many trained transformers: one measurement pass per model
(:func:`measure`, every analysis of :mod:`lab.interp.windtunnel` on the model and on its initial weights), the
numbers each claim is judged on (:func:`claim_numbers`), the fixed rules (:func:`claim_verdicts`), and the scale
ladder's frames: the same analyses at several sizes, each claim's verdict per size and its trend with size
("holds from size X", "does not hold at any size tried", "moves toward the paper's value with size").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from lab.data.windtunnel import Batch
from lab.interp.windtunnel import ablations, attention_routing, final_state_pca, key_orthogonality, logit_lens
from lab.models.windtunnel import ModelSpec, build_model
from lab.train.windtunnel import RunResult


@dataclass(frozen=True)
class Mechanisms:
    """The mechanistic measurements over the seeds of one model (trained, and at initialisation where it applies)."""

    keys: pl.DataFrame  # layer-0 key geometry per head (key_orthogonality), with d_head and the random baseline
    routing: pl.DataFrame  # attention mass from key positions per layer and head (attention_routing)
    pca: pl.DataFrame  # principal components of the final states (final_state_pca)
    points: pl.DataFrame  # the first seed's trained final states on PC1/PC2, capped for the scatter
    lens: pl.DataFrame  # logit-lens KL after each sublayer (trained only)
    ablations: pl.DataFrame  # entropy MAE with each component ablated (trained only)


@dataclass(frozen=True)
class Rung:
    """One size of a scale ladder: how tables name it, its model and its peak learning rate."""

    label: str
    spec: ModelSpec
    lr: float


# The mechanistic claims, in the verdicts table's order (the scale ladder judges each at every size).
CLAIMS = {
    "keys": "Layer-0 keys are near-orthogonal: mean |cos| between key tokens",
    "sharpening": "Query–key alignment sharpens with depth",
    "manifold": "Final states: low-dimensional manifold parameterised by entropy",
    "lens": "Residual stream carries the belief: logit-lens KL falls layer by layer",
    "ffn_update": "FFN performs the posterior update, attention routes",
    "heads": "No single indispensable layer-0 head",
}


NOT_TESTABLE = "not testable at this size"


def verdict(full: bool, partial: bool = False) -> str:
    return "reproduced" if full else ("partly" if partial else "not reproduced")


def claim_numbers(m: Mechanisms) -> dict[str, Any]:
    """The measurements each mechanistic claim is judged on, means over the seeds in ``m`` (bits where a loss)."""
    keys, routing, pca, lens, abl = m.keys, m.routing, m.pca, m.lens, m.ablations
    k = keys.filter(pl.col("tokens") == "key tokens").group_by("state").agg(pl.col("mean_abs_cos").mean())
    r = (
        routing.filter(pl.col("state") == "trained")
        .group_by("layer")
        .agg(pl.col("value_mass").mean(), (pl.col("qk_cos_value") - pl.col("qk_cos_key")).mean().alias("qk_gap"))
        .sort("layer")
    )
    pc1 = pca.filter((pl.col("state") == "trained") & (pl.col("component") == 1))
    per_seed = lens.group_by("seed").agg(pl.col("kl_bits").diff().drop_nulls().max().alias("max_rise"))
    drops = lens.sort("seed", "stage").with_columns((-pl.col("kl_bits").diff().over("seed")).alias("drop"))
    n_seeds = lens["seed"].n_unique()
    mean_abl = abl.filter(pl.col("method") == "mean")
    heads = abl.filter((pl.col("target") == "head") & (pl.col("method") == "zero"))
    return {
        "layers": r.height,
        "key_cos": k.filter(pl.col("state") == "trained")["mean_abs_cos"].item(),
        "key_cos_init": k.filter(pl.col("state") == "init")["mean_abs_cos"].item(),
        "value_mass_first": r["value_mass"][0],
        "value_mass_last": r["value_mass"][-1],
        "qk_gap_first": r["qk_gap"][0],
        "qk_gap_last": r["qk_gap"][-1],
        "pc1_share": pc1["variance_share"].mean(),
        "pc1_abs_corr": pc1["corr_h_bayes"].abs().mean(),
        "lens_monotone": bool((per_seed["max_rise"] <= 1e-3).all()),
        "lens_kl_first": lens.filter(pl.col("stage") == 0)["kl_bits"].mean(),
        "lens_kl_last": lens.filter(pl.col("stage") == lens["stage"].max())["kl_bits"].mean(),
        # bits of lens KL removed, summed over layers, mean over seeds
        "lens_drop_attn": drops.filter(pl.col("sublayer") == "attn")["drop"].sum() / n_seeds,
        "lens_drop_ffn": drops.filter(pl.col("sublayer") == "ffn")["drop"].sum() / n_seeds,
        "abl_attn_mean": mean_abl.filter(pl.col("target") == "attn")["delta_mae_bits"].mean(),
        "abl_ffn_mean": mean_abl.filter(pl.col("target") == "ffn")["delta_mae_bits"].mean(),
        "head_zero_min": heads["delta_mae_bits"].min(),
        "head_zero_max": heads["delta_mae_bits"].max(),
    }


def claim_verdicts(n: dict[str, Any], floor: float, *, key_cos_max: float, pc1_min: float) -> dict[str, str]:
    """Each mechanistic claim's verdict by its fixed rule, from :func:`claim_numbers`: ``key_cos_max`` and
    ``pc1_min`` are the paper's checklist thresholds, ``floor`` the context-blind MAE (bits)."""
    kt, ki = n["key_cos"], n["key_cos_init"]
    vm = n["value_mass_last"] > n["value_mass_first"]
    gap = n["qk_gap_last"] > n["qk_gap_first"]
    ffn = n["lens_drop_ffn"] > n["lens_drop_attn"]
    return {
        "keys": verdict(kt < key_cos_max and kt < ki, kt < key_cos_max or kt < ki),
        # one layer has no depth to sharpen over
        "sharpening": verdict(vm and gap, vm or gap) if n["layers"] > 1 else NOT_TESTABLE,
        "manifold": verdict(n["pc1_share"] > pc1_min and n["pc1_abs_corr"] > 0.9, n["pc1_abs_corr"] > 0.9),
        "lens": verdict(n["lens_monotone"], True),
        "ffn_update": verdict(ffn and n["abl_ffn_mean"] > 0.05 and n["abl_attn_mean"] > 0.05, ffn),
        "heads": verdict(n["head_zero_max"] < 0.5 * floor),
    }


def measure(spec: ModelSpec, seed: int, model: torch.nn.Module, batch: Batch) -> dict[str, list[pl.DataFrame]]:
    """Every analysis of :mod:`lab.interp.windtunnel` on one trained model and on its initial weights (the same
    ones its run started from), each frame tagged with ``state`` and ``seed``; the final states' PCA points of the
    trained model under ``"points"``."""
    torch.manual_seed(seed)
    init = build_model(spec, batch.V).eval()
    out: dict[str, list[pl.DataFrame]] = {"keys": [], "routing": [], "pca": [], "points": []}
    for state, m in (("trained", model), ("init", init)):
        tag = [pl.lit(state).alias("state"), pl.lit(seed).alias("seed")]
        out["keys"].append(key_orthogonality(m, batch).with_columns(tag))
        out["routing"].append(attention_routing(m, batch).with_columns(tag))
        comps, pts = final_state_pca(m, batch)
        out["pca"].append(comps.with_columns(tag))
        if state == "trained":
            out["points"].append(pts)
    out["lens"] = [logit_lens(model, batch).with_columns(pl.lit(seed).alias("seed"))]
    out["ablations"] = [ablations(model, batch).with_columns(pl.lit(seed).alias("seed"))]
    return out


def as_mechanisms(parts: list[dict[str, list[pl.DataFrame]]], points: pl.DataFrame | None = None) -> Mechanisms:
    """The :class:`Mechanisms` of several :func:`measure` results (seeds of one model)."""

    def cat(key: str) -> pl.DataFrame:
        return pl.concat([f for p in parts for f in p[key]])

    first = points if points is not None else parts[0]["points"][0]
    return Mechanisms(cat("keys"), cat("routing"), cat("pca"), first, cat("lens"), cat("ablations"))


def ladder_frames(
    runs: list[tuple[Rung, int, RunResult]], batch: Batch, floor: float, paper: dict[str, float]
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """``scale``, ``scale_layers`` and ``scale_verdicts`` of the ladder's runs, (rung, seed, run) each; ``paper``:
    the checklist thresholds ``key_cos_max`` and ``pc1_min`` and the paper's values ``key_cos`` (trained keys)."""
    rows, layers = [], []
    for cand, seed, r in runs:
        m = as_mechanisms([measure(cand.spec, seed, r.model, batch)])
        n = claim_numbers(m)
        last = r.log.row(-1, named=True)
        tail = r.log.filter(pl.col("step") >= 0.75 * last["step"])["mae_bits"]
        size = {"size": cand.label, "n_params": r.n_params, "n_layer": cand.spec.n_layer}
        rows.append(
            {
                **size,
                "d_model": cand.spec.d_model,
                "n_head": cand.spec.n_head,
                "seed": seed,
                "steps": int(last["step"]),
                "lr": cand.lr,
                "train_s": r.train_time_s,
                "mae_bits": last["mae_bits"],
                "kl_bits": last["kl_bits"],
                # how much the MAE still fell over the last quarter of training (0: flat, a plateau)
                "last_quarter_drop": float(tail[0] - tail[-1]) / float(tail[0]) if tail[0] else 0.0,
                **n,
            }
        )
        routing = (
            m.routing.filter(pl.col("state") == "trained")
            .group_by("layer")
            .agg(pl.col("value_mass").mean(), (pl.col("qk_cos_value") - pl.col("qk_cos_key")).mean().alias("qk_gap"))
        )
        lens = m.lens.sort("stage").with_columns((-pl.col("kl_bits").diff()).alias("drop"))
        lens_by = lens.filter(pl.col("sublayer").is_in(["attn", "ffn"])).pivot(
            on="sublayer", index="layer", values="drop", aggregate_function="sum"
        )
        layers.append(
            routing.join(lens_by, on="layer", how="left")
            .rename({"attn": "lens_drop_attn", "ffn": "lens_drop_ffn"})
            .with_columns(*(pl.lit(v).alias(k) for k, v in size.items()), pl.lit(seed).alias("seed"))
        )
    scale = pl.DataFrame(rows)
    return (
        scale,
        pl.concat(layers, how="diagonal_relaxed").sort("n_params", "seed", "layer"),
        scale_verdicts(scale, floor, paper),
    )


def _mean_numbers(frame: pl.DataFrame) -> dict[str, Any]:
    """:func:`claim_numbers` averaged over a size's seeds (booleans: all seeds)."""
    out: dict[str, Any] = {}
    for col in frame.columns:
        s = frame[col]
        out[col] = bool(s.all()) if s.dtype == pl.Boolean else (s.mean() if s.dtype.is_numeric() else s[0])
    return out


# The number that shows each claim's direction with size, and the key of the paper's value of it in `paper`.
TREND = {
    "keys": ("key_cos", "key_cos"),
    "sharpening": ("value_mass_last", None),
    "manifold": ("pc1_share", "pc1_min"),
    "lens": ("lens_kl_last", None),
    "ffn_update": ("lens_drop_ffn", None),
    "heads": ("head_zero_max", None),
}


def trend(verdicts: list[str], values: list[float], paper: float | None, labels: list[str]) -> str:
    """A claim's verdicts from the smallest size to the largest (named by ``labels``), read as one sentence; sizes
    where the claim cannot be tested (one layer has no depth) are left out."""
    keep = [i for i, v in enumerate(verdicts) if v != NOT_TESTABLE]
    if not keep:
        return "not testable at any size tried"
    verdicts, values, labels = ([x[i] for i in keep] for x in (verdicts, values, labels))
    held = [v == "reproduced" for v in verdicts]
    if all(held):
        return "holds at every size tried"
    if any(held):
        first = held.index(True)
        if all(held[first:]):
            return f"holds from {labels[first]} up"  # first > 0: all-held returned above
        return "holds at some sizes, not monotonically with size"
    if paper is not None and len(values) > 1:
        gaps = [abs(v - paper) for v in values]
        if all(b < a for a, b in zip(gaps, gaps[1:], strict=False)):
            return "does not hold at any size tried; moves toward the paper's value with size"
    return "does not hold at any size tried"


def scale_verdicts(scale: pl.DataFrame, floor: float, paper: dict[str, float]) -> pl.DataFrame:
    """One row per (claim, size): the verdict at that size (numbers averaged over its seeds), the number that
    tracks it, and the claim's trend over the sizes (smallest to largest parameter count)."""
    sizes = scale.group_by("size", "n_params", "n_layer").agg(pl.len()).sort("n_params")
    numbers = {
        s: _mean_numbers(scale.filter(pl.col("size") == s).drop("size", "n_params", "n_layer", "seed"))
        for s in sizes["size"]
    }
    rules = {"key_cos_max": paper["key_cos_max"], "pc1_min": paper["pc1_min"]}
    per_size = {s: claim_verdicts(n, floor, **rules) for s, n in numbers.items()}
    rows = []
    for key, claim in CLAIMS.items():
        col, ref = TREND[key]
        verdicts = [per_size[s][key] for s in sizes["size"]]
        values = [float(numbers[s][col]) for s in sizes["size"]]
        summary = trend(verdicts, values, paper.get(ref) if ref else None, list(sizes["size"]))
        for (s, n_params, n_layer, n_runs), v, x in zip(sizes.iter_rows(), verdicts, values, strict=True):
            rows.append(
                {
                    "claim": claim,
                    "key": key,
                    "size": s,
                    "n_params": n_params,
                    "n_layer": n_layer,
                    "seeds": n_runs,
                    "verdict": v,
                    "measure": col,
                    "value": x,
                    "trend": summary,
                }
            )
    return pl.DataFrame(rows)


def verdict_grid(verdicts: pl.DataFrame) -> pl.DataFrame:
    """:func:`scale_verdicts` as one row per claim: its verdict at each size (a column per size, smallest first)
    and its trend."""
    sizes = verdicts.sort("n_params")["size"].unique(maintain_order=True).to_list()
    grid = verdicts.pivot(on="size", index="claim", values="verdict", aggregate_function="first")
    trend_of = verdicts.group_by("claim", maintain_order=True).agg(pl.col("trend").first())
    order = verdicts.select("claim").unique(maintain_order=True)
    return (
        order.join(grid, on="claim", how="left").join(trend_of, on="claim", how="left").select("claim", *sizes, "trend")
    )
