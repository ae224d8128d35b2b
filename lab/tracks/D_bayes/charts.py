"""Track D's charts: each takes the frame(s) :mod:`lab.tracks.D_bayes.frames` made and only encodes them."""

from __future__ import annotations

import altair as alt
import polars as pl


def curves(lines: pl.DataFrame, refs: pl.DataFrame) -> alt.LayerChart:
    """Entropy MAE (log scale) against training step: our seeds and controls next to the authors' curve.

    Args:
        lines: :func:`~lab.tracks.D_bayes.frames.curve_lines` (the paper's curve has seed -1).
        refs: :func:`~lab.tracks.D_bayes.frames.reference_lines` (mae_bits, label).
    """
    base = alt.Chart(lines).encode(
        x=alt.X("step:Q", title="training step (log scale)", scale=alt.Scale(type="log")),
        y=alt.Y("mae_bits:Q", title="entropy MAE (bits, log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("model:N", title=None),
        detail="run:N",
        tooltip=["run:N", "step:Q", alt.Tooltip("mae_bits:Q", format=".4f"), alt.Tooltip("train_s:Q", format=".0f")],
    )
    ours = base.transform_filter(alt.datum.seed >= 0).mark_line(strokeWidth=1.5, opacity=0.8)
    paper = base.transform_filter(alt.datum.seed < 0).mark_line(point=True, strokeDash=[5, 3])
    rule = alt.Chart(refs).encode(y="mae_bits:Q")
    return alt.layer(
        ours,
        paper,
        rule.mark_rule(strokeDash=[2, 2], color="gray"),
        rule.mark_text(align="left", dx=4, dy=-6, color="gray").encode(x=alt.value(0), text="label:N"),
    ).properties(width="container", height=320)


def calibration(mean: pl.DataFrame, exact: pl.DataFrame) -> alt.LayerChart:
    """Predicted entropy by position against the exact posterior entropy (the paper's calibration plot).

    Args ``mean`` and ``exact``: :func:`~lab.tracks.D_bayes.frames.calibration_by_position`.
    """
    lines = (
        alt.Chart(mean)
        .mark_line(point=True)
        .encode(
            x=alt.X("t:Q", title="pair t (t−1 pairs revealed)"),
            y=alt.Y("h_model:Q", title="entropy (bits)"),
            color=alt.Color("model:N", title=None),
            tooltip=["model:N", "t:Q", alt.Tooltip("h_model:Q", format=".3f"), alt.Tooltip("h_bayes:Q", format=".3f")],
        )
    )
    bayes = alt.Chart(exact).mark_line(strokeDash=[4, 4], color="gray").encode(x="t:Q", y="h_bayes:Q")
    return alt.layer(bayes, lines).properties(width="container", height=280)


def search(df: pl.DataFrame) -> alt.Chart:
    """Final entropy MAE of every search candidate, the headline highlighted."""
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            y=alt.Y("config:N", title=None, sort="x"),
            x=alt.X("mae_bits:Q", title="final entropy MAE (bits)"),
            color=alt.Color("headline:N", title="headline config"),
            tooltip=[
                "config:N",
                alt.Tooltip("mae_bits:Q", format=".4f"),
                alt.Tooltip("train_s:Q", format=".0f"),
                "n_params:Q",
            ],
        )
        .properties(width="container", height=30 * max(3, df.height))
    )


def keys(df: pl.DataFrame) -> alt.Chart:
    """Mean |cos| between layer-0 token keys per head, trained against init, key and value tokens side by side."""
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("head:O", title="layer-0 head"),
            xOffset="state:N",
            y=alt.Y("mean(mean_abs_cos):Q", title="mean |cos| between token keys"),
            color=alt.Color("state:N", title=None),
            column=alt.Column("tokens:N", title=None),
            tooltip=["state:N", "tokens:N", "head:O", alt.Tooltip("mean(mean_abs_cos):Q", format=".3f")],
        )
        .properties(width=220, height=220)
    )


def routing(mass: pl.DataFrame) -> alt.Chart:
    """Stacked attention mass per layer and head (:func:`~lab.tracks.D_bayes.frames.routing_mass`)."""
    return (
        alt.Chart(mass)
        .mark_bar()
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("mass:Q", title="attention from key positions", stack="zero"),
            color=alt.Color("target:N", title=None),
            column=alt.Column("layer:O", title="layer"),
            tooltip=["layer:O", "head:O", "target:N", alt.Tooltip("mass:Q", format=".3f")],
        )
        .properties(width=160, height=200)
    )


def pca(points: pl.DataFrame) -> alt.Chart:
    """Final states on their first two principal components, coloured by the exact posterior entropy."""
    return (
        alt.Chart(points)
        .mark_circle(size=14, opacity=0.6)
        .encode(
            x=alt.X("pc1:Q", title="PC1"),
            y=alt.Y("pc2:Q", title="PC2"),
            color=alt.Color("h_bayes:Q", title="H_Bayes (bits)", scale=alt.Scale(scheme="viridis")),
            tooltip=["t:Q", alt.Tooltip("h_bayes:Q", format=".2f"), alt.Tooltip("h_model:Q", format=".2f")],
        )
        .properties(width="container", height=300)
    )


def lens(df: pl.DataFrame) -> alt.Chart:
    """Logit-lens KL to the posterior after each sublayer, one line per seed, sublayers in stage order."""
    labels = df.sort("stage")["label"].unique(maintain_order=True).to_list()
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("label:N", title="residual stream after", sort=labels),
            y=alt.Y(
                "kl_bits:Q", title="KL(posterior ‖ logit lens), bits", scale=alt.Scale(type="symlog", constant=0.01)
            ),
            color=alt.Color("seed:N", title="seed"),
            tooltip=[
                "label:N",
                "seed:N",
                alt.Tooltip("kl_bits:Q", format=".4f"),
                alt.Tooltip("mae_bits:Q", format=".4f"),
            ],
        )
        .properties(width="container", height=260)
    )


def ablations(components: pl.DataFrame, intact: pl.DataFrame) -> alt.LayerChart:
    """Entropy MAE (log scale) with each component ablated; the gray rule is the intact model.

    Args ``components`` and ``intact``: :func:`~lab.tracks.D_bayes.frames.ablated_components`.
    """
    bars = (
        alt.Chart(components)
        .mark_bar()
        .encode(
            y=alt.Y("component:N", title=None),
            x=alt.X(
                "mean(mae_bits):Q",
                title="entropy MAE with the component ablated (bits, log scale)",
                scale=alt.Scale(type="log"),
            ),
            color=alt.Color("method:N", title="ablation"),
            yOffset="method:N",
            tooltip=[
                "component:N",
                "method:N",
                alt.Tooltip("mean(mae_bits):Q", format=".4f"),
                alt.Tooltip("mean(delta_mae_bits):Q", format="+.4f"),
            ],
        )
    )
    rule = (
        alt.Chart(intact)
        .mark_rule(color="gray", strokeDash=[4, 3])
        .encode(x="mean(mae_bits):Q", tooltip=[alt.Tooltip("mean(mae_bits):Q", title="intact model", format=".4f")])
    )
    return alt.layer(bars, rule).properties(width="container", height=26 * components["component"].n_unique() + 40)
