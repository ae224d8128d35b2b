"""Track A's charts: each takes the frame it draws and only encodes. Where a chart draws an aggregate of a
result's Parquet, the caller passes ``frames.<aggregate>(frame)`` (see ``run.CHARTS``). Every chart is drawn to
the page's column width (:func:`lab.plots.style`): panels are stacked, never side by side."""

from __future__ import annotations

import altair as alt
import polars as pl

from lab.plots import distinct, pick, stack, style

_FADED = 0.12  # opacity of the runs the reader did not pick


def plot_anatomy(df: pl.DataFrame) -> alt.VConcatChart:
    """``anatomy``: train loss per step and eval loss at intervals (lowest eval marked), grad norm before
    clipping, LR."""
    base = alt.Chart(df).encode(x=alt.X("step:Q", title="step"))
    train = base.mark_line(strokeWidth=1.5).encode(
        y=alt.Y("train_loss:Q", title="loss (nats/token, answer tokens)", scale=alt.Scale(type="log")),
        color=alt.datum("train (batch)"),
    )
    ev = (
        base.transform_filter("isValid(datum.eval_loss)")
        .mark_line(point=True, strokeWidth=2)
        .encode(
            y="eval_loss:Q",
            color=alt.datum("eval (held-out)"),
            tooltip=["step:Q", alt.Tooltip("eval_loss:Q", format=".3f")],
        )
    )
    best = (
        base.transform_filter("isValid(datum.eval_loss)")
        .transform_window(rank="rank()", sort=[alt.SortField("eval_loss")])
        .transform_filter("datum.rank == 1")
        .mark_rule(strokeDash=[4, 4], color="gray")
        .encode(tooltip=[alt.Tooltip("step:Q", title="lowest eval loss at step")])
    )
    loss = alt.layer(train, ev, best).encode(color=alt.Color(title=None)).properties(height=240)
    grad = (
        base.transform_filter("isValid(datum.grad_norm)")
        .mark_line(strokeWidth=1)
        .encode(y=alt.Y("grad_norm:Q", title="grad norm (pre-clip)"))
        .properties(height=110)
    )
    lr = (
        base.transform_filter("isValid(datum.lr)")
        .mark_line()
        .encode(y=alt.Y("lr:Q", title="learning rate", axis=alt.Axis(format=".0e")))
        .properties(height=110)
    )
    return style(stack(loss, grad, lr))


def plot_live_curve(df: pl.DataFrame) -> alt.Chart:
    """``frames.live_curve``: train and eval loss of the run now training (the notebook's live view)."""
    return style(
        alt.Chart(df)
        .mark_line(point=True)
        .encode(x="step:Q", y=alt.Y("loss:Q", scale=alt.Scale(type="log")), color="kind:N")
        .properties(height=220)
    )


def plot_curves(df: pl.DataFrame, color: str, title: str, x: str = "step") -> alt.VConcatChart:
    """``lr_curves`` / ``rank_curves``: train (per step, top) and eval (bottom) loss curves of one sweep, one colour
    per setting; the reader can pick one run to bring forward."""
    runs = distinct(df, "run", by=color)
    run = pick("sweep_run", ["all", *runs], label="run", labels=["all runs", *runs])
    base = (
        alt.Chart(df)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X(f"{x}:Q", title="examples seen" if x == "examples" else "step"),
            y=alt.Y("loss:Q", title="loss (nats/token)", scale=alt.Scale(type="log")),
            color=alt.Color(f"{color}:N", title=title, sort=alt.SortField(color)),
            opacity=alt.condition("sweep_run == 'all' || datum.run == sweep_run", alt.value(1), alt.value(_FADED)),
            tooltip=["run:N", f"{x}:Q", alt.Tooltip("loss:Q", format=".3f")],
        )
        .properties(height=200)
    )
    panels = [
        base.transform_filter(alt.datum.kind == kind).properties(title=f"{kind} loss") for kind in ("train", "eval")
    ]
    return style(stack(*panels).add_params(run))


def plot_batch_lr(df: pl.DataFrame) -> alt.VConcatChart:
    """``batch_lr``: eval loss against examples seen for each batch size, LR scaled with batch (linear rule, top)
    vs kept constant (bottom). Only the eval rows are drawn, so only they are kept."""
    df = df.filter(pl.col("kind") == "eval")
    base = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("examples:Q", title="training examples seen"),
            y=alt.Y("loss:Q", title="eval loss (nats/token)", scale=alt.Scale(type="log")),
            color=alt.Color("batch_size:O", title="batch size"),
            tooltip=["run:N", "examples:Q", alt.Tooltip("lr:Q", format=".1e"), alt.Tooltip("loss:Q", format=".3f")],
        )
        .properties(height=200)
    )
    titles = {"linear": "learning rate scaled with the batch (linear)", "constant": "learning rate constant"}
    return style(stack(*[base.transform_filter(alt.datum.rule == r).properties(title=t) for r, t in titles.items()]))


