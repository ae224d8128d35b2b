"""Track D's headline numbers: the fields of ``results/D_bayes/summary.parquet`` that the page quotes as
``value("D_bayes/summary", "<field>")``."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from lab.results import Summary
from lab.tracks.D_bayes.config import PAPER_MAE, BayesTrackConfig
from lab.tracks.D_bayes.frames import first_at, headline
from lab.train.em_attention import speedup
from lab.train.windtunnel import RunResult

# The numbers the speed suite compares before and after a change of how the track computes
# (results/bench/headlines.parquet).
HEADLINES = (
    "mae_mean",
    "mae_std",
    "mlp_mae",
    "lstm_mae",
    "verdicts_reproduced",
)


@dataclass(frozen=True)
class BayesSummary(Summary):
    """One row: the headline transformer over seeds, the controls, the paper's numbers, and what it took."""

    V: int  # values per bijection
    n_seeds: int  # seeds of the headline transformer
    n_params: int  # its parameters
    n_layer: int
    n_head: int
    d_model: int
    steps: int  # its training steps
    batch_size: int
    lr: float  # its peak learning rate
    mae_mean: float  # entropy MAE (bits) at the end of training, mean over seeds: the headline number
    mae_std: float  # ... sample standard deviation over seeds (0 for one seed)
    mae_min: float
    mae_max: float
    kl_mean: float  # KL(posterior ‖ model) in bits, mean over seeds
    mae_mean_entropy_mean: float  # the authors' variant of the MAE (entropy of the mean prediction), mean over seeds
    mass_eliminated_mean: float  # probability on values already revealed, mean over seeds
    train_s_mean: float  # seconds of training per seed
    train_s_max: float
    seeds_at_target: int  # seeds that reached target_mae within target_train_s seconds
    train_s_to_target_max: float  # slowest seed's seconds to target_mae (NaN when none reached it)
    target_mae: float  # bits
    mlp_mae: float  # the context-blind MLP control's final entropy MAE (bits)
    mlp_params: int
    lstm_mae: float  # the LSTM control's (NaN when the recipe has none)
    lstm_params: int  # 0 when the recipe has no LSTM
    floor_bits: float  # analytic entropy MAE of a uniform guess over the V values
    paper_transformer_mae: float  # the paper's numbers (config.PAPER_MAE)
    paper_mlp_mae: float
    paper_lstm_mae: float
    wall_time_s: float  # this invocation (short when the runs were cached)
    analysis_s: float  # calibration and mechanistic analyses
    cached_runs: int  # training runs loaded from the cache instead of trained
    total_train_s: float  # training seconds of every run (cached ones count their original time)
    verdicts_reproduced: int  # claims of the verdicts table judged "reproduced"
    ladder_sizes: int  # rungs of the scale ladder (0: none)
    ladder_params_min: int  # its smallest and largest parameter counts
    ladder_params_max: int
    ladder_deep_sizes: int  # rungs with 4 layers or more
    lstm_lr: float  # the learning rate the LSTM's sweep chose (NaN without an LSTM)
    hmm_kl_bits: float  # the HMM run at the end of training, KL to the posterior at the training length (NaN: none)
    hmm_mae_bits: float  # ... entropy MAE there
    hmm_long_kl_bits: float  # ... KL at the extrapolated length
    hmm_long_mae_bits: float
    hmm_params: int
    hmm_train_s: float
    em_steps_mean: float  # Paper II: steps for the EM-like schedule to reach SGD's final loss, mean over seeds
    em_speedup: float  # ... SGD's steps over that mean (the authors' speed-up: 1000 / mean steps)


