"""Track C's charts: a frame of :mod:`lab.tracks.C_probing.frames` in, an Altair chart out (encoding only).
Every chart is drawn to the page's column width (:func:`lab.plots.style`); where a frame holds several readings
(points of the block, layers, depths, prompts) the reader picks one or the panels are stacked."""

from __future__ import annotations

import altair as alt
import polars as pl

from lab.plots import distinct, pick, stack, style

POINTS = {"post": "after the block (resid_post)", "mid": "after attention (resid_mid)", "pre": "before the block"}


def norms(df: pl.DataFrame) -> alt.Chart:
    """Norm of the residual stream per layer, log scale: the median over positions ≥ 1 and the first token on its
    own (from :func:`lab.tracks.C_probing.frames.norms_by_layer`); the reader picks the point in the block
    (``resid_post`` first)."""
    points = [p for p in POINTS if p in set(df["point"])]
    point = pick("point", points, label="stream", labels=[POINTS[p] for p in points], radio=True)
    return style(
        alt.Chart(df)
        .add_params(point)
        .transform_filter("datum.point == point")
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer"),
            y=alt.Y("norm:Q", title="‖residual‖ (L2, median over prompts)", scale=alt.Scale(type="log")),
            color=alt.Color("positions:N", title=None),
            tooltip=["layer:Q", "point:N", "positions:N", alt.Tooltip("norm:Q", format=",.1f")],
        )
        .properties(height=260)
    )


def contribution_profile(df: pl.DataFrame) -> alt.VConcatChart:
    """Per layer: median ‖out‖ of attention vs MLP (top), and median cosine with the stream they are added to
    (bottom) (from :func:`lab.tracks.C_probing.frames.contributions_by_layer`)."""
    base = alt.Chart(df).encode(x=alt.X("layer:Q", title="layer"), color=alt.Color("sublayer:N", title=None))
    norm = base.mark_line(point=True).encode(
        y=alt.Y("norm:Q", title="median ‖output‖", scale=alt.Scale(type="log")),
        tooltip=["layer:Q", "sublayer:N", alt.Tooltip("norm:Q", format=",.2f")],
    )
    cos = base.mark_line(point=True).encode(
        y=alt.Y("cos_stream:Q", title="median cos(output, stream)"),
        tooltip=["layer:Q", "sublayer:N", alt.Tooltip("cos_stream:Q", format=".3f")],
    )
    zero = alt.Chart(pl.DataFrame({"y": [0.0]})).mark_rule(color="gray", strokeDash=[3, 3]).encode(y="y:Q")
    return style(stack(norm.properties(height=180), alt.layer(cos, zero).properties(height=180)))


def _token_axis(title: str | None) -> alt.X:
    return alt.X(
        "token:N",
        sort=alt.EncodingSortField("position", op="min"),
        title=title,
        axis=alt.Axis(labelAngle=-90, labelOverlap="greedy", labelLimit=90),
    )


def contribution_tokens(df: pl.DataFrame) -> alt.Chart:
    """Heatmap of the attention share ‖attn‖ / (‖attn‖ + ‖mlp‖) per layer and token of one prompt (the attention
    rows carry it; only they are kept)."""
    df = df.filter(pl.col("sublayer") == "attention")
    return style(
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=_token_axis(None),
            y=alt.Y("layer:O", sort="descending"),
            color=alt.Color("share:Q", title="attention share", scale=alt.Scale(scheme="purpleorange", domain=[0, 1])),
            tooltip=["layer:O", "token:N", alt.Tooltip("share:Q", format=".2f"), alt.Tooltip("norm:Q", format=",.2f")],
        )
        .properties(height=alt.Step(9))
    )


