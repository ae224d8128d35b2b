"""Track D's tables: every result frame, and every aggregation its charts and summary need.

Inputs are finished runs (:class:`lab.train.windtunnel.RunResult`), trained models and the frames of
:mod:`lab.interp.windtunnel`; outputs are polars frames. The charts draw these frames as they are.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from lab.interp.windtunnel_claims import CLAIMS, Mechanisms, claim_numbers, claim_verdicts, verdict
from lab.tracks.D_bayes.config import (
    PAPER_CURVE,
    PAPER_EM_SPEEDUP,
    PAPER_HEAD_ABLATION,
    PAPER_HMM,
    PAPER_HMM_LONG,
    PAPER_HMM_MAMBA,
    PAPER_HMM_MODEL,
    PAPER_JLENS_MLP,
    PAPER_KEY_COS,
    PAPER_KEY_COS_MAX,
    PAPER_LSTM_MODEL,
    PAPER_MAE,
    PAPER_MAMBA,
    PAPER_MODEL,
    PAPER_PC1_MIN,
    BayesTrackConfig,
)
from lab.train.em_attention import speedup
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


def lstm_sweep_frame(sweep: list[tuple[float, RunResult]]) -> pl.DataFrame:
    """One row per learning rate of the LSTM's sweep: final MAE, KL, steps, seconds, and which one is the control."""
    best = min((r.log["mae_bits"][-1] for _, r in sweep), default=None)
    return pl.DataFrame(
        [
            {
                "lr": lr,
                "n_params": r.n_params,
                "steps": int(r.log["step"][-1]),
                "mae_bits": r.log["mae_bits"][-1],
                "kl_bits": r.log["kl_bits"][-1],
                "train_s": r.train_time_s,
                "chosen": r.log["mae_bits"][-1] == best,
            }
            for lr, r in sweep
        ]
    )


def paper_table(
    cfg: BayesTrackConfig,
    h: dict[str, Any],
    hmm_log: pl.DataFrame | None,
    hmm_params: int,
    em: pl.DataFrame | None,
) -> pl.DataFrame:
    """The authors' results table row for row, ours beside it (None where we did not run the row)."""
    m = cfg.headline.model
    hmm = hmm_log.row(-1, named=True) if hmm_log is not None else None
    hm = cfg.hmm.model if cfg.hmm else None
    rows = [
        ("Bijection V=20", "Transformer", "entropy MAE, bits", PAPER_MAE["transformer"], PAPER_MODEL, h["mae_mean"],
         f"{m.n_layer}L d{m.d_model}, {h['n_params']:,} params, mean of {len(cfg.seeds)} seeds"),
        ("Bijection V=20", "Mamba", "entropy MAE, bits", PAPER_MAMBA, "Mamba", None, "not run: the lab has no Mamba"),
        ("Bijection V=20", "LSTM", "entropy MAE, bits", PAPER_MAE["lstm"], PAPER_LSTM_MODEL, h["lstm_mae"],
         f"{cfg.lstm.n_layer if cfg.lstm else 0}-layer, {h['lstm_params']:,} params, best of its LR sweep"),
        ("Bijection V=20", "MLP", "entropy MAE, bits", PAPER_MAE["mlp"], "capacity-matched MLP", h["mlp_mae"],
         f"context-blind, {h['mlp_params']:,} params; the authors' later control: {PAPER_JLENS_MLP}"),
        ("HMM filtering K=20", "Transformer", "KL to the posterior, bits", PAPER_HMM, PAPER_HMM_MODEL,
         hmm["kl_bits"] if hmm else None,
         f"{hm.n_layer}L d{hm.d_model}, {hmm_params:,} params" if hm else "not run"),
        ("HMM filtering K=20", "Transformer", "entropy MAE, bits", None, "the README names one metric only",
         hmm["mae_bits"] if hmm else None, "same run"),
        ("HMM filtering K=20", "Mamba", "bits", PAPER_HMM_MAMBA, "Mamba", None, "not run: the lab has no Mamba"),
        ("HMM extrapolated to K=50", "Transformer", "KL to the posterior, bits", PAPER_HMM_LONG, PAPER_HMM_MODEL,
         hmm["long_kl_bits"] if hmm else None, "same run, positions 21-50 never trained"),
        ("EM-like update vs SGD", "one attention head", "speed-up, x", PAPER_EM_SPEEDUP, "8-symbol sticky chain",
         speedup(em) if em is not None else None,
         f"mean over {em.height} seeds" if em is not None else "not run"),
    ]  # fmt: skip
    return pl.DataFrame(
        rows, schema=["setting", "model", "metric", "paper", "paper_model", "ours", "our_model"], orient="row"
    )


