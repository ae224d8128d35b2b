"""Track C's charts: a frame of :mod:`lab.tracks.C_probing.frames` in, an Altair chart out (encoding only)."""

from __future__ import annotations

import altair as alt
import polars as pl


def norms(df: pl.DataFrame) -> alt.Chart:
    """Norm of ``resid_post`` per layer, log scale: the median over positions ≥ 1 and the first token on its own
    (from :func:`lab.tracks.C_probing.frames.norms_by_layer`)."""
    return (
        alt.Chart(df)
        .transform_filter(alt.datum.point == "post")
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:Q", title="layer (resid_post)"),
            y=alt.Y("norm:Q", title="‖residual‖ (L2, median over prompts)", scale=alt.Scale(type="log")),
            color=alt.Color("positions:N", title=None),
            tooltip=["layer:Q", "positions:N", alt.Tooltip("norm:Q", format=",.1f")],
        )
        .properties(width="container", height=260)
    )


def contribution_profile(df: pl.DataFrame) -> alt.VConcatChart:
    """Per layer: median ‖out‖ of attention vs MLP, and median cosine with the stream they are added to
    (from :func:`lab.tracks.C_probing.frames.contributions_by_layer`)."""
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
    return alt.vconcat(
        norm.properties(width="container", height=180), alt.layer(cos, zero).properties(width="container", height=180)
    )


def contribution_tokens(df: pl.DataFrame) -> alt.Chart:
    """Heatmap of the attention share ‖attn‖ / (‖attn‖ + ‖mlp‖) per layer and token of one prompt."""
    return (
        alt.Chart(df)
        .transform_filter(alt.datum.sublayer == "attention")
        .mark_rect()
        .encode(
            x=alt.X(
                "token:N", sort=alt.EncodingSortField("position", op="min"), title=None, axis=alt.Axis(labelAngle=-60)
            ),
            y=alt.Y("layer:O", sort="descending"),
            color=alt.Color("share:Q", title="attention share", scale=alt.Scale(scheme="purpleorange", domain=[0, 1])),
            tooltip=["layer:O", "token:N", alt.Tooltip("share:Q", format=".2f"), alt.Tooltip("norm:Q", format=",.2f")],
        )
        .properties(width=alt.Step(16), height=alt.Step(8))
    )


def logit_lens(df: pl.DataFrame) -> alt.LayerChart:
    """The logit lens: depth x token, coloured by KL to the final distribution, labelled with the top token."""
    base = alt.Chart(df).encode(
        x=alt.X(
            "token:N",
            sort=alt.EncodingSortField("position", op="min"),
            title="input token (the lens predicts the next one)",
            axis=alt.Axis(labelAngle=-60),
        ),
        y=alt.Y("depth:O", sort="descending", title="blocks applied"),
    )
    rect = base.mark_rect().encode(
        color=alt.Color("kl_to_final:Q", title="KL to final (nats)", scale=alt.Scale(scheme="viridis", reverse=True)),
        tooltip=[
            "depth:O",
            "token:N",
            "top_token:N",
            alt.Tooltip("top_prob:Q", format=".2f"),
            alt.Tooltip("kl_to_final:Q", format=".2f"),
            "final_token_rank:Q",
        ],
    )
    text = base.mark_text(fontSize=7, limit=44).encode(
        text="top_token:N",
        color=alt.condition(alt.datum.kl_to_final > 3, alt.value("white"), alt.value("black")),
    )
    return alt.layer(rect, text).properties(width=alt.Step(46), height=alt.Step(12))


def lens_profile(df: pl.DataFrame) -> alt.VConcatChart:
    """Mean KL to the final distribution and share of positions whose top-1 already matches, per depth."""
    base = alt.Chart(df).encode(x=alt.X("depth:Q", title="blocks applied"))
    kl = base.mark_line(point=True).encode(
        y=alt.Y("kl_to_final:Q", title="mean KL to final (nats)"),
        tooltip=["depth:Q", alt.Tooltip("kl_to_final:Q", format=".3f")],
    )
    top = base.mark_line(point=True, color="#e45756").encode(
        y=alt.Y("top1_agreement:Q", title="top-1 = final top-1", scale=alt.Scale(domain=[0, 1])),
        tooltip=["depth:Q", alt.Tooltip("top1_agreement:Q", format=".2f")],
    )
    return alt.vconcat(kl.properties(width="container", height=160), top.properties(width="container", height=160))


def similarity_profile(df: pl.DataFrame) -> alt.Chart:
    """Mean pairwise cosine between positions per layer: all pairs, without the first token, neighbours only."""
    return (
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
        .properties(width="container", height=240)
    )


def similarity_maps(df: pl.DataFrame) -> alt.FacetChart:
    """Position x position cosine similarity of ``resid_post`` for a few layers (lower triangle)."""
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("j:O", title="position"),
            y=alt.Y("i:O", title="position"),
            color=alt.Color("cos:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)),
            tooltip=["i:O", "j:O", alt.Tooltip("cos:Q", format=".2f")],
        )
        .properties(width=150, height=150)
        .facet(facet=alt.Facet("layer:O", title="layer"), columns=4)
    )


def ablation(df: pl.DataFrame) -> alt.Chart:
    """KL(original || ablated) when one sublayer's output is zeroed, per layer (log scale)."""
    return (
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
        .properties(width="container", height=260)
    )
