"""Track C's outline: residual analyses on the fixed prompts -> aggregates -> architecture table -> summary ->
results/C_probing/ -> the capture benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import polars as pl

from lab.bench import capture as capture_bench
from lab.data.prompts import PROMPTS
from lab.interp.capture import model_shape
from lab.models.loading import SMOKE_ARCHS, LoadedModel, load_model
from lab.profiles import Profile
from lab.results import Stopwatch, result_set, write_result
from lab.tracks.C_probing import charts, frames
from lab.tracks.C_probing.config import TRACK, config_for
from lab.tracks.C_probing.summary import ProbingSummary, summarize

# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[[pl.DataFrame], Any]] = {
    "norms": charts.norms,
    "contributions": charts.contribution_profile,
    "contribution_tokens": charts.contribution_tokens,
    "logit_lens": charts.logit_lens,
    "lens_profile": charts.lens_profile,
    "similarity": charts.similarity_profile,
    "similarity_maps": charts.similarity_maps,
    "ablation": charts.ablation,
}


def run(
    profile: Profile, *, fresh: bool = False, write: bool = True, progress: bool = True, bench: bool = True
) -> ProbingSummary:
    """Residual-stream analyses on the fixed prompts, the architecture table and the capture benchmark, written
    to results/C_probing/.

    Args:
        profile: The profile (resolved at the edge).
        fresh: Accepted for the CLI; nothing is resumed (everything is recomputed).
        write: Write results (``False``: compute and return the summary only).
        progress: tqdm bars.
        bench: Also run the capture benchmark (:func:`benchmark`).
    """
    cfg = config_for(profile)
    lm = load_model(profile)
    shape = model_shape(lm.model)
    with Stopwatch() as sw:
        per_prompt = frames.analyse_prompts(lm, cfg, progress=progress)
    with Stopwatch() as sw_arch:
        archs = frames.architecture_table(seed=cfg.seed, tokens=cfg.architecture_tokens)
    results = {  # name -> frame (charts: CHARTS)
        "norms": frames.norms_by_layer(per_prompt["norms"]),
        "contributions": frames.contributions_by_layer(per_prompt["contrib"]),
        "contribution_tokens": frames.one_prompt(per_prompt["contrib"], cfg.lens_prompt),
        "logit_lens": frames.one_prompt(per_prompt["lens"], cfg.lens_prompt),
        "lens_profile": frames.lens_profile(per_prompt["lens"]),
        "lens_stable": per_prompt["stable"],
        "similarity": frames.similarity_by_layer(per_prompt["sim"]),
        "similarity_maps": per_prompt["sim_maps"],
        "ablation": frames.ablation_by_layer(per_prompt["ablation"]),
    }
    summary = summarize(
        lm.name,
        shape,
        norms=results["norms"],
        contributions=results["contributions"],
        ablation=results["ablation"],
        lens_profile=results["lens_profile"],
        stable=results["lens_stable"],
        similarity=results["similarity"],
        architectures=archs,
        analysis_seconds=sw.seconds,
    )
    if not write:
        return summary
    common = {
        "config": {"probing": asdict(cfg), "model": lm.name, "shape": shape, "prompts": list(PROMPTS)},
        "seed": cfg.seed,
        "profile": profile.name,
    }
    with result_set(TRACK, profile.name):  # the analyses, the summary and the benchmark published together
        for name, frame in results.items():
            write_result(TRACK, name, frame, chart=CHARTS.get(name), wall_time_s=sw.seconds, **common)
        write_result(
            TRACK,
            "architectures",
            archs,
            config={"families": list(SMOKE_ARCHS), "tokens": cfg.architecture_tokens},
            seed=cfg.seed,
            profile=profile.name,
            wall_time_s=sw_arch.seconds,
        )
        write_result(TRACK, "summary", summary.frame(), wall_time_s=sw.seconds + sw_arch.seconds, **common)
        if bench:
            benchmark(profile, lm=lm)
    return summary


def benchmark(
    profile: Profile, *, lm: LoadedModel | None = None, tokens: int | None = None, reps: int | None = None
) -> pl.DataFrame:
    """The capture benchmark (:func:`lab.bench.capture.run`) on the profile's model, printed and written to
    results/C_probing/benchmark; ``lab bench capture`` runs it alone.

    Args:
        profile: The profile (resolved at the edge).
        lm: The profile's model, when already loaded.
        tokens: Sequence length (default: the recipe's ``bench_tokens``).
        reps: Timed repetitions (default: the recipe's ``bench_reps``).
    """
    cfg = config_for(profile)
    tokens, reps = tokens or cfg.bench_tokens, reps or cfg.bench_reps
    lm = lm or load_model(profile)
    t0 = time.perf_counter()
    frame, checks = capture_bench.run(lm, tokens=tokens, reps=reps, warmup=cfg.bench_warmup)
    with result_set(TRACK, profile.name):  # alone (`lab bench`): the other files of the set are kept
        write_result(
            TRACK,
            "benchmark",
            frame,
            config={"tokens": tokens, "reps": reps, "model": lm.name, **checks},
            seed=None,
            profile=profile.name,
            wall_time_s=time.perf_counter() - t0,
        )
    return frame