# ----------------------------------------------------------------------------- mechanisms


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


def verdicts_frame(seeds: pl.DataFrame, m: Mechanisms, floor: float) -> pl.DataFrame:
    """One row per claim: what the paper says, what we measured (means over seeds) and a verdict by a fixed rule.

    Args:
        seeds: :func:`seeds_frame` (the transformer seeds and the MLP control are read from it).
        m: The mechanistic measurements.
        floor: The analytic entropy MAE of a context-blind guess (bits).
    """
    h = headline(seeds)
    n = claim_numbers(m)
    v = claim_verdicts(n, floor, key_cos_max=PAPER_KEY_COS_MAX, pc1_min=PAPER_PC1_MIN)
    rows = [
        (
            "Transformer matches the Bayes posterior, entropy MAE",
            f"{PAPER_MAE['transformer']} bits; {PAPER_MODEL}",
            f"{h['mae_mean']:.4f} ± {h['mae_std']:.4f} bits; {h['n_params']:,} params",
            verdict(h["mae_max"] <= 0.02, h["mae_mean"] <= 0.05),
        ),
        (
            "MLP without attention fails",
            f"{PAPER_MAE['mlp']} bits",
            f"{h['mlp_mae']:.3f} bits; a context-blind guess scores {floor:.3f}",
            verdict(h["mlp_mae"] > 0.5),
        ),
        (
            CLAIMS["keys"],
            f"{PAPER_KEY_COS[0]} trained vs {PAPER_KEY_COS[1]} at init; checklist < {PAPER_KEY_COS_MAX}",
            f"{n['key_cos']:.3f} trained vs {n['key_cos_init']:.3f} at init",
            v["keys"],
        ),
        (
            CLAIMS["sharpening"],
            "deeper layers focus on the relevant hypotheses",
            f"first → last layer: mass on revealed values {n['value_mass_first']:.2f} → {n['value_mass_last']:.2f}; "
            f"q·k cosine, values minus keys, {n['qk_gap_first']:.2f} → {n['qk_gap_last']:.2f}",
            v["sharpening"],
        ),
        (
            CLAIMS["manifold"],
            f"PC1 > {PAPER_PC1_MIN:.0%} of variance, strongly correlated with entropy",
            f"PC1 {n['pc1_share']:.1%} of variance, |corr| with H_Bayes {n['pc1_abs_corr']:.2f}",
            v["manifold"],
        ),
        (
            CLAIMS["lens"],
            "KL to the posterior falls with depth",
            f"KL {n['lens_kl_first']:.3f} → {n['lens_kl_last']:.4f} bits; "
            f"{'monotone' if n['lens_monotone'] else 'not monotone'} over sublayers",
            v["lens"],
        ),
        (
            CLAIMS["ffn_update"],
            "FFN = update, attention = routing",
            f"lens KL falls {n['lens_drop_attn']:.3f} bits across attention sublayers, {n['lens_drop_ffn']:.3f} across "
            f"FFNs; mean-ablating attention costs {n['abl_attn_mean']:+.3f} bits, an FFN {n['abl_ffn_mean']:+.3f}, "
            "mean over layers",
            v["ffn_update"],
        ),
        (
            CLAIMS["heads"],
            f"each head costs {PAPER_HEAD_ABLATION[0]}–{PAPER_HEAD_ABLATION[1]} bits",
            f"zero-ablating one head costs {n['head_zero_min']:+.3f} to {n['head_zero_max']:+.3f} bits",
            v["heads"],
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
