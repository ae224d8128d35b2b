"""Track E's charts: each takes a frame as written (or a view from ``frames``) and only encodes it. Every chart is
drawn to the page's column width (:func:`lab.plots.style`): panels are stacked, never side by side."""

from __future__ import annotations

import altair as alt
import polars as pl

from lab.plots import distinct, pick, stack, style

_SHARE_OF_TRAINING = dict(title="share of training", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1]))

_METRIC_TITLES = {
    "feature_jaccard": "feature overlap with final (Jaccard)",
    "feature_jaccard_previous": "feature overlap with previous checkpoint",
    "edge_correlation": "edge-weight correlation with final",
    "error_share": "error-node share of influence",
    "target_from_features": "direct attribution from features to target logit",
    "target_prob": "probability of the target token",
}


def plot_checkpoints(df: pl.DataFrame) -> alt.VConcatChart:
    """Held-out accuracy and validation loss per constraint type across the checkpoints (``checkpoints``)."""
    base = alt.Chart(df).encode(
        x=alt.X("fraction:Q", **_SHARE_OF_TRAINING), color=alt.Color("constraint_type:N", title="constraint")
    )
    acc = (
        base.mark_line(point=True)
        .encode(
            y=alt.Y("accuracy:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            tooltip=[
                "constraint_type:N",
                "step:Q",
                alt.Tooltip("accuracy:Q", format=".0%"),
                "correct:Q",
                "n:Q",
                alt.Tooltip("mean_margin:Q", format=".2f"),
            ],
        )
        .properties(height=180)
    )
    loss = (
        base.mark_line(point=True)
        .encode(
            y=alt.Y("val_loss:Q", title="validation loss (nats/token)", scale=alt.Scale(zero=False)),
            tooltip=["constraint_type:N", "step:Q", alt.Tooltip("val_loss:Q", format=".3f")],
        )
        .properties(height=180)
    )
    return style(stack(acc, loss))


def plot_loss(df: pl.DataFrame) -> alt.Chart:
    """Training loss per step (``loss``)."""
    return style(
        alt.Chart(df)
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("loss:Q", title="training loss (nats/token)", scale=alt.Scale(zero=False)),
            tooltip=["step:Q", alt.Tooltip("loss:Q", format=".3f"), alt.Tooltip("lr:Q", format=".1e")],
        )
        .properties(height=200)
    )


def plot_transcoders(df: pl.DataFrame) -> alt.VConcatChart:
    """Held-out FVU and the share of never-active features per layer (``transcoders``)."""
    base = alt.Chart(df).encode(x=alt.X("layer:O", title="layer"))
    f = (
        base.mark_bar()
        .encode(
            y=alt.Y("fvu:Q", title="held-out FVU", scale=alt.Scale(domain=[0, 1])),
            tooltip=[
                "layer:O",
                alt.Tooltip("fvu:Q", format=".3f"),
                alt.Tooltip("l0:Q", format=".1f"),
                alt.Tooltip("dead_share:Q", format=".1%"),
            ],
        )
        .properties(height=160)
    )
    d = (
        base.mark_bar(color="#999")
        .encode(
            y=alt.Y("dead_share:Q", title="never-active features", axis=alt.Axis(format="%")),
            tooltip=["layer:O", alt.Tooltip("dead_share:Q", format=".1%")],
        )
        .properties(height=100)
    )
    return style(stack(f, d))


def plot_circuit_stats(df: pl.DataFrame) -> alt.VConcatChart:
    """Each circuit metric's mean (95 % bootstrap interval) per constraint type across checkpoints
    (``circuit_stats``), one panel per metric."""
    charts = []
    # NaN is not JSON: there is no overlap "with the previous checkpoint" at the base model
    df = df.filter(pl.col("mean").is_not_nan())
    for m, title in _METRIC_TITLES.items():
        base = alt.Chart(df.filter(pl.col("metric") == m)).encode(
            x=alt.X("fraction:Q", **_SHARE_OF_TRAINING), color=alt.Color("constraint_type:N", title="prompts")
        )
        line = base.mark_line(point=True).encode(
            y=alt.Y("mean:Q", title=title, scale=alt.Scale(zero=False)),
            tooltip=[
                "constraint_type:N",
                "checkpoint:Q",
                alt.Tooltip("mean:Q", format=".3f"),
                alt.Tooltip("lo:Q", format=".3f"),
                alt.Tooltip("hi:Q", format=".3f"),
                "n:Q",
            ],
        )
        band = base.mark_errorbar().encode(y=alt.Y("lo:Q", title=title), y2="hi:Q")
        charts.append((line + band).properties(height=130))
    return style(stack(*charts))


def plot_graph(drawing: pl.DataFrame) -> alt.LayerChart:
    """One prompt's pruned attribution graph (``frames.graph_drawing``) at one checkpoint, the reader picking which
    (the base model first), drawn offline: token position across, layer up (0 = token embeddings, top = the target
    logit); features sized by influence on the target, edges red when positive and blue when negative."""
    fractions = sorted(distinct(drawing, "fraction"))
    checkpoint = pick(
        "graph_checkpoint", fractions, label="share of training", labels=[f"{f:.0%}" for f in fractions], radio=True
    )
    base = alt.Chart(drawing).transform_filter("datum.fraction == graph_checkpoint")
    e = (
        base.transform_filter("datum.kind == 'edge'")
        .mark_rule(opacity=0.35)
        .encode(
            x=alt.X("pos:Q", title="token position"),
            y=alt.Y("layer:Q", title="layer (0 = embeddings)"),
            x2="pos2:Q",
            y2="layer2:Q",
            color=alt.condition("datum.weight > 0", alt.value("#d62728"), alt.value("#1f77b4")),
            strokeWidth=alt.StrokeWidth("weight:Q", legend=None, scale=alt.Scale(type="sqrt", range=[0.3, 3])),
        )
    )
    n = (
        base.transform_filter("datum.kind != 'edge'")
        .mark_circle(opacity=0.85)
        .encode(
            x="pos:Q",
            y="layer:Q",
            size=alt.Size("influence:Q", legend=None, scale=alt.Scale(range=[15, 250])),
            color=alt.Color("kind:N", title="node", scale=alt.Scale(domain=["token", "feature", "logit"])),
            tooltip=["label:N", "kind:N", "layer:Q", "pos:Q", alt.Tooltip("influence:Q", format=".3f")],
        )
    )
    return style(alt.layer(e, n).add_params(checkpoint).properties(height=320))
