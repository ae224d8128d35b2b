"""Track B's charts: a frame of :mod:`lab.tracks.B_attention.frames` in, an Altair chart out (encoding only).
Every chart is drawn to the page's column width (:func:`lab.plots.style`); where a frame holds several heads or
metrics the reader picks one (a Vega-Lite parameter bound to an input, no server) or the panels are stacked."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import polars as pl

from lab.plots import distinct, pick, stack, style

HEAD_METRICS = ("entropy_norm", "sink_share", "prev_token", "induction")
HEAD_TITLES = {
    "entropy_norm": "entropy / uniform",
    "sink_share": "first-token share",
    "prev_token": "previous-token score",
    "induction": "induction score",
}
SUMMARIES = ["max over heads", "mean over heads"]  # layer_profile's series: solid, dashed (the captions say so)
_DASHES = [[1, 0], [4, 2]]


def head_grid(
    df: pl.DataFrame, metrics: Sequence[str] = HEAD_METRICS, titles: dict[str, str] | None = None
) -> alt.Chart:
    """A layer x head heatmap of one metric at a time (the metrics ``df`` has), the reader picking which."""
    titles = titles or {}
    present = [m for m in metrics if m in df.columns]
    metric = pick("metric", present, label="score", labels=[titles.get(m, m) for m in present], radio=True)
    return style(
        alt.Chart(df)
        .transform_fold(present, as_=["metric", "score"])
        .add_params(metric)
        .transform_filter("datum.metric == metric")
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=alt.Color("score:Q", title="score", scale=alt.Scale(scheme="viridis")),
            tooltip=["layer:O", "head:O", "metric:N", alt.Tooltip("score:Q", format=".3f")],
        )
        .properties(height=alt.Step(10))
    )


def heads(df: pl.DataFrame) -> alt.Chart:
    """The track's four head scores, titled in words (``heads`` result)."""
    return head_grid(df, titles=HEAD_TITLES)


def layer_profile(df: pl.DataFrame) -> alt.VConcatChart:
    """Max over heads (solid) and mean over heads (dashed) of each metric per layer, one panel per metric
    (:func:`lab.interp.attention.layer_profile`); one legend names both the colour and the dash."""
    legend = alt.Legend(symbolType="stroke", symbolStrokeWidth=2, symbolSize=400)  # colour and dash: one legend
    base = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer"),
            y=alt.Y("value:Q", title=None),
            color=alt.Color("summary:N", scale=alt.Scale(domain=SUMMARIES), title=None, legend=legend),
            strokeDash=alt.StrokeDash(
                "summary:N", scale=alt.Scale(domain=SUMMARIES, range=_DASHES), title=None, legend=legend
            ),
            tooltip=["layer:Q", "metric:N", "summary:N", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(height=110)
    )
    present = [m for m in HEAD_METRICS if m in set(df["metric"])] + sorted(set(df["metric"]) - set(HEAD_METRICS))
    panels = [base.transform_filter(alt.datum.metric == m).properties(title=HEAD_TITLES.get(m, m)) for m in present]
    return style(stack(*panels))


def patterns(df: pl.DataFrame, column: str = "head_label") -> alt.Chart:
    """An attention heatmap (query down, key across, token labels in position order) of one ``column`` value at a
    time, the reader picking which (the first is shown first)."""
    choices = sorted(distinct(df, column))
    head = pick("pattern", choices, label="head")
    n = int(df["query"].max()) + 1 if df.height else 1
    return style(
        alt.Chart(df)
        .add_params(head)
        .transform_filter(f"datum.{column} == pattern")
        .mark_rect()
        .encode(
            x=alt.X(
                "k_label:N",
                title="key (attended-to token)",
                sort=alt.EncodingSortField("key", op="min"),
                axis=alt.Axis(labelAngle=-90, labelOverlap="greedy", labelLimit=90),
            ),
            y=alt.Y(
                "q_label:N",
                title="query token",
                sort=alt.EncodingSortField("query", op="min"),
                axis=alt.Axis(labelOverlap="greedy", labelLimit=90),
            ),
            color=alt.Color("weight:Q", title="weight", scale=alt.Scale(scheme="blues", domain=[0, 1])),
            tooltip=[f"{column}:N", "q_label:N", "k_label:N", alt.Tooltip("weight:Q", format=".3f")],
        )
        .properties(height=alt.Step(14) if n <= 30 else 420)
    )


def _shift_map(df: pl.DataFrame, field: str, title: str, legend: str, scale: alt.Scale) -> alt.Chart:
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=alt.Color(f"{field}:Q", title=legend, scale=scale),
            tooltip=[
                "layer:O",
                "head:O",
                alt.Tooltip("js_bits:Q", format=".4f"),
                alt.Tooltip("entropy_change:Q", format="+.4f"),
            ],
        )
        .properties(title=title, height=alt.Step(8))
    )


def head_shift(df: pl.DataFrame) -> alt.VConcatChart:
    """Fine-tuning's effect per head, stacked: JS divergence of patterns (top) and entropy change (bottom)."""
    df = df.sort("layer", "head")
    lim = float(df["entropy_change"].abs().max() or 1e-9)  # a colour domain symmetric about zero
    js = _shift_map(df, "js_bits", "JS divergence base vs fine-tuned", "JS (bits)", alt.Scale(scheme="oranges"))
    ent = _shift_map(
        df,
        "entropy_change",
        "entropy change (tuned − base)",
        "Δ entropy (nats)",
        alt.Scale(scheme="redblue", domain=[-lim, lim], reverse=True),
    )
    return style(stack(js, ent).resolve_scale(color="independent"))


def memory(df: pl.DataFrame) -> alt.Chart:
    """Estimated vs measured memory of capturing every layer's patterns in memory, against length (log-log); only
    the in-memory rows are drawn, so only they are kept."""
    df = df.filter(pl.col("mode") == "in memory")
    return style(
        alt.Chart(df)
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
        .properties(height=260)
    )