def plot_outcomes(df: pl.DataFrame, x: str, title: str, log_x: bool = True) -> alt.VConcatChart:
    """``lr_outcomes`` / ``rank_outcomes``: task success (exact, with Wilson 95 % interval), perplexity ratio and
    probe retention against ``x``, stacked."""
    scale = alt.Scale(type="log") if log_x else alt.Scale()
    xe = alt.X(f"{x}:Q", title=title, scale=scale)
    base = alt.Chart(df).encode(x=xe).properties(height=150)
    success = alt.layer(
        base.mark_errorbar().encode(
            y=alt.Y("exact_lo:Q", title="exact task success", scale=alt.Scale(domain=[0, 1])), y2="exact_hi:Q"
        ),
        base.mark_line(point=True).encode(
            y="exact_rate:Q",
            tooltip=["run:N", alt.Tooltip("exact_rate:Q", format=".0%"), alt.Tooltip("format_rate:Q", format=".0%")],
        ),
    )
    ppl = base.mark_line(point=True, color="#d62728").encode(
        y=alt.Y("ppl_ratio:Q", title="perplexity / base", scale=alt.Scale(zero=False)),
        tooltip=["run:N", alt.Tooltip("ppl_ratio:Q", format=".3f")],
    )
    probes = (
        base.transform_calculate(share="datum.probes_retained / datum.probes_n")
        .mark_line(point=True, color="#2ca02c")
        .encode(
            y=alt.Y(
                "share:Q", title="probe answers unchanged", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")
            ),
            tooltip=["run:N", "probes_retained:Q"],
        )
    )
    return style(stack(success, ppl, probes))


def plot_forgetting(df: pl.DataFrame) -> alt.Chart:
    """``frames.forgetting_frame(runs)``: every run's task success against its general-text perplexity ratio
    (forgetting), one colour per experiment."""
    return style(
        alt.Chart(df)
        .mark_point(filled=True, size=80)
        .encode(
            x=alt.X("ppl_ratio:Q", title="general-text perplexity / base model", scale=alt.Scale(type="log")),
            y=alt.Y("exact_rate:Q", title="exact task success", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("experiment:N", title="experiment"),
            shape=alt.Shape("experiment:N"),
            tooltip=[
                "run:N",
                alt.Tooltip("exact_rate:Q", format=".0%"),
                alt.Tooltip("ppl_ratio:Q", format=".3f"),
                "probes_retained:Q",
            ],
        )
        .properties(height=280)
    )


def plot_moments(df: pl.DataFrame) -> alt.VConcatChart:
    """``frames.moments_by_layer(moments)``: sqrt of Adam's second moment by layer and step, A (top) and B."""
    df = df.sort("matrix", "step", "layer")  # the aggregate's row order is not fixed: the spec must be
    base = (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("step:O", title="step"),
            y=alt.Y("layer:O", title="layer", sort="descending"),
            color=alt.Color("v_sqrt_mean:Q", title="mean √v", scale=alt.Scale(type="log", scheme="viridis")),
            tooltip=["step:O", "layer:O", "matrix:N", alt.Tooltip("v_sqrt_mean:Q", format=".2e")],
        )
        .properties(height=alt.Step(9))
    )
    panels = [base.transform_filter(alt.datum.matrix == m).properties(title=f"LoRA matrix {m}") for m in ("A", "B")]
    return style(stack(*panels).resolve_scale(color="shared"))


def plot_moments_by_module(df: pl.DataFrame) -> alt.Chart:
    """``frames.moments_by_module(moments)``: at the last snapshot, mean √v per module type and matrix."""
    df = df.sort("module", "matrix")
    return style(
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("module:N", title="adapted module", axis=alt.Axis(labelAngle=-40)),
            xOffset="matrix:N",
            y=alt.Y("v_sqrt_mean:Q", title="mean √v (gradient scale)"),
            color=alt.Color("matrix:N", title="LoRA matrix"),
            tooltip=[
                "module:N",
                "matrix:N",
                alt.Tooltip("v_sqrt_mean:Q", format=".2e"),
                alt.Tooltip("update_rms:Q", format=".3f"),
            ],
        )
        .properties(height=220)
    )
