"""Track B's headline numbers: the fields the attention page quotes as ``value("B_attention/summary", "<field>")``."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lab.data.prompts import PROMPTS, bos_ids, encode
from lab.interp.attention import uniform_induction_score
from lab.interp.capture import model_shape
from lab.models.loading import LoadedModel
from lab.results import Summary
from lab.tracks.B_attention.config import AttentionConfig
from lab.tracks.B_attention.frames import first_layer_over, layers_over

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "mean_sink_share",
    "top_induction_score",
    "top_prev_score",
    "mean_entropy_norm",
)


@dataclass(frozen=True)
class AttentionSummary(Summary):
    """Per-head scores over the fixed prompts (sink share, entropy, previous-token) and the repeated random
    sequences (induction), the memory guard's answer, and whether the fine-tuned comparison ran."""

    model: str  # the profile's model
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (grouped-query attention when fewer than n_heads)
    n_prompts: int  # fixed prompts the scores average over
    mean_prompt_tokens: float  # their mean length in tokens (BOS included)
    mean_sink_share: float  # mean weight on the first token, over every head
    heads_sink_over_half: int  # heads that put more than half their weight on the first token
    share_heads_sink_over_half: float  # the same as a share of all heads
    n_heads_total: int  # n_layers x n_heads
    mean_entropy_norm: float  # mean row entropy relative to uniform attention, over every head
    top_prev_layer: int  # the strongest previous-token head ...
    top_prev_head: int
    top_prev_score: float  # ... and its mean weight on the previous token
    heads_prev_over_half: int  # heads with a previous-token score above 0.5
    top_induction_layer: int  # the strongest induction head ...
    top_induction_head: int
    top_induction_score: float  # ... and its induction score
    heads_induction_over_half: int  # heads with an induction score above 0.5
    chance_induction: float  # induction score of uniform attention on the same sequences
    induction_tokens: int  # length of BOS + R + R
    top_induction_sink_share: float  # first-token share of the strongest induction head
    induction_head_layers: str  # layers holding a head with induction score > 0.5 ("none" if none)
    prev_head_layers: str  # layers holding a head with previous-token score > 0.5
    top_sink_layer: int  # the head with the largest first-token share ...
    top_sink_head: int
    top_sink_score: float  # ... and that share
    first_layer_sink_over_half: int  # first layer with a head whose first-token share exceeds 0.5 (-1 if none)
    heads_seconds: float  # time to score every head
    sink_share_early: float  # mean first-token share in the first half of the layers
    entropy_norm_early: float  # mean normalised entropy in the first half of the layers
    sink_share_late: float  # ... and in the second half
    entropy_norm_late: float
    guard_tokens: int  # length of the input the memory guard was asked to capture
    guard_estimate_gib: float  # its every-layer patterns, estimated (GiB)
    guard_refused: bool  # whether the guard refused it in memory
    budget_gib: float  # the capture budget (GiB)
    finetune_compared: bool  # whether base vs fine-tuned ran (its numbers are in finetune_summary)


def summarize(
    lm: LoadedModel,
    cfg: AttentionConfig,
    heads: pl.DataFrame,
    guard: pl.DataFrame,
    *,
    heads_seconds: float,
    finetune_compared: bool,
) -> AttentionSummary:
    """The headline numbers from the per-head frame and the guard row."""
    shape = model_shape(lm.model)
    top = {m: heads.sort(m, descending=True).row(0, named=True) for m in ("prev_token", "induction", "sink_share")}
    early, late = (
        heads.filter(pl.col("layer") < shape["n_layers"] // 2),
        heads.filter(pl.col("layer") >= shape["n_layers"] // 2),
    )
    g = guard.row(0, named=True)
    return AttentionSummary(
        model=lm.name,
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        n_kv_heads=shape["n_kv_heads"],
        n_prompts=len(PROMPTS),
        mean_prompt_tokens=sum(encode(lm, t).shape[1] for t in PROMPTS) / len(PROMPTS),
        mean_sink_share=heads["sink_share"].mean(),
        heads_sink_over_half=int((heads["sink_share"] > 0.5).sum()),
        share_heads_sink_over_half=float((heads["sink_share"] > 0.5).mean()),
        n_heads_total=heads.height,
        mean_entropy_norm=heads["entropy_norm"].mean(),
        top_prev_layer=top["prev_token"]["layer"],
        top_prev_head=top["prev_token"]["head"],
        top_prev_score=top["prev_token"]["prev_token"],
        heads_prev_over_half=int((heads["prev_token"] > 0.5).sum()),
        top_induction_layer=top["induction"]["layer"],
        top_induction_head=top["induction"]["head"],
        top_induction_score=top["induction"]["induction"],
        heads_induction_over_half=int((heads["induction"] > 0.5).sum()),
        chance_induction=uniform_induction_score(cfg.induction_len, len(bos_ids(lm))),
        induction_tokens=cfg.induction_len * 2 + len(bos_ids(lm)),
        top_induction_sink_share=top["induction"]["sink_share"],
        induction_head_layers=layers_over(heads, "induction", 0.5),
        prev_head_layers=layers_over(heads, "prev_token", 0.5),
        top_sink_layer=top["sink_share"]["layer"],
        top_sink_head=top["sink_share"]["head"],
        top_sink_score=top["sink_share"]["sink_share"],
        first_layer_sink_over_half=first_layer_over(heads, "sink_share", 0.5),
        heads_seconds=heads_seconds,
        sink_share_early=early["sink_share"].mean(),
        entropy_norm_early=early["entropy_norm"].mean(),
        sink_share_late=late["sink_share"].mean(),
        entropy_norm_late=late["entropy_norm"].mean(),
        guard_tokens=g["tokens"],
        guard_estimate_gib=g["pattern_estimate_gib"],
        guard_refused=g["refused"],
        budget_gib=g["budget_gib"],
        finetune_compared=finetune_compared,
    )
