"""Benchmarks (not tests): each module's ``run(profile, ...)`` returns a frame of ratios against a baseline measured
in the same run; the track or the CLI decides where it is written."""

from types import SimpleNamespace

from lab.validation import Problems


def check_counts(**counts: int) -> None:
    """Every timed count (steps, repetitions, tokens) an integer >= 1 and a ``warmup`` >= 0, before anything is
    timed (a ratio over zero timed steps divides by zero); else one :class:`LabError` listing the problems."""
    checks = Problems(SimpleNamespace(**counts))
    for name in counts:
        checks.integer(name, minimum=0 if name == "warmup" else 1)
    checks.raise_if_any("bad benchmark settings")
