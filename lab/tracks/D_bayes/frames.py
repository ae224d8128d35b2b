"""Track D's tables: every result frame, and every aggregation its charts and summary need.

Inputs are finished runs (:class:`lab.train.windtunnel.RunResult`), trained models and the frames of
:mod:`lab.interp.windtunnel`; outputs are polars frames. The charts draw these frames as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from lab.tracks.D_bayes.config import (
    PAPER_CURVE,
    PAPER_HEAD_ABLATION,
    PAPER_KEY_COS,
    PAPER_KEY_COS_MAX,
    PAPER_MAE,
    PAPER_MODEL,
    PAPER_PC1_MIN,
    BayesTrackConfig,
)
from lab.train.windtunnel import RunResult

# ----------------------------------------------------------------------------- training


def paper_curve() -> pl.DataFrame:
    """The authors' reported learning curve as rows (model, seed = -1, step, mae_bits)."""
    return pl.DataFrame({"step": [s for s, _ in PAPER_CURVE], "mae_bits": [m for _, m in PAPER_CURVE]}).with_columns(
        pl.lit(f"paper ({PAPER_MODEL})").alias("model"), pl.lit(-1).alias("seed")
    )


def curves_frame(logs: list[tuple[str, int, pl.DataFrame]]) -> pl.DataFrame:
    """Learning curves of our runs, (model, seed, log) each, plus the authors' reported curve."""
    cols = ["step", "sequences", "train_s", "mae_bits", "kl_bits", "train_loss", "lr"]
    frames = [
        log.select(cols).with_columns(pl.lit(model).alias("model"), pl.lit(seed).alias("seed"))
        for model, seed, log in logs
    ]
    out = pl.concat([*frames, paper_curve()], how="diagonal_relaxed").with_columns(pl.col("step").cast(pl.Int64))
    return out.with_columns(pl.col(pl.Float64).fill_nan(None))  # NaN is not JSON: charts need nulls


