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
from lab.data.hmm import sample_hmm_batch
from lab.data.windtunnel import Batch, bayes_entropy_bits, n_pairs, posterior_metrics, sample_batch, value_log_probs
from lab.interp.windtunnel import random_vectors_abs_cos
from lab.interp.windtunnel_claims import Mechanisms, Rung, as_mechanisms, ladder_frames, measure, verdict_grid
from lab.models.windtunnel import build_model, n_params
from lab.plots import chart_for, needs
from lab.profiles import Profile
from lab.results import result_set, write_result
from lab.tracks.D_bayes import charts, frames
from lab.tracks.D_bayes.config import (
    PAPER_KEY_COS,
    PAPER_KEY_COS_MAX,
    PAPER_PC1_MIN,
    TRACK,
    BayesTrackConfig,
    Candidate,
    config_for,
)
from lab.tracks.D_bayes.summary import BayesSummary, companion_fields, summarize
from lab.train.em_attention import em_vs_sgd
from lab.train.ensemble import RunSpec, side_job, train_runs
from lab.train.hmm import per_position, train_hmm
from lab.train.windtunnel import RunResult, logits_of, train_run

NOTEBOOK_RUNS = "D_bayes-notebook"  # the checkpoint folder of the notebook's own runs (never written to results/)


@dataclass(frozen=True)
class Trained:
    """Every finished run of one invocation."""

    head: list[RunResult]  # the headline transformer, one per seed
    finals: list[tuple[str, int, RunResult]]  # (model, seed, run): the headline seeds, then the controls
    search: list[RunResult]  # one per search candidate; the headline's is its first seed's run
    ladder: list[tuple[Candidate, int, RunResult]]  # (rung, seed, run), smallest rung first
    lstm_sweep: list[tuple[float, RunResult]]  # (learning rate, run) of the LSTM's sweep; the best is in finals

    @property
    def extra(self) -> list[RunResult]:
        """Every run beyond the headline seeds and the controls in ``finals``, each once."""
        seen = {id(r) for _, _, r in self.finals}
        out: dict[int, RunResult] = {}
        for r in [*self.search, *(r for _, _, r in self.ladder), *(r for _, r in self.lstm_sweep)]:
            if id(r) not in seen:
                out.setdefault(id(r), r)
        return list(out.values())


def checkpoint_dir(profile: Profile) -> Path:
    """Where the track caches its finished training runs."""
    return paths.checkpoint_dir(profile.name, TRACK)


def device_for(profile: Profile) -> str:
    """The profile's training device; a CUDA profile without a CUDA device is refused."""
    return profile.require_device()


