"""Track C's headline numbers: the fields the residual-stream page quotes as
``value("C_probing/summary", "<field>")``."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lab.data.prompts import PROMPTS
from lab.results import Summary
from lab.tracks.C_probing.frames import FIRST, REST, invariants_max_error

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "lens_kl_mid",
    "ablation_mlp_l0_kl",
    "ablation_attn_kl_mean",
    "norm_post_max",
)


@dataclass(frozen=True)
class ProbingSummary(Summary):
    """Norms, sublayer contributions, zero-ablation, the logit lens and position similarity over the fixed prompts
    (medians or means over prompts, as their frames say), and the architecture table's worst invariant error.
    "Layer" is a block index; "depth" counts blocks applied (0 = the embeddings)."""

    model: str  # the profile's model
    n_layers: int
    d_model: int  # residual width
    n_prompts: int
    n_positions: int  # token positions over all prompts
    norm_post_first_layer: float  # median ‖resid_post‖ over positions >= 1, after block 0 ...
    norm_post_last_layer: float  # ... after the last block
    norm_post_max: float  # ... its largest value over layers ...
    norm_post_argmax_layer: int  # ... and where
    norm_pos0_max: float  # the first token's ‖resid_post‖: largest over layers ...
    norm_pos0_argmax_layer: int  # ... and where
    pos0_over_rest_max_ratio: float  # largest ratio first token / rest over layers
    mlp_over_attn_norm_median: float  # median over layers of ‖mlp_out‖ / ‖attn_out‖
    layers_mlp_norm_larger: int  # layers where the MLP writes the larger vector
    attn_cos_stream_median: float  # median cosine of attn_out with the stream it is added to
    mlp_cos_stream_median: float  # ... of mlp_out
    mlp_last_layer_cos_stream: float  # the last MLP's cosine with its stream
    mlp_last_layer_norm: float  # the last MLP's output norm
    attn_last_layer_norm: float  # the last attention's output norm
    ablation_attn_kl_mean: float  # mean KL (nats) from the unablated model, one attention zeroed, over layers
    ablation_mlp_kl_mean: float  # ... one MLP zeroed
    ablation_worst_layer: int  # the most damaging single ablation: its layer ...
    ablation_worst_sublayer: str  # ... sublayer ...
    ablation_worst_kl: float  # ... KL ...
    ablation_worst_top1_changed: float  # ... and share of positions whose top-1 token changes
    ablation_attn_l0_kl: float  # KL of zeroing layer 0's attention
    ablation_mlp_l0_kl: float  # KL of zeroing layer 0's MLP
    ablation_layers_mlp_worse: int  # layers where zeroing the MLP hurts more than zeroing attention
    ablation_attn_worst_layer: int  # the most damaging attention ablation's layer ...
    ablation_attn_worst_kl: float  # ... and KL
    ablation_mlp_at_pos0_peak_kl: float  # KL of zeroing the MLP of the layer where the first token's norm peaks
    norm_growth_last_over_first: float  # norm_post_last_layer / norm_post_first_layer
    lens_top1_agreement_embed: float  # logit lens at depth 0: share of positions whose top-1 is the final top-1 ...
    lens_top_prob_embed: float  # ... mean top probability ...
    lens_kl_embed: float  # ... mean KL to the final distribution
    lens_kl_mid: float  # mean KL at depth n_layers // 2
    lens_kl_second_last: float  # mean KL at depth n_layers - 1
    lens_top1_agreement_mid: float  # top-1 agreement at depth n_layers // 2
    lens_top1_agreement_second_last: float  # ... at depth n_layers - 1
    lens_depth_half_agree: int  # first depth where half the positions agree with the final top-1
    first_stable_depth_median: float  # median depth from which a position's top-1 stays the final one
    first_stable_depth_share_last: float  # share of positions that settle only at the last depth
    cos_all_first_layer: float  # mean cosine between positions after block 0 (all pairs)
    cos_all_max: float  # ... largest over layers
    cos_all_block1: float  # ... after block 1
    cos_all_last_layer: float  # ... after the last block
    cos_without_first_max: float  # largest over layers, pairs without the first token
    cos_adjacent_mean: float  # mean over layers, neighbouring positions
    invariants_max_error: float  # the architecture table's largest invariant error
    analysis_seconds: float  # time of the per-prompt analyses


def _at(frame: pl.DataFrame, **eq: object) -> pl.DataFrame:
    for k, v in eq.items():
        frame = frame.filter(pl.col(k) == v)
    return frame.sort("layer")


def summarize(
    model: str,
    shape: dict,
    *,
    norms: pl.DataFrame,
    contributions: pl.DataFrame,
    ablation: pl.DataFrame,
    lens_profile: pl.DataFrame,
    stable: pl.DataFrame,
    similarity: pl.DataFrame,
    architectures: pl.DataFrame,
    analysis_seconds: float,
) -> ProbingSummary:
    """The headline numbers from the aggregated frames of :mod:`lab.tracks.C_probing.frames`."""
    n = int(shape["n_layers"])
    post, post0 = _at(norms, point="post", positions=REST), _at(norms, point="post", positions=FIRST)
    att_c, mlp_c = _at(contributions, sublayer="attention"), _at(contributions, sublayer="mlp")
    abl_att, abl_mlp = _at(ablation, sublayer="attention"), _at(ablation, sublayer="mlp")
    agree = lens_profile["top1_agreement"].to_list()
    worst = ablation.sort("kl_mean", descending=True).row(0, named=True)
    pos0_peak = int(post0.sort("norm")["layer"][-1])
    sim = similarity
    return ProbingSummary(
        model=model,
        n_layers=n,
        d_model=shape["d_model"],
        n_prompts=len(PROMPTS),
        n_positions=int(stable.height),
        norm_post_first_layer=post["norm"][0],
        norm_post_last_layer=post["norm"][-1],
        norm_post_max=post["norm"].max(),
        norm_post_argmax_layer=int(post.sort("norm")["layer"][-1]),
        norm_pos0_max=post0["norm"].max(),
        norm_pos0_argmax_layer=pos0_peak,
        pos0_over_rest_max_ratio=float((post0["norm"] / post["norm"]).max()),
        mlp_over_attn_norm_median=float((mlp_c["norm"] / att_c["norm"]).median()),
        layers_mlp_norm_larger=int((mlp_c["norm"] > att_c["norm"]).sum()),
        attn_cos_stream_median=float(att_c["cos_stream"].median()),
        mlp_cos_stream_median=float(mlp_c["cos_stream"].median()),
        mlp_last_layer_cos_stream=float(mlp_c["cos_stream"][-1]),
        mlp_last_layer_norm=float(mlp_c["norm"][-1]),
        attn_last_layer_norm=float(att_c["norm"][-1]),
        ablation_attn_kl_mean=float(abl_att["kl_mean"].mean()),
        ablation_mlp_kl_mean=float(abl_mlp["kl_mean"].mean()),
        ablation_worst_layer=worst["layer"],
        ablation_worst_sublayer=worst["sublayer"],
        ablation_worst_kl=worst["kl_mean"],
        ablation_worst_top1_changed=worst["top1_changed"],
        ablation_attn_l0_kl=float(abl_att["kl_mean"][0]),
        ablation_mlp_l0_kl=float(abl_mlp["kl_mean"][0]),
        ablation_layers_mlp_worse=int((abl_mlp["kl_mean"] > abl_att["kl_mean"]).sum()),
        ablation_attn_worst_layer=int(abl_att.sort("kl_mean")["layer"][-1]),
        ablation_attn_worst_kl=float(abl_att["kl_mean"].max()),
        ablation_mlp_at_pos0_peak_kl=float(abl_mlp["kl_mean"][pos0_peak]),
        norm_growth_last_over_first=float(post["norm"][-1] / post["norm"][0]),
        lens_top1_agreement_embed=float(agree[0]),
        lens_top_prob_embed=float(lens_profile["top_prob"][0]),
        lens_kl_embed=float(lens_profile["kl_to_final"][0]),
        lens_kl_mid=float(lens_profile["kl_to_final"][n // 2]),
        lens_kl_second_last=float(lens_profile["kl_to_final"][n - 1]),
        lens_top1_agreement_mid=float(agree[n // 2]),
        lens_top1_agreement_second_last=float(agree[n - 1]),
        lens_depth_half_agree=next((d for d, a in enumerate(agree) if a >= 0.5), n),
        first_stable_depth_median=float(stable["first_stable_depth"].median()),
        first_stable_depth_share_last=float((stable["first_stable_depth"] == n).mean()),
        cos_all_first_layer=float(sim["mean_cos_all"][0]),
        cos_all_max=float(sim["mean_cos_all"].max()),
        cos_all_block1=float(sim["mean_cos_all"][min(1, n - 1)]),
        cos_all_last_layer=float(sim["mean_cos_all"][-1]),
        cos_without_first_max=float(sim["mean_cos_without_first"].max()),
        cos_adjacent_mean=float(sim["mean_cos_adjacent"].mean()),
        invariants_max_error=invariants_max_error(architectures),
        analysis_seconds=analysis_seconds,
    )
