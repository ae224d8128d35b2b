"""``lab bench cost``: measure the cost model's grid here, fit, validate and project (:mod:`lab.bench.costmodel`),
and publish the four tables beside the speed suite in ``results/bench/`` (one result set), with a chart of the
held-out predictions against what was measured."""

from __future__ import annotations

import time
from dataclasses import asdict

import altair as alt
import polars as pl

from lab.bench import costmodel
from lab.plots import style
from lab.profiles import Profile
from lab.results import result_set, write_result

FOLDER = "bench"
QUANTITIES = {"memory_bytes": "peak memory rise (bytes)", "time_s": "seconds per call"}


def validation_chart(df: pl.DataFrame) -> alt.VConcatChart:
    """Held-out measurements (across) against the fitted model's prediction (up), log-log, one panel per quantity,
    coloured by number format; the diagonal is a perfect prediction."""
    panels = []
    for quantity, title in QUANTITIES.items():
        part = df.filter(pl.col("quantity") == quantity)
        if part.is_empty():
            continue
        lo, hi = (
            float(min(part["measured"].min(), part["predicted"].min())),
            float(max(part["measured"].max(), part["predicted"].max())),
        )
        scale = alt.Scale(type="log", domain=[lo, hi])
        points = (
            alt.Chart(part)
            .mark_point(filled=True, size=40, opacity=0.8)
            .encode(
                x=alt.X("measured:Q", scale=scale, title=f"measured {title}"),
                y=alt.Y("predicted:Q", scale=scale, title="predicted"),
                color=alt.Color("precision:N", title="format"),
                shape=alt.Shape("workload:N", title="workload"),
                tooltip=[
                    "model:N",
                    "workload:N",
                    "precision:N",
                    "batch:Q",
                    "seq:Q",
                    "rank:Q",
                    alt.Tooltip("measured:Q", format=".3~s"),
                    alt.Tooltip("predicted:Q", format=".3~s"),
                    alt.Tooltip("rel_error:Q", format="+.0%"),
                ],
            )
        )
        diagonal = (
            alt.Chart(pl.DataFrame({"measured": [lo, hi], "predicted": [lo, hi]}))
            .mark_line(color="#888", strokeDash=[4, 3])
            .encode(x="measured:Q", y="predicted:Q")
        )
        panels.append((diagonal + points).properties(title=title, height=220))
    return style(alt.vconcat(*panels).resolve_scale(color="shared", shape="shared"))


def run(profile: Profile, measurements: pl.DataFrame | None = None) -> dict[str, pl.DataFrame]:
    """Measure (about 8 minutes on ``cpu``), fit, validate, project; publish the four frames."""
    t0 = time.perf_counter()
    frames = costmodel.run(profile, measurements)
    record = dict(
        config={"card": asdict(costmodel.Card()), "shape": asdict(costmodel.QWEN25_7B)},
        seed=None,
        profile=profile.name,
        wall_time_s=time.perf_counter() - t0,
    )
    charts = {"cost_validation": validation_chart}
    with result_set(FOLDER, profile.name):
        for name, frame in frames.items():
            write_result(FOLDER, name, frame, chart=charts.get(name), **record)
    val = frames["cost_validation"]
    for quantity, title in QUANTITIES.items():
        err = val.filter(pl.col("quantity") == quantity)["rel_error"].abs().mean()
        print(f"cost model: held-out mean |error| of {title}: {err:.0%}")
    for row in frames["cost_projection"].iter_rows(named=True):
        fits = "fits" if row["fits"] else "does not fit"
        print(f"  {row['scenario']}: {row['total_gb']:.1f} GB ({fits} in 16 GB), ~{row['tokens_per_s']:,.0f} tokens/s")
    return frames