def live_curve(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """The notebook's run so far (its log rows) next to the authors' curve, shaped like :func:`curves_frame`."""
    return pl.concat(
        [pl.DataFrame(rows).with_columns(pl.lit("this run").alias("model"), pl.lit(0).alias("seed")), paper_curve()],
        how="diagonal_relaxed",
    )


def first_at(log: pl.DataFrame, target: float, col: str) -> float | None:
    """``col`` (step or train_s) at the first evaluation with an entropy MAE at or below ``target``."""
    hit = log.filter(pl.col("mae_bits") <= target)
    return None if hit.is_empty() else float(hit[col][0])


def seeds_frame(runs: list[tuple[str, int, RunResult]]) -> pl.DataFrame:
    """One row per (model, seed) run: size, training time, whether it was cached, and its final metrics."""
    return pl.DataFrame(
        [
            {
                "model": name,
                "seed": seed,
                "n_params": r.n_params,
                "steps": int(r.log["step"][-1]),
                "train_s": r.train_time_s,
                "cached": r.cached,
                **{k: r.log[k][-1] for k in ("mae_bits", "kl_bits", "mae_mean_entropy_bits", "mass_eliminated")},
            }
            for name, seed, r in runs
        ]
    )


def headline(seeds: pl.DataFrame) -> dict[str, Any]:
    """The transformer's numbers over seeds and the controls' (NaN / 0 where a control did not run)."""
    tf = seeds.filter(pl.col("model") == "transformer")

    def control(model: str, col: str, missing: Any) -> Any:
        row = seeds.filter(pl.col("model") == model)
        return row[col][0] if row.height else missing

    return {
        "n_params": tf["n_params"][0],
        "mae_mean": tf["mae_bits"].mean(),
        "mae_std": tf["mae_bits"].std() if tf.height > 1 else 0.0,
        "mae_min": tf["mae_bits"].min(),
        "mae_max": tf["mae_bits"].max(),
        "kl_mean": tf["kl_bits"].mean(),
        "mae_mean_entropy_mean": tf["mae_mean_entropy_bits"].mean(),
        "mass_eliminated_mean": tf["mass_eliminated"].mean(),
        "train_s_mean": tf["train_s"].mean(),
        "train_s_max": tf["train_s"].max(),
        "mlp_mae": control("mlp", "mae_bits", float("nan")),
        "mlp_params": control("mlp", "n_params", 0),
        "lstm_mae": control("lstm", "mae_bits", float("nan")),
        "lstm_params": control("lstm", "n_params", 0),
    }


def comparison_frame(cfg: BayesTrackConfig, seeds: pl.DataFrame, floor: float) -> pl.DataFrame:
    """Ours next to the paper's entropy MAE: transformer, MLP, LSTM (when trained) and the analytic floor."""
    h = headline(seeds)
    lstm = seeds.filter(pl.col("model") == "lstm").height > 0
    return pl.DataFrame(
        [
            {
                "model": "Transformer",
                "paper_mae_bits": PAPER_MAE["transformer"],
                "ours_mae_bits": h["mae_mean"],
                "ours_spread": f"{h['mae_min']:.4f}–{h['mae_max']:.4f} over {len(cfg.seeds)} seeds",
                "paper_model": PAPER_MODEL,
                "our_model": f"{cfg.headline.model.n_layer}L d{cfg.headline.model.d_model}, {h['n_params']:,} params",
            },
            {
                "model": "MLP, no attention",
                "paper_mae_bits": PAPER_MAE["mlp"],
                "ours_mae_bits": h["mlp_mae"],
                "ours_spread": "1 seed",
                "paper_model": "capacity-matched MLP",
                "our_model": f"context-blind, {h['mlp_params']:,} params",
            },
        ]
        + (
            [
                {
                    "model": "LSTM",
                    "paper_mae_bits": PAPER_MAE["lstm"],
                    "ours_mae_bits": h["lstm_mae"],
                    "ours_spread": "1 seed",
                    "paper_model": "LSTM",
                    "our_model": f"{cfg.lstm.n_layer}-layer, {h['lstm_params']:,} params",
                }
            ]
            if lstm
            else []
        )
        + [
            {
                "model": "Uniform guess, analytic",
                "paper_mae_bits": None,
                "ours_mae_bits": floor,
                "ours_spread": "exact",
                "paper_model": "",
                "our_model": "ignores the context",
            },
        ]
    )


def search_frame(cfg: BayesTrackConfig, results: list[RunResult]) -> pl.DataFrame:
    """One row per search candidate (first seed): its shape, optimisation, final metrics and time to target."""
    rows = []
    for c, r in zip(cfg.search, results, strict=True):
        last = r.log.row(-1, named=True)
        rows.append(
            {
                "config": c.label,
                "n_layer": c.model.n_layer,
                "n_head": c.model.n_head,
                "d_model": c.model.d_model,
                "batch_size": c.train.batch_size,
                "lr": c.train.lr,
                "steps": c.train.steps,
                "weight_decay": c.train.weight_decay,
                "n_params": r.n_params,
                "mae_bits": last["mae_bits"],
                "kl_bits": last["kl_bits"],
                "train_s": r.train_time_s,
                "step_at_target": first_at(r.log, cfg.target_mae, "step"),
                "train_s_at_target": first_at(r.log, cfg.target_mae, "train_s"),
                "headline": c == cfg.headline,
            }
        )
    return pl.DataFrame(rows)


# ----------------------------------------------------------------------------- mechanisms


@dataclass(frozen=True)
class Mechanisms:
    """The mechanistic measurements over the headline seeds (trained, and at initialisation where it applies)."""

    keys: pl.DataFrame  # layer-0 key geometry per head (key_orthogonality), with d_head and the random baseline
    routing: pl.DataFrame  # attention mass from key positions per layer and head (attention_routing)
    pca: pl.DataFrame  # principal components of the final states (final_state_pca)
    points: pl.DataFrame  # the first seed's trained final states on PC1/PC2, capped for the scatter
    lens: pl.DataFrame  # logit-lens KL after each sublayer (trained only)
    ablations: pl.DataFrame  # entropy MAE with each component ablated (trained only)


def mech_summary(m: Mechanisms) -> pl.DataFrame:
    """The mechanistic numbers the page quotes, as means over seeds (one row)."""
    keys, routing, pca, lens, abl = m.keys, m.routing, m.pca, m.lens, m.ablations
    last_layer, last_stage = int(routing["layer"].max()), int(lens["stage"].max())
    heads = abl.filter(pl.col("target") == "head")
    deeper = abl.filter((pl.col("layer") >= 1) & (pl.col("target") != "head"))

    def mean(df: pl.DataFrame, col: str, **eq: Any) -> float:
        for k, v in eq.items():
            df = df.filter(pl.col(k) == v)
        return float(df[col].mean())

    def pc1_abs_corr(state: str) -> float:
        return float(pca.filter((pl.col("state") == state) & (pl.col("component") == 1))["corr_h_bayes"].abs().mean())

    def head_delta(method: str) -> pl.Series:
        return heads.filter(pl.col("method") == method)["delta_mae_bits"]

    return pl.DataFrame(
        [
            {
                "key_cos_trained": mean(keys, "mean_abs_cos", tokens="key tokens", state="trained"),
                "key_cos_init": mean(keys, "mean_abs_cos", tokens="key tokens", state="init"),
                "value_cos_trained": mean(keys, "mean_abs_cos", tokens="value tokens", state="trained"),
                "value_cos_init": mean(keys, "mean_abs_cos", tokens="value tokens", state="init"),
                "random_vectors_cos": float(keys["random_vectors"][0]),
                "value_mass_first": mean(routing, "value_mass", state="trained", layer=0),
                "value_mass_last": mean(routing, "value_mass", state="trained", layer=last_layer),
                "value_mass_init": mean(routing, "value_mass", state="init", layer=0),
                "evenness_first": mean(routing, "value_evenness", state="trained", layer=0),
                "evenness_last": mean(routing, "value_evenness", state="trained", layer=last_layer),
                "pc1_share": mean(pca, "variance_share", state="trained", component=1),
                "pc1_share_init": mean(pca, "variance_share", state="init", component=1),
                "pc1_abs_corr": pc1_abs_corr("trained"),
                "pc1_abs_corr_init": pc1_abs_corr("init"),
                "lens_kl_embed": mean(lens, "kl_bits", stage=0),
                "lens_kl_attn0": mean(lens, "kl_bits", stage=1),
                "lens_kl_ffn0": mean(lens, "kl_bits", stage=2),
                "lens_kl_final": mean(lens, "kl_bits", stage=last_stage),
                "lens_mae_ffn0": mean(lens, "mae_bits", stage=2),
                "lens_mae_final": mean(lens, "mae_bits", stage=last_stage),
                "abl_attn0_zero": mean(abl, "mae_bits", target="attn", layer=0, method="zero"),
                "abl_attn0_mean": mean(abl, "mae_bits", target="attn", layer=0, method="mean"),
                "abl_ffn0_zero": mean(abl, "mae_bits", target="ffn", layer=0, method="zero"),
                "abl_ffn0_mean": mean(abl, "mae_bits", target="ffn", layer=0, method="mean"),
                "abl_deeper_max_delta": float(deeper["delta_mae_bits"].max()) if deeper.height else float("nan"),
                "head_zero_min": float(head_delta("zero").min()),
                "head_zero_max": float(head_delta("zero").max()),
                "head_mean_min": float(head_delta("mean").min()),
                "head_mean_max": float(head_delta("mean").max()),
            }
        ]
    )


# ----------------------------------------------------------------------------- verdicts


def _verdict(full: bool, partial: bool = False) -> str:
    return "reproduced" if full else ("partly" if partial else "not reproduced")


def verdicts_frame(seeds: pl.DataFrame, m: Mechanisms, floor: float) -> pl.DataFrame:
    """One row per claim: what the paper says, what we measured (means over seeds) and a verdict by a fixed rule.

    Args:
        seeds: :func:`seeds_frame` (the transformer seeds and the MLP control are read from it).
        m: The mechanistic measurements.
        floor: The analytic entropy MAE of a context-blind guess (bits).
    """
    h = headline(seeds)
    keys, routing, pca, lens, abl = m.keys, m.routing, m.pca, m.lens, m.ablations
    k = keys.filter(pl.col("tokens") == "key tokens").group_by("state").agg(pl.col("mean_abs_cos").mean())
    kt = k.filter(pl.col("state") == "trained")["mean_abs_cos"].item()
    ki = k.filter(pl.col("state") == "init")["mean_abs_cos"].item()
    r = (
        routing.filter(pl.col("state") == "trained")
        .group_by("layer")
        .agg(pl.col("value_mass").mean(), (pl.col("qk_cos_value") - pl.col("qk_cos_key")).mean().alias("qk_gap"))
        .sort("layer")
    )
    vm_first, vm_last = r["value_mass"][0], r["value_mass"][-1]
    gap_first, gap_last = r["qk_gap"][0], r["qk_gap"][-1]
    pc1 = pca.filter((pl.col("state") == "trained") & (pl.col("component") == 1))
    share, corr = pc1["variance_share"].mean(), pc1["corr_h_bayes"].abs().mean()
    per_seed = lens.group_by("seed").agg(pl.col("kl_bits").diff().drop_nulls().max().alias("max_rise"))
    monotone = bool((per_seed["max_rise"] <= 1e-3).all())
    kl_first = lens.filter(pl.col("stage") == 0)["kl_bits"].mean()
    kl_last = lens.filter(pl.col("stage") == lens["stage"].max())["kl_bits"].mean()
    drops = lens.sort("seed", "stage").with_columns((-pl.col("kl_bits").diff().over("seed")).alias("drop"))
    n_seeds = lens["seed"].n_unique()
    drop_attn = drops.filter(pl.col("sublayer") == "attn")["drop"].sum() / n_seeds  # bits, summed over layers
    drop_ffn = drops.filter(pl.col("sublayer") == "ffn")["drop"].sum() / n_seeds
    mean_abl = abl.filter(pl.col("method") == "mean")
    d_attn = mean_abl.filter(pl.col("target") == "attn")["delta_mae_bits"].mean()
    d_ffn = mean_abl.filter(pl.col("target") == "ffn")["delta_mae_bits"].mean()
    heads = abl.filter((pl.col("target") == "head") & (pl.col("method") == "zero"))
    h_lo, h_hi = heads["delta_mae_bits"].min(), heads["delta_mae_bits"].max()
    rows = [
        (
            "Transformer matches the Bayes posterior, entropy MAE",
            f"{PAPER_MAE['transformer']} bits; {PAPER_MODEL}",
            f"{h['mae_mean']:.4f} ± {h['mae_std']:.4f} bits; {h['n_params']:,} params",
            _verdict(h["mae_max"] <= 0.02, h["mae_mean"] <= 0.05),
        ),
        (
            "MLP without attention fails",
            f"{PAPER_MAE['mlp']} bits",
            f"{h['mlp_mae']:.3f} bits; a context-blind guess scores {floor:.3f}",
            _verdict(h["mlp_mae"] > 0.5),
        ),
        (
            "Layer-0 keys are near-orthogonal: mean |cos| between key tokens",
            f"{PAPER_KEY_COS[0]} trained vs {PAPER_KEY_COS[1]} at init; checklist < {PAPER_KEY_COS_MAX}",
            f"{kt:.3f} trained vs {ki:.3f} at init",
            _verdict(kt < PAPER_KEY_COS_MAX and kt < ki, kt < PAPER_KEY_COS_MAX or kt < ki),
        ),
        (
            "Query–key alignment sharpens with depth",
            "deeper layers focus on the relevant hypotheses",
            f"first → last layer: mass on revealed values {vm_first:.2f} → {vm_last:.2f}; q·k cosine, values minus "
            f"keys, {gap_first:.2f} → {gap_last:.2f}",
            _verdict(vm_last > vm_first and gap_last > gap_first, vm_last > vm_first or gap_last > gap_first),
        ),
        (
            "Final states: low-dimensional manifold parameterised by entropy",
            f"PC1 > {PAPER_PC1_MIN:.0%} of variance, strongly correlated with entropy",
            f"PC1 {share:.1%} of variance, |corr| with H_Bayes {corr:.2f}",
            _verdict(share > PAPER_PC1_MIN and corr > 0.9, corr > 0.9),
        ),
        (
            "Residual stream carries the belief: logit-lens KL falls layer by layer",
            "KL to the posterior falls with depth",
            f"KL {kl_first:.3f} → {kl_last:.4f} bits; {'monotone' if monotone else 'not monotone'} over sublayers",
            _verdict(monotone, True),
        ),
        (
            "FFN performs the posterior update, attention routes",
            "FFN = update, attention = routing",
            f"lens KL falls {drop_attn:.3f} bits across attention sublayers, {drop_ffn:.3f} across FFNs; mean-ablating "
            f"attention costs {d_attn:+.3f} bits, an FFN {d_ffn:+.3f}, mean over layers",
            _verdict(drop_ffn > drop_attn and d_ffn > 0.05 and d_attn > 0.05, drop_ffn > drop_attn),
        ),
        (
            "No single indispensable layer-0 head",
            f"each head costs {PAPER_HEAD_ABLATION[0]}–{PAPER_HEAD_ABLATION[1]} bits",
            f"zero-ablating one head costs {h_lo:+.3f} to {h_hi:+.3f} bits",
            _verdict(h_hi < 0.5 * floor),
        ),
    ]
    return pl.DataFrame(rows, schema=["claim", "paper", "ours", "verdict"], orient="row")


# ----------------------------------------------------------------------------- what the charts draw


def curve_lines(curves: pl.DataFrame) -> pl.DataFrame:
    """The curves with a positive step and MAE (both axes are log scales), each labelled with its run."""
    return curves.filter((pl.col("mae_bits") > 0) & (pl.col("step") > 0)).with_columns(
        (
            pl.col("model")
            + pl.when(pl.col("seed") >= 0).then(pl.lit(" s") + pl.col("seed").cast(pl.Utf8)).otherwise(pl.lit(""))
        ).alias("run")
    )


def reference_lines(target: float, floor: float | None) -> pl.DataFrame:
    """The horizontal rules of the curves chart: the target and, when given, the context-blind floor."""
    refs = [(target, f"target {target} bits")] + ([(floor, f"context-blind floor {floor:.3f}")] if floor else [])
    return pl.DataFrame({"mae_bits": [v for v, _ in refs], "label": [label for _, label in refs]})


def calibration_by_position(calibration: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Mean predicted entropy per (model, t) over seeds, and the exact entropy per t."""
    mean = calibration.group_by("model", "t").agg(pl.col("h_model").mean(), pl.col("h_bayes").first())
    return mean, mean.group_by("t").agg(pl.col("h_bayes").first()).sort("t")


def routing_mass(routing: pl.DataFrame) -> pl.DataFrame:
    """Attention mass of the trained models on values, keys and self, per layer and head, mean over seeds."""
    return (
        routing.filter(pl.col("state") == "trained")
        .unpivot(
            index=["layer", "head", "seed"],
            on=["value_mass", "key_mass", "self_mass"],
            variable_name="target",
            value_name="mass",
        )
        .group_by("layer", "head", "target")
        .agg(pl.col("mass").mean())
    )


def ablated_components(abl: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The ablation rows labelled by component ("L0 attn", "L0 head 1"), and the intact model's rows."""
    components = abl.filter(pl.col("target") != "none").with_columns(
        pl.when(pl.col("target") == "head")
        .then(pl.format("L{} head {}", "layer", "head"))
        .otherwise(pl.format("L{} {}", "layer", "target"))
        .alias("component")
    )
    return components, abl.filter(pl.col("target") == "none")
