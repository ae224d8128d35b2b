"""Track D's outline: train (or load) every run, analyse the headline seeds, build the frames, summarise, write.

Writes to results/D_bayes/: ``summary``, ``comparison``, ``seeds``, ``curves``, ``calibration``, ``search``,
``key_orthogonality``, ``routing``, ``pca``, ``pca_points``, ``logit_lens``, ``ablations``, ``verdicts``,
``mech_summary``. Finished training runs are cached under ``.data/checkpoints/<profile>/D_bayes/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from lab import paths
from lab.data.windtunnel import Batch, bayes_entropy_bits, n_pairs, posterior_metrics, sample_batch, value_log_probs
from lab.interp.windtunnel import (
    ablations,
    attention_routing,
    final_state_pca,
    key_orthogonality,
    logit_lens,
    random_vectors_abs_cos,
)
from lab.models.windtunnel import build_model, n_params
from lab.plots import chart_for, needs
from lab.profiles import Profile
from lab.results import result_set, write_result
from lab.tracks.D_bayes import charts, frames
from lab.tracks.D_bayes.config import TRACK, BayesTrackConfig, Candidate, config_for
from lab.tracks.D_bayes.frames import Mechanisms
from lab.tracks.D_bayes.summary import BayesSummary, summarize
from lab.train.ensemble import RunSpec, train_runs
from lab.train.windtunnel import RunResult, logits_of, train_run

NOTEBOOK_RUNS = "D_bayes-notebook"  # the checkpoint folder of the notebook's own runs (never written to results/)


@dataclass(frozen=True)
class Trained:
    """Every finished run of one invocation."""

    head: list[RunResult]  # the headline transformer, one per seed
    finals: list[tuple[str, int, RunResult]]  # (model, seed, run): the headline seeds, then the controls
    search: list[RunResult]  # one per search candidate; the headline's is its first seed's run

    @property
    def extra(self) -> list[RunResult]:
        """The search runs beyond the headline."""
        return [r for r in self.search if all(r is not h for h in self.head)]


def checkpoint_dir(profile: Profile) -> Path:
    """Where the track caches its finished training runs."""
    return paths.checkpoint_dir(profile.name, TRACK)


def device_for(profile: Profile) -> str:
    """The profile's training device; a CUDA profile without a CUDA device is refused."""
    return profile.require_device()


def train_all(cfg: BayesTrackConfig, root: Path, **common: Any) -> Trained:
    """The headline on every seed, the controls sized to it, and the search candidates on the first seed, trained
    side by side (:func:`lab.train.ensemble.train_runs`)."""
    s0 = cfg.seeds[0]
    match = n_params(build_model(cfg.headline.model, cfg.V))  # the controls are sized to the headline
    head = [RunSpec(f"transformer-s{s}", cfg.headline.model, cfg.headline.train, s) for s in cfg.seeds]
    controls = [RunSpec("mlp", cfg.mlp, cfg.controls_train, s0, match)]
    if cfg.lstm:
        controls.append(RunSpec("lstm", cfg.lstm, cfg.controls_train, s0, match))
    search = [
        head[0] if c == cfg.headline else RunSpec(f"search-{i}", c.model, c.train, s0) for i, c in enumerate(cfg.search)
    ]
    runs = train_runs(cfg.V, head + controls + search, root, **common)  # the headline's search run is head[0]'s
    n, m = len(head), len(head) + len(controls)
    finals = [("transformer", s, r) for s, r in zip(cfg.seeds, runs[:n], strict=True)]
    finals += [(c.name, s0, r) for c, r in zip(controls, runs[n:m], strict=True)]
    return Trained(runs[:n], finals, runs[m:])


def run(profile: Profile, *, fresh: bool = False, write: bool = True, progress: bool = True) -> BayesSummary:
    """Train the headline transformer on every seed, the controls and the search configs; run the mechanistic
    analyses; write everything to results/D_bayes/.

    Args:
        profile: The profile (its recipe is :func:`~lab.tracks.D_bayes.config.config_for`).
        fresh: Retrain even where a finished run is cached.
        write: Write results; ``False`` only returns the summary.
        progress: tqdm bars in the terminal.
    """
    t_start = time.perf_counter()
    cfg = config_for(profile)
    device = device_for(profile)
    runs = train_all(cfg, checkpoint_dir(profile), fresh=fresh, progress=progress, device=device)

    t_analysis = time.perf_counter()  # on a fresh batch, not the evaluation set used during training
    batch = sample_batch(cfg.V, cfg.analysis_sequences, torch.Generator().manual_seed(cfg.analysis_seed))
    mech = mechanisms(cfg, runs.head, batch)
    calibration = calibration_frame([(name, seed, r.model) for name, seed, r in runs.finals], batch)
    analysis_s = time.perf_counter() - t_analysis

    floor = cfg.floor_bits
    seeds = frames.seeds_frame(runs.finals)
    verdicts = frames.verdicts_frame(seeds, mech, floor)
    summary = summarize(
        cfg,
        seeds,
        runs.head,
        runs.extra,
        verdicts,
        floor=floor,
        analysis_s=analysis_s,
        wall_time_s=time.perf_counter() - t_start,
    )
    if not write:
        return summary
    tables = {
        "curves": frames.curves_frame([(name, seed, r.log) for name, seed, r in runs.finals]),
        "calibration": calibration,
        "seeds": seeds,
        "comparison": frames.comparison_frame(cfg, seeds, floor),
        "search": frames.search_frame(cfg, runs.search),
        "key_orthogonality": mech.keys,
        "routing": mech.routing,
        "pca": mech.pca,
        "pca_points": mech.points,
        "logit_lens": mech.lens,
        "ablations": mech.ablations,
        "verdicts": verdicts,
        "mech_summary": frames.mech_summary(mech),
    }
    record = dict(config=cfg.record(device), seed=cfg.seeds[0], profile=profile.name)
    written = {"summary": summary.frame(), **tables}  # the curves chart reads the summary's target and floor
    with result_set(TRACK, profile.name):  # every table and the summary published together
        for name, table in tables.items():
            chart = chart_for(CHARTS, name, written.__getitem__)
            write_result(TRACK, name, table, chart=chart, wall_time_s=summary.wall_time_s, **record)
        summary = replace(summary, wall_time_s=time.perf_counter() - t_start)
        write_result(TRACK, "summary", summary.frame(), wall_time_s=summary.wall_time_s, **record)
    return summary


