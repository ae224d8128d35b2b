"""Track C's frames: every residual analysis of :mod:`lab.interp.residual` on the fixed prompts, their aggregates
over prompts (all aggregation the charts and the summary use is here), and the architecture table."""

from __future__ import annotations

from typing import Any

import polars as pl
import torch

from lab.data.prompts import PROMPTS, encode
from lab.interp import residual as res
from lab.interp.adapters import adapter_for
from lab.interp.attention import token_labels
from lab.interp.capture import Capture, capture, invariant_errors
from lab.interp.names import KINDS, act_name, hook_names
from lab.interp.tl_bridge import TL_CONVERTERS, transformer_lens_model
from lab.models.loading import SMOKE_ARCHS, LoadedModel, load_tiny_model
from lab.tracks.C_probing.config import ProbingConfig

FIRST = "position 0 (first token)"
REST = "median over positions ≥ 1"

# ----------------------------------------------------------------------------- per prompt


def prompt_frames(lm: LoadedModel, text: str) -> dict[str, Any]:
    """One prompt's residual analyses: ``capture``, ``n_layers``, ``labels``, and the ``norms``, ``contrib`` and
    ``lens`` frames; a too-short text raises LabError."""
    ids = encode(lm, text)
    labels = token_labels(lm.tokenizer, ids[0].tolist())
    cap, n = res.capture_residuals(lm.model, ids)
    return {
        "ids": ids,
        "capture": cap,
        "n_layers": n,
        "labels": labels,
        "norms": res.residual_norms(cap, n, labels),
        "contrib": res.contributions(cap, n, labels),
        "lens": res.logit_lens(lm.model, cap, n, lm.tokenizer, labels),
    }


def similarity_map(cap: Capture, n_layers: int, layer: int) -> pl.DataFrame:
    """Position x position cosine similarity of one layer's ``resid_post`` (lower triangle)."""
    return res.position_similarity(cap, n_layers, layers=[layer])[1]


def analyse_prompts(lm: LoadedModel, cfg: ProbingConfig, progress: bool = False) -> dict[str, pl.DataFrame]:
    """Every residual analysis on every prompt; per-prompt frames concatenated with a ``prompt`` column, and the
    similarity maps of prompt ``cfg.lens_prompt`` (``sim_maps``)."""
    frames: dict[str, list[pl.DataFrame]] = {k: [] for k in ("norms", "contrib", "lens", "stable", "sim", "ablation")}
    maps = None
    items = list(enumerate(PROMPTS))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="prompts", leave=False)
    for i, text in items:
        one = prompt_frames(lm, text)
        cap, n = one["capture"], one["n_layers"]
        tag = pl.lit(i).alias("prompt")
        frames["norms"].append(one["norms"].with_columns(tag))
        frames["contrib"].append(one["contrib"].with_columns(tag))
        frames["lens"].append(one["lens"].with_columns(tag))
        frames["stable"].append(res.first_stable_depth(one["lens"]).with_columns(tag))
        shown = sorted({round(k * (n - 1) / max(1, cfg.similarity_maps - 1)) for k in range(cfg.similarity_maps)})
        sim, sim_maps = res.position_similarity(cap, n, layers=shown if i == cfg.lens_prompt else None)
        frames["sim"].append(sim.with_columns(tag))
        if i == cfg.lens_prompt:
            maps = sim_maps
        frames["ablation"].append(res.ablation_effects(lm.model, one["ids"], n, cap.logits).with_columns(tag))
    out = {k: pl.concat(v) for k, v in frames.items()}
    out["sim_maps"] = maps
    return out


# ----------------------------------------------------------------------------- aggregates over prompts


def _median_by(df: pl.DataFrame, keys: list[str], cols: list[str]) -> pl.DataFrame:
    return df.group_by(keys).agg([pl.col(c).median() for c in cols]).sort(keys)


def norms_by_layer(norms: pl.DataFrame) -> pl.DataFrame:
    """Median residual norm per (layer, point), the first token apart from the rest (``positions``)."""
    labelled = norms.with_columns(
        pl.when(pl.col("position") == 0).then(pl.lit(FIRST)).otherwise(pl.lit(REST)).alias("positions")
    )
    return _median_by(labelled, ["layer", "point", "positions"], ["norm"])