def train_all(cfg: BayesTrackConfig, root: Path, **common: Any) -> Trained:
    """The headline on every seed, the controls sized to it (the LSTM at each learning rate of its sweep), the
    search candidates on the first seed and every other rung of the scale ladder on the ladder's seeds, all trained
    side by side (:func:`lab.train.ensemble.train_runs`)."""
    s0 = cfg.seeds[0]
    match = n_params(build_model(cfg.headline.model, cfg.V))  # the controls are sized to the headline
    head = [RunSpec(f"transformer-s{s}", cfg.headline.model, cfg.headline.train, s) for s in cfg.seeds]
    mlp = RunSpec("mlp", cfg.mlp, cfg.controls_train, s0, match)
    lrs = cfg.lstm_lrs or (cfg.controls_train.lr,)
    lstms = [RunSpec(f"lstm-lr{lr:g}", cfg.lstm, replace(cfg.controls_train, lr=lr), s0, match) for lr in lrs]
    if cfg.lstm is None:
        lstms = []
    search = [
        head[0] if c == cfg.headline else RunSpec(f"search-{i}", c.model, c.train, s0) for i, c in enumerate(cfg.search)
    ]
    rungs = [
        (c, s, head[cfg.seeds.index(s)] if c == cfg.headline else RunSpec(f"ladder{i}-s{s}", c.model, c.train, s))
        for i, c in enumerate(cfg.ladder)
        for s in (cfg.seeds if c == cfg.headline else cfg.ladder_seeds)
    ]
    specs = head + [mlp] + lstms + search + [r for _, _, r in rungs]
    runs = train_runs(cfg.V, specs, root, **common)  # runs named twice (the headline's) are trained once
    done = dict(zip((id(r) for r in specs), runs, strict=True))
    n = len(head)
    sweep = [(lr, done[id(r)]) for lr, r in zip(lrs, lstms, strict=True)]
    finals = [("transformer", s, r) for s, r in zip(cfg.seeds, runs[:n], strict=True)] + [("mlp", s0, done[id(mlp)])]
    if sweep:
        finals.append(("lstm", s0, min(sweep, key=lambda x: x[1].log["mae_bits"][-1])[1]))
    return Trained(
        runs[:n],
        finals,
        [done[id(r)] for r in search],
        [(c, s, done[id(r)]) for c, s, r in rungs],
        sweep,
    )


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
    root = checkpoint_dir(profile)
    with side_job(side_results, cfg, root, fresh) as side:  # the HMM and Paper II, beside the runs
        runs = train_all(cfg, root, fresh=fresh, progress=progress, device=device)
        extra = side.result()
    hmm, hmm_positions, em, em_curves = (extra[k] for k in ("hmm", "hmm_positions", "em", "em_curves"))

    t_analysis = time.perf_counter()  # on a fresh batch, not the evaluation set used during training
    floor = cfg.floor_bits
    batch = sample_batch(cfg.V, cfg.analysis_sequences, torch.Generator().manual_seed(cfg.analysis_seed))
    mech = mechanisms(cfg, runs.head, batch)
    calibration = calibration_frame([(name, seed, r.model) for name, seed, r in runs.finals], batch)
    paper = {"key_cos_max": PAPER_KEY_COS_MAX, "pc1_min": PAPER_PC1_MIN, "key_cos": PAPER_KEY_COS[0]}
    rungs = [(Rung(c.label, c.model, c.train.lr), s, r) for c, s, r in runs.ladder]
    ladder = ladder_frames(rungs, batch, floor, paper) if rungs else None
    analysis_s = time.perf_counter() - t_analysis

    seeds = frames.seeds_frame(runs.finals)
    verdicts = frames.verdicts_frame(seeds, mech, floor)
    sweep = frames.lstm_sweep_frame(runs.lstm_sweep) if runs.lstm_sweep else None
    summary = summarize(
        cfg,
        seeds,
        runs.head,
        runs.extra,
        verdicts,
        floor=floor,
        analysis_s=analysis_s,
        wall_time_s=time.perf_counter() - t_start,
        extras=companion_fields(ladder[0] if ladder else None, sweep, hmm, em),
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
        "paper_table": frames.paper_table(
            cfg, frames.headline(seeds), hmm.log if hmm else None, hmm.n_params if hmm else 0, em
        ),
    }
    if ladder:
        tables.update(
            scale=ladder[0], scale_layers=ladder[1], scale_verdicts=ladder[2], scale_grid=verdict_grid(ladder[2])
        )
    if sweep is not None:
        tables["lstm_sweep"] = sweep
    if hmm is not None:
        tables.update(hmm_curves=hmm.log, hmm_positions=hmm_positions)
    if em is not None:
        tables.update(paper2=em, paper2_curves=em_curves)
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
    "scale": charts.scale,
    "hmm_positions": charts.hmm_positions,
    "paper2_curves": charts.paper2,
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


# ----------------------------------------------------------------------------- the HMM and Paper II


def hmm_results(cfg: BayesTrackConfig, root: Path, *, fresh: bool, progress: bool) -> tuple[RunResult, pl.DataFrame]:
    """The HMM run and its per-position KL and MAE at the training length and the extrapolated one."""
    h = cfg.hmm
    assert h is not None
    run = train_hmm(h.model, h.train, h.seed, root, K=h.K, K_long=h.K_long, fresh=fresh, progress=progress)
    gen = torch.Generator().manual_seed(cfg.analysis_seed)
    batch = sample_hmm_batch(cfg.analysis_sequences, h.K_long, gen)  # fresh HMMs; positions 1..K are in training
    positions = per_position(run.model, batch).with_columns(
        (pl.col("t") <= h.K).alias("trained_length"), pl.lit(run.n_params).alias("n_params")
    )
    return run, positions


def em_results(cfg: BayesTrackConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Paper II per seed, and both schedules' loss curves."""
    assert cfg.em is not None
    return em_vs_sgd(cfg.em, cfg.em_seeds)


def side_results(cfg: BayesTrackConfig, root: Path, fresh: bool) -> dict[str, Any]:
    """The HMM run and Paper II, one after the other (the track runs this in a worker beside its training runs):
    ``hmm``, ``hmm_positions``, ``em``, ``em_curves`` (None where the recipe skips one)."""
    out: dict[str, Any] = dict.fromkeys(("hmm", "hmm_positions", "em", "em_curves"))
    if cfg.hmm is not None:
        out["hmm"], out["hmm_positions"] = hmm_results(cfg, root, fresh=fresh, progress=False)
    if cfg.em is not None:
        out["em"], out["em_curves"] = em_results(cfg)
    return out


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
    parts = [measure(cfg.headline.model, s, r.model, batch) for s, r in zip(cfg.seeds, head, strict=True)]
    points = parts[0]["points"][0].head(cfg.points_sequences * n_pairs(batch.V))
    m = as_mechanisms(parts, points)
    d_head = cfg.headline.model.d_model // cfg.headline.model.n_head
    keys = m.keys.with_columns(
        pl.lit(d_head).alias("d_head"), pl.lit(random_vectors_abs_cos(d_head)).alias("random_vectors")
    )
    return replace(m, keys=keys)
