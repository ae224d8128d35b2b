"""Residual-stream track: norms per layer, attention vs MLP contributions, the logit lens, similarity between
positions, zero-ablation of each sublayer, which tools work on which architecture, and the capture benchmark.
Writes results/C_probing/."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import polars as pl
import torch

from lab.interp import residual as res
from lab.interp.attention import token_labels
from lab.interp.capture import invariant_errors, model_shape
from lab.models.loading import SMOKE_ARCHS, LoadedModel, load_model, load_tiny_model
from lab.profiles import Profile, get_profile
from lab.interp.tl_bridge import TL_CONVERTERS
from lab.results import Stopwatch, write_result
from lab.data.prompts import PROMPTS, encode

TRACK = "C_probing"



@dataclass(frozen=True)
class ProbingConfig:
    """What the track measures; defaults are the ``cpu`` profile's."""

    lens_prompt: int = 0  # index into PROMPTS shown as the logit-lens and per-token charts
    similarity_maps: int = 4  # layers shown as position x position maps (evenly spaced, last included)
    bench_tokens: int = 256
    bench_reps: int = 10
    seed: int = 0


SMOKE = ProbingConfig(bench_tokens=32, bench_reps=3)


def config_for(profile: Profile) -> ProbingConfig:
    return SMOKE if profile.name == "smoke" else ProbingConfig()


def _median_by(df: pl.DataFrame, keys: list[str], cols: list[str]) -> pl.DataFrame:
    return df.group_by(keys).agg([pl.col(c).median() for c in cols]).sort(keys)


def analyse_prompts(lm: LoadedModel, cfg: ProbingConfig, progress: bool = False) -> dict[str, pl.DataFrame]:
    """Every residual analysis on every prompt; per-prompt frames concatenated with a ``prompt`` column."""
    frames: dict[str, list[pl.DataFrame]] = {k: [] for k in ("norms", "contrib", "lens", "stable", "sim", "ablation")}
    maps = None
    items = list(enumerate(PROMPTS))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="prompts", leave=False)
    for i, text in items:
        ids = encode(lm, text)
        labels = token_labels(lm.tokenizer, ids[0].tolist())
        cap, n = res.capture_residuals(lm.model, ids)
        tag = pl.lit(i).alias("prompt")
        frames["norms"].append(res.residual_norms(cap, n, labels).with_columns(tag))
        frames["contrib"].append(res.contributions(cap, n, labels).with_columns(tag))
        lens = res.logit_lens(lm.model, cap, n, lm.tokenizer, labels)
        frames["lens"].append(lens.with_columns(tag))
        frames["stable"].append(res.first_stable_depth(lens).with_columns(tag))
        shown = sorted({round(k * (n - 1) / max(1, cfg.similarity_maps - 1)) for k in range(cfg.similarity_maps)})
        sim, sim_maps = res.position_similarity(cap, n, layers=shown if i == cfg.lens_prompt else None)
        frames["sim"].append(sim.with_columns(tag))
        if i == cfg.lens_prompt:
            maps = sim_maps
        frames["ablation"].append(res.ablation_effects(lm.model, ids, n, cap.logits).with_columns(tag))
    out = {k: pl.concat(v) for k, v in frames.items()}
    out["sim_maps"] = maps
    return out


def architecture_table(seed: int = 0, tokens: int = 40) -> pl.DataFrame:
    """For each tiny architecture family: the capture's invariant errors, and whether nnsight and TransformerLens
    (same weights, TransformerLens's own converters) read the same activations (max abs difference).

    ``tokens`` exceeds the tiny Gemma2's sliding window (16), so its local-attention layers are exercised."""
    from lab.interp.names import KINDS, hook_names
    from lab.interp.capture import adapter_for, capture
    from lab.interp.tl_bridge import transformer_lens_model

    rows = []
    for arch in SMOKE_ARCHS:
        lm = load_tiny_model(arch, seed=seed)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, len(lm.tokenizer), (2, tokens), generator=g)
        row: dict[str, Any] = {"family": arch, "model_type": lm.model.config.model_type,
                               "attn_implementation": lm.model.config._attn_implementation}
        row.update(invariant_errors(lm.model, ids))
        ad = adapter_for(lm.model)
        names = hook_names(ad.n_layers(), KINDS)
        cap = capture(lm.model, ids, names)
        last = f"blocks.{ad.n_layers() - 1}.hook_resid_post"
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
        # nnsight.save, not the .save() method: importing circuit-tracer turns nnsight's PYMOUNT off (Track E)
        out = save(env.output)
    out = out[0] if isinstance(out, tuple) else out
    return float((out.detach().cpu() - ours).abs().max())