@needs("summary")
def _curves(curves: pl.DataFrame, summary: pl.DataFrame) -> Any:
    """Our curves and the paper's, with the summary's target and context-blind floor as rules."""
    s = summary.row(0, named=True)
    return charts.curves(frames.curve_lines(curves), frames.reference_lines(s["target_mae"], s["floor_bits"]))


# Result name -> its chart, called on the frame read back from the result's Parquet file (lab.results.rechart
# redraws them from the committed files).
CHARTS: dict[str, Callable[..., Any]] = {
    "curves": _curves,
    "calibration": lambda f: charts.calibration(*frames.calibration_by_position(f)),
    "search": charts.search,
    "key_orthogonality": charts.keys,
    "routing": lambda f: charts.routing(frames.routing_mass(f)),
    "pca_points": charts.pca,
    "logit_lens": charts.lens,
    "ablations": lambda f: charts.ablations(*frames.ablated_components(f)),
}


def train_custom(profile: Profile, candidate: Candidate, *, on_eval: Callable[[dict], None]) -> RunResult:
    """The notebook's "train your own" run (seed 0, cached apart from the track's runs, not written to results/)."""
    cfg = config_for(profile)
    return train_run(
        "notebook",
        cfg.V,
        candidate.model,
        candidate.train,
        0,
        paths.checkpoint_dir(profile.name, NOTEBOOK_RUNS),
        progress=False,
        on_eval=on_eval,
    )


# ----------------------------------------------------------------------------- analyses of the trained models


def calibration_frame(models: list[tuple[str, int, torch.nn.Module]], batch: Batch) -> pl.DataFrame:
    """Mean predicted entropy at each position t next to the exact posterior entropy (bits)."""
    V = batch.V
    rows = []
    h_bayes = bayes_entropy_bits(V)
    for name, seed, model in models:
        m = posterior_metrics(value_log_probs(logits_of(model.eval(), batch.tokens), V), batch.values, V)
        for t in range(n_pairs(V)):
            rows.append(
                {
                    "model": name,
                    "seed": seed,
                    "t": t + 1,
                    "h_model": m["h_model"][:, t].mean().item(),
                    "h_bayes": h_bayes[t].item(),
                    "abs_err": m["abs_err"][:, t].mean().item(),
                    "kl_bits": m["kl"][:, t].mean().item(),
                }
            )
    return pl.DataFrame(rows)


def mechanisms(cfg: BayesTrackConfig, head: list[RunResult], batch: Batch) -> Mechanisms:
    """Run the analyses of :mod:`lab.interp.windtunnel` on each headline seed and on its initial weights."""
    V = cfg.V
    keys, routing, pca, lens, abl = [], [], [], [], []
    points = None
    for s, r in zip(cfg.seeds, head, strict=True):
        torch.manual_seed(s)
        init = build_model(cfg.headline.model, V).eval()  # the same weights the run started from
        for state, m in (("trained", r.model), ("init", init)):
            keys.append(key_orthogonality(m, batch).with_columns(pl.lit(state).alias("state"), pl.lit(s).alias("seed")))
            routing.append(
                attention_routing(m, batch).with_columns(pl.lit(state).alias("state"), pl.lit(s).alias("seed"))
            )
            comps, pts = final_state_pca(m, batch)
            pca.append(comps.with_columns(pl.lit(state).alias("state"), pl.lit(s).alias("seed")))
            if s == cfg.seeds[0] and state == "trained":
                points = pts.head(cfg.points_sequences * n_pairs(V))
        lens.append(logit_lens(r.model, batch).with_columns(pl.lit(s).alias("seed")))
        abl.append(ablations(r.model, batch).with_columns(pl.lit(s).alias("seed")))
    d_head = cfg.headline.model.d_model // cfg.headline.model.n_head
    keys_df = pl.concat(keys).with_columns(
        pl.lit(d_head).alias("d_head"), pl.lit(random_vectors_abs_cos(d_head)).alias("random_vectors")
    )
    return Mechanisms(keys_df, pl.concat(routing), pl.concat(pca), points, pl.concat(lens), pl.concat(abl))
