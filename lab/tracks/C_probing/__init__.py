"""Track C, the residual stream: what it carries layer by layer (norms, the logit lens, similarity between
positions), what attention and the MLPs each write into it and what removing one costs, which tools read the same
stream on which architecture, and what capturing it costs.

- ``config.py``: the recipe per profile (:class:`ProbingConfig`).
- ``run.py``: the outline, ``run(profile) -> ProbingSummary``, and ``benchmark(profile)`` (``lab bench capture``),
  writing results/C_probing/.
- ``frames.py``: the per-prompt analyses of lab.interp.residual, their aggregates, and the architecture table.
- ``charts.py``: frame -> Altair chart.
- ``summary.py``: :class:`ProbingSummary`, the headline numbers the residual-stream page quotes.
"""
