"""Track B's charts: a frame of :mod:`lab.tracks.B_attention.frames` in, an Altair chart out (encoding only)."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import polars as pl

HEAD_METRICS = ("entropy_norm", "sink_share", "prev_token", "induction")
HEAD_TITLES = {
    "entropy_norm": "entropy / uniform",
    "sink_share": "first-token share",
    "prev_token": "previous-token score",
    "induction": "induction score",
}


def head_grid(
    df: pl.DataFrame, metrics: Sequence[str] = HEAD_METRICS, titles: dict[str, str] | None = None
) -> alt.HConcatChart:
    """One layer x head heatmap per metric (the metrics ``df`` has)."""
    titles = titles or {}
    panels = []
    for m in metrics:
        if m not in df.columns:
            continue
        panels.append(
            alt.Chart(df)
            .mark_rect()
            .encode(
                x=alt.X("head:O", title="head"),
                y=alt.Y("layer:O", title="layer", sort="descending"),
                color=alt.Color(f"{m}:Q", title=None, scale=alt.Scale(scheme="viridis")),
                tooltip=["layer:O", "head:O", alt.Tooltip(f"{m}:Q", format=".3f")],
            )
            .properties(title=titles.get(m, m), width=130, height=alt.Step(9))
        )
    return alt.hconcat(*panels).resolve_scale(color="independent")


def heads(df: pl.DataFrame) -> alt.HConcatChart:
    """The track's four head scores, titled in words (``heads`` result)."""
    return head_grid(df, titles=HEAD_TITLES)


def layer_profile(df: pl.DataFrame) -> alt.FacetChart:
    """Mean over heads (line) and max over heads (dashed) of each metric, per layer
    (:func:`lab.interp.attention.layer_profile`)."""
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer"),
            y=alt.Y("value:Q", title=None),
            color=alt.Color("summary:N", title=None),
            strokeDash=alt.StrokeDash("summary:N", legend=None),
            tooltip=["layer:Q", "metric:N", "summary:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=260, height=140)
        .facet(facet=alt.Facet("metric:N", title=None), columns=2)
    )


def patterns(df: pl.DataFrame, column: str = "head_label") -> alt.FacetChart:
    """Attention heatmaps (query down, key across, token labels in position order), one panel per ``column``."""
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X(
                "k_label:N",
                title="key (attended-to token)",
                sort=alt.EncodingSortField("key", op="min"),
                axis=alt.Axis(labelAngle=-60),
            ),
            y=alt.Y("q_label:N", title="query token", sort=alt.EncodingSortField("query", op="min")),
            color=alt.Color("weight:Q", title="weight", scale=alt.Scale(scheme="blues", domain=[0, 1])),
            tooltip=["q_label:N", "k_label:N", alt.Tooltip("weight:Q", format=".3f")],
        )
        .properties(width=alt.Step(14), height=alt.Step(14))
        .facet(facet=alt.Facet(f"{column}:N", title=None), columns=2)
    )


def head_shift(df: pl.DataFrame) -> alt.HConcatChart:
    """Fine-tuning's effect per head: JS divergence of patterns and entropy change (layer x head)."""
    js = (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("head:O"),
            y=alt.Y("layer:O", sort="descending"),
            color=alt.Color("js_bits:Q", title="JS (bits)", scale=alt.Scale(scheme="oranges")),
            tooltip=[
                "layer:O",
                "head:O",
                alt.Tooltip("js_bits:Q", format=".4f"),
                alt.Tooltip("entropy_change:Q", format="+.4f"),
            ],
        )
        .properties(title="JS divergence base vs fine-tuned", width=130, height=alt.Step(9))
    )
    lim = float(df["entropy_change"].abs().max() or 1e-9)  # a colour domain symmetric about zero
    ent = (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("head:O"),
            y=alt.Y("layer:O", sort="descending"),
            color=alt.Color(
                "entropy_change:Q",
                title="Δ entropy (nats)",
                scale=alt.Scale(scheme="redblue", domain=[-lim, lim], reverse=True),
            ),
            tooltip=["layer:O", "head:O", alt.Tooltip("entropy_change:Q", format="+.4f")],
        )
        .properties(title="entropy change (tuned − base)", width=130, height=alt.Step(9))
    )
    return alt.hconcat(js, ent).resolve_scale(color="independent")


def memory(df: pl.DataFrame) -> alt.Chart:
    """Estimated vs measured memory of capturing every layer's patterns in memory, against length (log-log)."""
    return (
        alt.Chart(df)
        .transform_filter(alt.datum.mode == "in memory")
        .transform_fold(
            ["estimate_mib", "captured_mib", "peak_rss_delta_mib"],
            as_=["quantity", "MiB"],
        )
        .mark_line(point=True)
        .encode(
            x=alt.X("tokens:Q", scale=alt.Scale(type="log", base=2), title="tokens"),
            y=alt.Y("MiB:Q", scale=alt.Scale(type="log"), title="MiB"),
            color=alt.Color("quantity:N", title=None),
            tooltip=["tokens:Q", "quantity:N", alt.Tooltip("MiB:Q", format=",.1f")],
        )
        .properties(width="container", height=260)
    )
