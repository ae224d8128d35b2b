"""Track D's charts: each takes the frame(s) :mod:`lab.tracks.D_bayes.frames` made and only encodes them.
Every chart is drawn to the page's column width (:func:`lab.plots.style`): panels are stacked, never side by side."""

from __future__ import annotations

import altair as alt
import polars as pl

from lab.plots import distinct, pick, stack, style

_FADED = 0.12  # opacity of the runs the reader did not pick


def curves(lines: pl.DataFrame, refs: pl.DataFrame) -> alt.LayerChart:
    """Entropy MAE (log scale) against training step: our seeds and controls next to the authors' curve; the
    reader can pick one run (a model and seed) to bring forward.

    Args:
        lines: :func:`~lab.tracks.D_bayes.frames.curve_lines` (the paper's curve has seed -1).
        refs: :func:`~lab.tracks.D_bayes.frames.reference_lines` (mae_bits, label).
    """
    runs = sorted(distinct(lines, "run"))
    run = pick("curve_run", ["all", *runs], label="run", labels=["all runs", *runs])
    base = alt.Chart(lines).encode(
        x=alt.X("step:Q", title="training step (log scale)", scale=alt.Scale(type="log")),
        y=alt.Y("mae_bits:Q", title="entropy MAE (bits, log scale)", scale=alt.Scale(type="log")),
        color=alt.Color("model:N", title=None, legend=alt.Legend(columns=1)),
        detail="run:N",
        opacity=alt.condition("curve_run == 'all' || datum.run == curve_run", alt.value(0.9), alt.value(_FADED)),
        tooltip=["run:N", "step:Q", alt.Tooltip("mae_bits:Q", format=".4f"), alt.Tooltip("train_s:Q", format=".0f")],
    )
    ours = base.transform_filter(alt.datum.seed >= 0).mark_line(strokeWidth=1.5)
    paper = base.transform_filter(alt.datum.seed < 0).mark_line(point=True, strokeDash=[5, 3])
    rule = alt.Chart(refs).encode(y="mae_bits:Q")
    return style(
        alt.layer(
            ours,
            paper,
            rule.mark_rule(strokeDash=[2, 2], color="gray"),
            rule.mark_text(align="right", dy=-7, color="gray").encode(x=alt.value("width"), text="label:N"),
        )
        .add_params(run)
        .properties(height=320)
    )


def calibration(mean: pl.DataFrame, exact: pl.DataFrame) -> alt.LayerChart:
    """Predicted entropy by position against the exact posterior entropy (the paper's calibration plot).

    Args ``mean`` and ``exact``: :func:`~lab.tracks.D_bayes.frames.calibration_by_position`.
    """
    mean = mean.sort("model", "t")  # the aggregate's row order is not fixed: the spec must be
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
    return style(alt.layer(bayes, lines).properties(height=280))


def search(df: pl.DataFrame) -> alt.Chart:
    """Final entropy MAE of every search candidate, the headline highlighted."""
    return style(
        alt.Chart(df)
        .mark_bar()
        .encode(
            y=alt.Y("config:N", title=None, sort="x", axis=alt.Axis(labelLimit=200)),
            x=alt.X("mae_bits:Q", title="final entropy MAE (bits)"),
            color=alt.Color("headline:N", title="headline config"),
            tooltip=[
                "config:N",
                alt.Tooltip("mae_bits:Q", format=".4f"),
                alt.Tooltip("train_s:Q", format=".0f"),
                "n_params:Q",
            ],
        )
        .properties(height=30 * max(3, df.height))
    )


def keys(df: pl.DataFrame) -> alt.VConcatChart:
    """Mean |cos| between layer-0 token keys per head, trained against init: key tokens (top), value tokens
    (bottom)."""
    df = df.sort("tokens", "state", "head", "seed")
    base = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("head:O", title="layer-0 head", axis=alt.Axis(labelAngle=0)),
            xOffset="state:N",
            y=alt.Y("mean(mean_abs_cos):Q", title="mean |cos|"),
            color=alt.Color("state:N", title=None),
            tooltip=["state:N", "tokens:N", "head:O", alt.Tooltip("mean(mean_abs_cos):Q", format=".3f")],
        )
        .properties(height=170)
    )
    kinds = sorted(distinct(df, "tokens"))
    return style(stack(*[base.transform_filter(alt.datum.tokens == k).properties(title=k) for k in kinds]))


