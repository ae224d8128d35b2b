"""Benchmarks (not tests): each module's ``run(profile, ...)`` returns a frame of ratios against a baseline measured
in the same run; the track or the CLI decides where it is written."""