def contributions_by_layer(contrib: pl.DataFrame) -> pl.DataFrame:
    """Median over positions >= 1 of what each sublayer writes, per (layer, sublayer)."""
    return _median_by(
        contrib.filter(pl.col("position") > 0),
        ["layer", "sublayer"],
        ["norm", "proj_stream", "cos_stream", "proj_final", "share"],
    )


def one_prompt(frame: pl.DataFrame, prompt: int) -> pl.DataFrame:
    """The rows of one prompt, without the ``prompt`` column."""
    return frame.filter(pl.col("prompt") == prompt).drop("prompt")


def lens_profile(lens: pl.DataFrame) -> pl.DataFrame:
    """Per depth: mean KL to the final distribution, share of positions whose top-1 is the final one, mean top prob."""
    return (
        lens.group_by("depth")
        .agg(
            pl.col("kl_to_final").mean(),
            pl.col("matches_final").mean().alias("top1_agreement"),
            pl.col("top_prob").mean(),
        )
        .sort("depth")
    )


def similarity_by_layer(sim: pl.DataFrame) -> pl.DataFrame:
    """Mean over prompts of each layer's position-similarity summary."""
    return (
        sim.group_by("layer")
        .agg(pl.col("mean_cos_all", "mean_cos_without_first", "mean_cos_adjacent").mean())
        .sort("layer")
    )


def ablation_by_layer(ablation: pl.DataFrame) -> pl.DataFrame:
    """Mean over prompts of each (layer, sublayer) zero-ablation effect."""
    return (
        ablation.group_by("layer", "sublayer")
        .agg(pl.col("kl_mean", "kl_last", "top1_changed", "delta_logprob_last").mean())
        .sort("layer", "sublayer")
    )


# ----------------------------------------------------------------------------- which tools work where


def architecture_table(seed: int = 0, tokens: int = 40) -> pl.DataFrame:
    """For each tiny architecture family: the capture's invariant errors, and whether nnsight and TransformerLens
    (same weights, TransformerLens's own converters) read the same activations (max abs difference).

    ``tokens`` should exceed the tiny Gemma2's sliding window (16), so its local-attention layers are exercised."""
    rows = []
    for arch in SMOKE_ARCHS:
        lm = load_tiny_model(arch, seed=seed)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, len(lm.tokenizer), (2, tokens), generator=g)
        row: dict[str, Any] = {
            "family": arch,
            "model_type": lm.model.config.model_type,
            "attn_implementation": lm.model.config._attn_implementation,
        }
        row.update(invariant_errors(lm.model, ids))
        ad = adapter_for(lm.model)
        names = hook_names(ad.n_layers(), KINDS)
        cap = capture(lm.model, ids, names)
        last = act_name("resid_post", ad.n_layers() - 1)
        row["nnsight_resid_post_max_diff"] = _nnsight_diff(lm, ids, ad.layers()[-1], cap[last])
        tl = transformer_lens_model(lm.model)
        with torch.no_grad():
            logits, cache = tl.run_with_cache(ids, names_filter=lambda n, keep=frozenset(names): n in keep)
        row["transformer_lens_max_diff"] = max(float((cache[n] - cap[n]).abs().max()) for n in names)
        row["transformer_lens_logits_max_diff"] = float((logits - cap.logits).abs().max())
        row["transformer_lens_converter"] = TL_CONVERTERS[tl.cfg.original_architecture]
        rows.append(row)
    return pl.DataFrame(rows)


def _nnsight_diff(lm: LoadedModel, ids: torch.Tensor, layer: torch.nn.Module, ours: torch.Tensor) -> float | None:
    """nnsight's view of a block's output vs ours; the block is found by identity, not by path."""
    try:
        from nnsight import LanguageModel, save
    except ImportError:
        return None
    path = {m: n for n, m in lm.model.named_modules()}[layer]
    wrapped = LanguageModel(lm.model, tokenizer=lm.tokenizer)
    env: Any = wrapped
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    with wrapped.trace(ids):
        # nnsight.save, not the .save() method: importing circuit-tracer turns nnsight's PYMOUNT off
        out = save(env.output)
    out = out[0] if isinstance(out, tuple) else out
    return float((out.detach().cpu() - ours).abs().max())


def invariants_max_error(archs: pl.DataFrame) -> float:
    """The largest invariant error of the architecture table (identities that hold exactly up to float error)."""
    cols = [
        c for c in archs.columns if c.endswith(("_minus_mid", "_minus_post", "_next_pre", "_hf_eager", "_minus_logits"))
    ]
    return float(archs.select(cols).max_horizontal().max())
