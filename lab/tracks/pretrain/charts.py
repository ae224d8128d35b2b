"""The pretraining track's charts: each takes the frame it draws (as read back from its Parquet) and only encodes;
every chart is drawn to the page's column width (:func:`lab.plots.style`)."""

from __future__ import annotations

import altair as alt
import polars as pl

from lab.plots import pick, stack, style
from lab.tracks.pretrain.config import NANOGPT_CPU_VAL_LOSS


def plot_loss(df: pl.DataFrame, reference: float | None = NANOGPT_CPU_VAL_LOSS) -> alt.LayerChart:
    """``loss``: training loss per batch (thin) with train/val evaluation points; optional nanoGPT reference line."""
    base = alt.Chart(df).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("loss:Q", title="cross-entropy (nats/char)", scale=alt.Scale(zero=False)),
        color=alt.Color("series:N", title=None, sort=["train (batch)", "train (eval)", "val (eval)"]),
    )
    batch = base.transform_filter(alt.datum.series == "train (batch)").mark_line(opacity=0.35, strokeWidth=1)
    tooltip = [alt.Tooltip("step:Q"), alt.Tooltip("series:N"), alt.Tooltip("loss:Q", format=".3f")]
    ev = (
        base.transform_filter(alt.datum.series != "train (batch)")
        .mark_line(point=True, strokeWidth=2)
        .encode(tooltip=tooltip)
    )
    layers = [batch, ev]
    if reference is not None:
        ref = pl.DataFrame({"loss": [reference], "label": [f"nanoGPT CPU result ({reference})"]})
        rule = alt.Chart(ref).encode(y="loss:Q")
        layers += [
            rule.mark_rule(strokeDash=[4, 4], color="gray"),
            rule.mark_text(align="right", dy=-7, color="gray").encode(x=alt.value("width"), text="label:N"),
        ]
    return style(alt.layer(*layers).properties(height=300))


def plot_log(df: pl.DataFrame) -> alt.VConcatChart:
    """``log``: learning rate, gradient norm (before clipping) and throughput per step, stacked."""
    base = alt.Chart(df).encode(x=alt.X("step:Q", title="step")).properties(height=120)
    return style(
        stack(
            base.mark_line().encode(y=alt.Y("lr:Q", title="learning rate", axis=alt.Axis(format=".0e"))),
            base.mark_line(strokeWidth=1).encode(y=alt.Y("grad_norm:Q", title="grad norm (pre-clip)")),
            base.mark_line(strokeWidth=1, opacity=0.6).encode(y=alt.Y("tokens_per_s:Q", title="tokens / s")),
        )
    )


def plot_ablation(df: pl.DataFrame) -> alt.Chart:
    """``ablation``: loss over training for each position-embedding variant; the reader picks the split
    (validation first), so every row of the frame can be drawn."""
    split = pick("split", ["val", "train"], label="loss on", labels=["validation", "training"], radio=True)
    return style(
        alt.Chart(df)
        .add_params(split)
        .transform_filter("datum.split == split")
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("loss:Q", title="loss (nats/char)", scale=alt.Scale(zero=False)),
            color=alt.Color("pos_emb:N", title="position embedding"),
            tooltip=["pos_emb:N", "split:N", "step:Q", alt.Tooltip("loss:Q", format=".3f")],
        )
        .properties(height=260)
    )