def summarize(
    cfg: BayesTrackConfig,
    seeds: pl.DataFrame,
    head: list[RunResult],
    extra: list[RunResult],
    verdicts: pl.DataFrame,
    *,
    floor: float,
    analysis_s: float,
    wall_time_s: float,
    extras: dict[str, float | int],
) -> BayesSummary:
    """The summary row.

    Args:
        cfg: The track's config.
        seeds: :func:`~lab.tracks.D_bayes.frames.seeds_frame` of the headline seeds and the controls.
        head: The headline runs, one per seed (their logs give the time to target).
        extra: The search runs that are not headline runs (they count in ``cached_runs`` and ``total_train_s``).
        verdicts: :func:`~lab.tracks.D_bayes.frames.verdicts_frame`.
        floor: The analytic floor (bits).
        analysis_s: Seconds of analysis.
        wall_time_s: Seconds of this invocation so far.
        extras: The ladder's, LSTM sweep's, HMM's and Paper II's fields (:func:`companion_fields`).
    """
    h = headline(seeds)
    model, train = cfg.headline.model, cfg.headline.train
    at_target = [first_at(r.log, cfg.target_mae, "train_s") for r in head]
    return BayesSummary(
        V=cfg.V,
        n_seeds=len(cfg.seeds),
        n_params=h["n_params"],
        n_layer=model.n_layer,
        n_head=model.n_head,
        d_model=model.d_model,
        steps=train.steps,
        batch_size=train.batch_size,
        lr=train.lr,
        mae_mean=h["mae_mean"],
        mae_std=h["mae_std"],
        mae_min=h["mae_min"],
        mae_max=h["mae_max"],
        kl_mean=h["kl_mean"],
        mae_mean_entropy_mean=h["mae_mean_entropy_mean"],
        mass_eliminated_mean=h["mass_eliminated_mean"],
        train_s_mean=h["train_s_mean"],
        train_s_max=h["train_s_max"],
        seeds_at_target=sum(t is not None and t <= cfg.target_train_s for t in at_target),
        train_s_to_target_max=max((t for t in at_target if t is not None), default=float("nan")),
        target_mae=cfg.target_mae,
        mlp_mae=h["mlp_mae"],
        mlp_params=h["mlp_params"],
        lstm_mae=h["lstm_mae"],
        lstm_params=h["lstm_params"],
        floor_bits=floor,
        paper_transformer_mae=PAPER_MAE["transformer"],
        paper_mlp_mae=PAPER_MAE["mlp"],
        paper_lstm_mae=PAPER_MAE["lstm"],
        wall_time_s=wall_time_s,
        analysis_s=analysis_s,
        cached_runs=int(seeds["cached"].sum()) + sum(r.cached for r in extra),
        total_train_s=float(seeds["train_s"].sum()) + sum(r.train_time_s for r in extra),
        verdicts_reproduced=int((verdicts["verdict"] == "reproduced").sum()),
        **extras,
    )


def companion_fields(
    scale: pl.DataFrame | None,
    lstm_sweep: pl.DataFrame | None,
    hmm: RunResult | None,
    em: pl.DataFrame | None,
) -> dict[str, float | int]:
    """The summary's fields of the scale ladder, the LSTM sweep, the HMM run and Paper II (NaN / 0 where skipped)."""
    nan = float("nan")
    sizes = (
        scale.group_by("size").agg(pl.col("n_params").first(), pl.col("n_layer").first()) if scale is not None else None
    )
    last = hmm.log.row(-1, named=True) if hmm is not None else {}
    chosen = lstm_sweep.filter(pl.col("chosen")) if lstm_sweep is not None and lstm_sweep.height else None
    return {
        "ladder_sizes": sizes.height if sizes is not None else 0,
        "ladder_params_min": int(sizes["n_params"].min()) if sizes is not None else 0,
        "ladder_params_max": int(sizes["n_params"].max()) if sizes is not None else 0,
        "ladder_deep_sizes": int((sizes["n_layer"] >= 4).sum()) if sizes is not None else 0,
        "lstm_lr": float(chosen["lr"][0]) if chosen is not None else nan,
        "hmm_kl_bits": last.get("kl_bits", nan),
        "hmm_mae_bits": last.get("mae_bits", nan),
        "hmm_long_kl_bits": last.get("long_kl_bits", nan),
        "hmm_long_mae_bits": last.get("long_mae_bits", nan),
        "hmm_params": hmm.n_params if hmm is not None else 0,
        "hmm_train_s": hmm.train_time_s if hmm is not None else nan,
        "em_steps_mean": float(em["em_steps_to_sgd_final"].mean()) if em is not None else nan,
        "em_speedup": speedup(em) if em is not None else nan,
    }