def routing(mass: pl.DataFrame) -> alt.VConcatChart:
    """Stacked attention mass per head, one panel per layer (:func:`~lab.tracks.D_bayes.frames.routing_mass`)."""
    mass = mass.sort("layer", "head", "target")  # the aggregate's row order is not fixed: the spec must be
    base = (
        alt.Chart(mass)
        .mark_bar()
        .encode(
            x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("mass:Q", title="attention from key positions", stack="zero"),
            color=alt.Color("target:N", title=None),
            tooltip=["layer:O", "head:O", "target:N", alt.Tooltip("mass:Q", format=".3f")],
        )
        .properties(height=160)
    )
    layers = sorted(distinct(mass, "layer"))
    return style(stack(*[base.transform_filter(alt.datum.layer == n).properties(title=f"layer {n}") for n in layers]))


def pca(points: pl.DataFrame) -> alt.Chart:
    """Final states on their first two principal components, coloured by the exact posterior entropy."""
    return style(
        alt.Chart(points)
        .mark_circle(size=14, opacity=0.6)
        .encode(
            x=alt.X("pc1:Q", title="PC1"),
            y=alt.Y("pc2:Q", title="PC2"),
            color=alt.Color("h_bayes:Q", title="H_Bayes (bits)", scale=alt.Scale(scheme="viridis")),
            tooltip=["t:Q", alt.Tooltip("h_bayes:Q", format=".2f"), alt.Tooltip("h_model:Q", format=".2f")],
        )
        .properties(height=300)
    )


def lens(df: pl.DataFrame) -> alt.Chart:
    """Logit-lens KL to the posterior after each sublayer, one line per seed, sublayers in stage order."""
    labels = df.sort("stage")["label"].unique(maintain_order=True).to_list()
    return style(
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("label:N", title="residual stream after", sort=labels, axis=alt.Axis(labelAngle=-45)),
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
        .properties(height=260)
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
    return style(alt.layer(bars, rule).properties(height=26 * components["component"].n_unique() + 40))


def scale(df: pl.DataFrame) -> alt.LayerChart:
    """The scale ladder: final entropy MAE of every run against its parameter count (both log scales), one colour
    per depth, the mean over seeds as a line."""
    base = alt.Chart(df).encode(
        x=alt.X("n_params:Q", title="parameters (log scale)", scale=alt.Scale(type="log")),
        y=alt.Y("mae_bits:Q", title="final entropy MAE (bits, log scale)", scale=alt.Scale(type="log")),
    )
    points = base.mark_point(filled=True, size=60).encode(
        color=alt.Color("n_layer:O", title="layers"),
        tooltip=["size:N", "seed:Q", "n_params:Q", "steps:Q", alt.Tooltip("mae_bits:Q", format=".4f")],
    )
    mean = base.mark_line(color="gray", strokeDash=[4, 3]).encode(y="mean(mae_bits):Q")
    return style(alt.layer(mean, points).properties(height=260))


def hmm_positions(df: pl.DataFrame) -> alt.LayerChart:
    """KL to the exact filtering posterior at each observation position, the training length marked."""
    trained = int(df.filter(pl.col("trained_length"))["t"].max())
    line = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("t:Q", title="observation position t"),
            y=alt.Y("kl_bits:Q", title="KL to the exact posterior (bits, log scale)", scale=alt.Scale(type="log")),
            color=alt.Color("trained_length:N", title="position trained", scale=alt.Scale(domain=[True, False])),
            tooltip=["t:Q", alt.Tooltip("kl_bits:Q", format=".5f"), alt.Tooltip("mae_bits:Q", format=".5f")],
        )
    )
    rule = alt.Chart(pl.DataFrame({"t": [trained + 0.5]})).mark_rule(strokeDash=[2, 2], color="gray").encode(x="t:Q")
    return style(alt.layer(line, rule).properties(height=260))


def paper2(df: pl.DataFrame) -> alt.Chart:
    """Paper II: training loss of the single head under SGD and the EM-like schedule, one line per seed."""
    return style(
        alt.Chart(df)
        .mark_line(strokeWidth=1.2)
        .encode(
            x=alt.X("step:Q", title="gradient step"),
            y=alt.Y("loss:Q", title="training loss (nats)", scale=alt.Scale(zero=False)),
            color=alt.Color("method:N", title=None),
            detail="seed:N",
            tooltip=["method:N", "seed:Q", "step:Q", alt.Tooltip("loss:Q", format=".4f")],
        )
        .properties(height=260)
    )
