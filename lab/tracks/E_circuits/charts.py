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


_PARTS = {  # accounting columns -> how the chart names them
    "selected_features_share": "selected features",
    "unselected_features_share": "features the graph leaves out",
    "errors_share": "error nodes",
    "tokens_share": "token embeddings",
    "b_dec_share": "transcoder b_dec (no node)",
    "bos_mlp_share": "BOS MLP output (no node)",
}


def plot_accounting(df: pl.DataFrame) -> alt.Chart:
    """Where the followed logit comes from (``accounting``): each part's mean share of the demeaned logit over the
    held-out constraint prompts' graphs, per checkpoint; the shares add up to 1 (the residual, float rounding, is
    left out)."""
    return style(
        alt.Chart(df)
        .transform_filter("datum.constraint_type != 'seed'")
        .transform_fold(list(_PARTS), as_=["part", "share"])
        .transform_calculate(part=" : ".join(f"datum.part == '{k}' ? '{v}'" for k, v in _PARTS.items()) + " : ''")
        .mark_line(point=True)
        .encode(
            x=alt.X("fraction:Q", **_SHARE_OF_TRAINING),
            y=alt.Y("mean(share):Q", title="share of the demeaned logit", axis=alt.Axis(format="%")),
            color=alt.Color("part:N", title="from", sort=list(_PARTS.values())),
            tooltip=["part:N", alt.Tooltip("fraction:Q", format=".0%"), alt.Tooltip("mean(share):Q", format=".1%")],
        )
        .properties(height=240)
    )


def plot_interventions(df: pl.DataFrame) -> alt.LayerChart:
    """Each checked feature's predicted direct effect on the followed logit (the graph's edge times the change
    of its activation) against the change measured through the whole model (``interventions``), one checkpoint at
    a time (the reader picks); the diagonal is "measured = predicted"."""
    fractions = sorted(distinct(df, "fraction"))
    checkpoint = pick(
        "check_checkpoint", fractions, label="share of training", labels=[f"{f:.0%}" for f in fractions], radio=True
    )
    base = alt.Chart(df).transform_filter("datum.fraction == check_checkpoint")
    lo = float(min(df["predicted"].min(), df["measured"].min()))
    hi = float(max(df["predicted"].max(), df["measured"].max()))
    diagonal = (
        alt.Chart(pl.DataFrame({"x": [lo, hi]})).mark_line(color="#999", strokeDash=[4, 4]).encode(x="x:Q", y="x:Q")
    )
    points = base.mark_point(filled=True, opacity=0.8).encode(
        x=alt.X("predicted:Q", title="predicted change of the logit (graph)", scale=alt.Scale(domain=[lo, hi])),
        y=alt.Y("measured:Q", title="measured change (whole model)", scale=alt.Scale(domain=[lo, hi])),
        color=alt.Color("scale:N", title="activation set to (x itself)"),
        shape=alt.Shape("prompt_id:N", title="prompt"),
        tooltip=[
            "prompt_id:N",
            "key:N",
            "scale:Q",
            alt.Tooltip("predicted:Q", format=".3f"),
            alt.Tooltip("measured:Q", format=".3f"),
            alt.Tooltip("measured_direct:Q", format=".3f"),
        ],
    )
    return style(alt.layer(diagonal, points).add_params(checkpoint).properties(height=300))


def plot_adapted(df: pl.DataFrame) -> alt.LayerChart:
    """Per prompt at the final checkpoint: the error-node share of the influence on the followed logit with the
    base model's transcoders (across) and with transcoders adapted to the fine-tuned model (up) (``adapted``);
    below the diagonal the adapted ones explain more."""
    hi = float(max(df["error_share_base_tc"].max(), df["error_share_adapted_tc"].max(), 0.01))
    diagonal = (
        alt.Chart(pl.DataFrame({"x": [0.0, hi]})).mark_line(color="#999", strokeDash=[4, 4]).encode(x="x:Q", y="x:Q")
    )
    points = (
        alt.Chart(df)
        .mark_point(filled=True, size=60)
        .encode(
            x=alt.X("error_share_base_tc:Q", title="error share, base-model transcoders", axis=alt.Axis(format="%")),
            y=alt.Y("error_share_adapted_tc:Q", title="error share, adapted transcoders", axis=alt.Axis(format="%")),
            color=alt.Color("constraint_type:N", title="prompts"),
            tooltip=[
                "prompt_id:N",
                alt.Tooltip("error_share_base_tc:Q", format=".1%"),
                alt.Tooltip("error_share_adapted_tc:Q", format=".1%"),
                alt.Tooltip("feature_jaccard:Q", format=".2f"),
            ],
        )
    )
    return style(alt.layer(diagonal, points).properties(height=280))