def run(profile: str | Profile | None = None, *, fresh: bool = False, write: bool = True, progress: bool = True,
        bench: bool = True) -> dict:
    """Residual-stream analyses on the fixed prompts, the architecture table and the capture benchmark, written
    to results/C_probing/. Returns the summary row.

    Args:
        profile: Profile name or object (default ``cpu``).
        fresh: Accepted for the CLI; nothing is resumed (everything is recomputed).
        write: Write results (``False``: compute and return the summary only).
        progress: tqdm bars.
        bench: Also run the capture benchmark (``lab.capture_bench``).
    """
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    cfg = config_for(p)
    lm = load_model(p)
    shape = model_shape(lm.model)
    n = int(shape["n_layers"])
    config = {"probing": asdict(cfg), "model": lm.name, "shape": shape, "prompts": list(PROMPTS)}
    with Stopwatch() as sw:
        f = analyse_prompts(lm, cfg, progress=progress)
    with Stopwatch() as sw_arch:
        archs = architecture_table(seed=cfg.seed)

    # Aggregates written to results (charts inline their data: a few thousand rows at most).
    norms = f["norms"].with_columns(
        pl.when(pl.col("position") == 0).then(pl.lit("position 0 (first token)"))
        .otherwise(pl.lit("median over positions ≥ 1")).alias("positions"))
    norms_agg = _median_by(norms, ["layer", "point", "positions"], ["norm"])
    contrib_agg = _median_by(f["contrib"].filter(pl.col("position") > 0), ["layer", "sublayer"],
                             ["norm", "proj_stream", "cos_stream", "proj_final", "share"])
    tokens = f["contrib"].filter(pl.col("prompt") == cfg.lens_prompt).drop("prompt")
    lens_one = f["lens"].filter(pl.col("prompt") == cfg.lens_prompt).drop("prompt")
    lens_profile = f["lens"].group_by("depth").agg(pl.col("kl_to_final").mean(),
                                                   pl.col("matches_final").mean().alias("top1_agreement"),
                                                   pl.col("top_prob").mean()).sort("depth")
    sim = f["sim"].group_by("layer").agg(pl.col("mean_cos_all", "mean_cos_without_first", "mean_cos_adjacent").mean()
                                         ).sort("layer")
    ablation = f["ablation"].group_by("layer", "sublayer").agg(
        pl.col("kl_mean", "kl_last", "top1_changed", "delta_logprob_last").mean()).sort("layer", "sublayer")
    stable = f["stable"]

    # Headline numbers the pages quote.
    def at(frame: pl.DataFrame, **eq: Any) -> pl.DataFrame:
        for k, v in eq.items():
            frame = frame.filter(pl.col(k) == v)
        return frame

    post = at(norms_agg, point="post", positions="median over positions ≥ 1").sort("layer")
    post0 = at(norms_agg, point="post", positions="position 0 (first token)").sort("layer")
    att_c, mlp_c = at(contrib_agg, sublayer="attention").sort("layer"), at(contrib_agg, sublayer="mlp").sort("layer")
    abl_att, abl_mlp = at(ablation, sublayer="attention").sort("layer"), at(ablation, sublayer="mlp").sort("layer")
    agree = lens_profile["top1_agreement"].to_list()
    half = next((d for d, a in enumerate(agree) if a >= 0.5), n)
    worst_abl = ablation.sort("kl_mean", descending=True).row(0, named=True)
    summary: dict[str, Any] = {
        "model": lm.name, "n_layers": n, "d_model": shape["d_model"], "n_prompts": len(PROMPTS),
        "n_positions": int(stable.height),
        "norm_post_first_layer": post["norm"][0], "norm_post_last_layer": post["norm"][-1],
        "norm_post_max": post["norm"].max(), "norm_post_argmax_layer": int(post.sort("norm")["layer"][-1]),
        "norm_pos0_max": post0["norm"].max(), "norm_pos0_argmax_layer": int(post0.sort("norm")["layer"][-1]),
        "pos0_over_rest_max_ratio": float((post0["norm"] / post["norm"]).max()),
        "mlp_over_attn_norm_median": float((mlp_c["norm"] / att_c["norm"]).median()),
        "layers_mlp_norm_larger": int((mlp_c["norm"] > att_c["norm"]).sum()),
        "attn_cos_stream_median": float(att_c["cos_stream"].median()),
        "mlp_cos_stream_median": float(mlp_c["cos_stream"].median()),
        "mlp_last_layer_cos_stream": float(mlp_c["cos_stream"][-1]),
        "mlp_last_layer_norm": float(mlp_c["norm"][-1]),
        "attn_last_layer_norm": float(att_c["norm"][-1]),
        "ablation_attn_kl_mean": float(abl_att["kl_mean"].mean()), "ablation_mlp_kl_mean": float(abl_mlp["kl_mean"].mean()),
        "ablation_worst_layer": worst_abl["layer"], "ablation_worst_sublayer": worst_abl["sublayer"],
        "ablation_worst_kl": worst_abl["kl_mean"], "ablation_worst_top1_changed": worst_abl["top1_changed"],
        "ablation_attn_l0_kl": float(abl_att["kl_mean"][0]), "ablation_mlp_l0_kl": float(abl_mlp["kl_mean"][0]),
        "ablation_layers_mlp_worse": int((abl_mlp["kl_mean"] > abl_att["kl_mean"]).sum()),
        "ablation_attn_worst_layer": int(abl_att.sort("kl_mean")["layer"][-1]),
        "ablation_attn_worst_kl": float(abl_att["kl_mean"].max()),
        "ablation_mlp_at_pos0_peak_kl": float(abl_mlp["kl_mean"][int(post0.sort("norm")["layer"][-1])]),
        "norm_growth_last_over_first": float(post["norm"][-1] / post["norm"][0]),
        "lens_top1_agreement_embed": float(agree[0]), "lens_top_prob_embed": float(lens_profile["top_prob"][0]),
        "lens_kl_embed": float(lens_profile["kl_to_final"][0]),
        "lens_kl_mid": float(lens_profile["kl_to_final"][n // 2]),
        "lens_kl_second_last": float(lens_profile["kl_to_final"][n - 1]),
        "lens_top1_agreement_mid": float(agree[n // 2]),
        "lens_top1_agreement_second_last": float(agree[n - 1]),
        "lens_depth_half_agree": half,
        "first_stable_depth_median": float(stable["first_stable_depth"].median()),
        "first_stable_depth_share_last": float((stable["first_stable_depth"] == n).mean()),
        "cos_all_first_layer": float(sim["mean_cos_all"][0]), "cos_all_max": float(sim["mean_cos_all"].max()),
        "cos_all_block1": float(sim["mean_cos_all"][min(1, n - 1)]),
        "cos_all_last_layer": float(sim["mean_cos_all"][-1]),
        "cos_without_first_max": float(sim["mean_cos_without_first"].max()),
        "cos_adjacent_mean": float(sim["mean_cos_adjacent"].mean()),
        "invariants_max_error": float(archs.select([c for c in archs.columns if c.endswith(("_minus_mid", "_minus_post",
                                      "_next_pre", "_hf_eager", "_minus_logits"))]).max_horizontal().max()),
        "analysis_seconds": sw.seconds,
    }
    if not write:
        return summary
    common = {"config": config, "seed": cfg.seed, "profile": p.name}
    write_result(TRACK, "norms", norms_agg, chart=res.plot_norms, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "contributions", contrib_agg, chart=res.plot_contribution_profile, wall_time_s=sw.seconds,
                 **common)
    write_result(TRACK, "contribution_tokens", tokens, chart=res.plot_contribution_tokens, wall_time_s=sw.seconds,
                 **common)
    write_result(TRACK, "logit_lens", lens_one, chart=res.plot_logit_lens, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "lens_profile", lens_profile, chart=res.plot_lens_profile, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "lens_stable", stable, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "similarity", sim, chart=res.plot_similarity_profile, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "similarity_maps", f["sim_maps"], chart=res.plot_similarity_maps, wall_time_s=sw.seconds,
                 **common)
    write_result(TRACK, "ablation", ablation, chart=res.plot_ablation, wall_time_s=sw.seconds, **common)
    write_result(TRACK, "architectures", archs, config={"families": list(SMOKE_ARCHS), "tokens": 40}, seed=cfg.seed,
                 profile=p.name, wall_time_s=sw_arch.seconds)
    write_result(TRACK, "summary", pl.DataFrame([summary]), wall_time_s=sw.seconds + sw_arch.seconds, **common)
    if bench:
        from lab.bench.capture import run_benchmark

        run_benchmark(p, tokens=cfg.bench_tokens, reps=cfg.bench_reps, write=True, lm=lm)
    return summary