def logit_lens(df: pl.DataFrame) -> alt.VConcatChart:
    """The logit lens: depth x token coloured by KL to the final distribution (top), and below it the top token
    read at the depth the reader picks, with its probability, for every input token. A frame with a ``prompt``
    column (several prompts) gets a prompt picker too."""
    depth = alt.param(
        name="lens_depth",
        value=int(df["depth"].max()) // 2 if df.height else 0,
        bind=alt.binding_range(
            min=int(df["depth"].min() or 0), max=int(df["depth"].max() or 0), step=1, name="blocks applied "
        ),
    )
    params, where = [depth], "true"
    if "prompt" in df.columns:
        prompts = sorted(distinct(df, "prompt"))
        params.append(pick("lens_prompt", prompts, label="prompt", labels=[f"prompt {p + 1}" for p in prompts]))
        where = "datum.prompt == lens_prompt"
    heat = (
        alt.Chart(df)
        .transform_filter(where)
        .mark_rect()
        .encode(
            x=_token_axis("input token (the lens predicts the next one)"),
            y=alt.Y("depth:O", sort="descending", title="blocks applied", axis=alt.Axis(labelOverlap="greedy")),
            color=alt.Color(
                "kl_to_final:Q",
                title="KL to final (nats)",
                scale=alt.Scale(type="symlog", scheme="viridis", reverse=True),
            ),
            stroke=alt.condition("datum.depth == lens_depth", alt.value("#e45756"), alt.value(None)),
            strokeWidth=alt.condition("datum.depth == lens_depth", alt.value(1.5), alt.value(0)),
            tooltip=[
                "depth:O",
                "token:N",
                "top_token:N",
                alt.Tooltip("top_prob:Q", format=".2f"),
                alt.Tooltip("kl_to_final:Q", format=".2f"),
                "final_token_rank:Q",
            ],
        )
        .properties(height=alt.Step(9))
    )
    read = (
        alt.Chart(df)
        .transform_filter(where)
        .transform_filter("datum.depth == lens_depth")
        .encode(
            y=alt.Y("token:N", sort=alt.EncodingSortField("position", op="min"), title="input token"),
            x=alt.X("top_prob:Q", title="probability of the lens's top token", scale=alt.Scale(domain=[0, 1])),
            tooltip=["token:N", "top_token:N", alt.Tooltip("top_prob:Q", format=".2f"), "final_token_rank:Q"],
        )
    )
    bars = read.mark_bar(opacity=0.5).encode(
        color=alt.Color("matches_final:N", title="same as the final top-1", scale=alt.Scale(domain=[True, False]))
    )
    words = read.mark_text(align="left").encode(x=alt.value(4), text="top_token:N")
    reading = alt.layer(bars, words).properties(height=alt.Step(16), title="top token at the picked depth")
    return style(stack(heat, reading).add_params(*params))


def lens_profile(df: pl.DataFrame) -> alt.VConcatChart:
    """Mean KL to the final distribution (top) and share of positions whose top-1 already matches (bottom), per
    depth."""
    base = alt.Chart(df).encode(x=alt.X("depth:Q", title="blocks applied"))
    kl = base.mark_line(point=True).encode(
        y=alt.Y("kl_to_final:Q", title="mean KL to final (nats)"),
        tooltip=["depth:Q", alt.Tooltip("kl_to_final:Q", format=".3f")],
    )
    top = base.mark_line(point=True, color="#e45756").encode(
        y=alt.Y("top1_agreement:Q", title="top-1 = final top-1", scale=alt.Scale(domain=[0, 1])),
        tooltip=["depth:Q", alt.Tooltip("top1_agreement:Q", format=".2f")],
    )
    return style(stack(kl.properties(height=160), top.properties(height=160)))


def similarity_profile(df: pl.DataFrame) -> alt.Chart:
    """Mean pairwise cosine between positions per layer: all pairs, without the first token, neighbours only."""
    return style(
        alt.Chart(df)
        .transform_fold(
            ["mean_cos_all", "mean_cos_without_first", "mean_cos_adjacent"],
            as_=["pairs", "mean_cos"],
        )
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q"),
            y=alt.Y("mean_cos:Q", title="mean cosine between positions"),
            color=alt.Color("pairs:N", title=None),
            tooltip=["layer:Q", "pairs:N", alt.Tooltip("mean_cos:Q", format=".3f")],
        )
        .properties(height=240)
    )


def similarity_maps(df: pl.DataFrame) -> alt.Chart:
    """Position x position cosine similarity of ``resid_post`` (lower triangle) at one of the frame's layers, the
    reader picking which."""
    layers = sorted(distinct(df, "layer"))
    layer = pick("sim_layer", layers, label="after layer", radio=True)
    return style(
        alt.Chart(df)
        .add_params(layer)
        .transform_filter("datum.layer == sim_layer")
        .mark_rect()
        .encode(
            x=alt.X("j:O", title="position", axis=alt.Axis(labelAngle=0, labelOverlap="greedy")),
            y=alt.Y("i:O", title="position"),
            color=alt.Color("cos:Q", title="cosine", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)),
            tooltip=["layer:O", "i:O", "j:O", alt.Tooltip("cos:Q", format=".2f")],
        )
        .properties(height=alt.Step(14))
    )


def ablation(df: pl.DataFrame) -> alt.Chart:
    """KL(original || ablated) when one sublayer's output is zeroed, per layer (log scale)."""
    return style(
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q"),
            y=alt.Y("kl_mean:Q", title="mean KL to unablated (nats)", scale=alt.Scale(type="symlog", constant=0.01)),
            color=alt.Color("sublayer:N", title="zeroed"),
            tooltip=[
                "layer:Q",
                "sublayer:N",
                alt.Tooltip("kl_mean:Q", format=".3f"),
                alt.Tooltip("top1_changed:Q", format=".2f"),
            ],
        )
        .properties(height=260)
    )
