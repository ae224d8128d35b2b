"""Track D: the bijection wind tunnel of "The Bayesian Geometry of Transformer Attention" (arXiv:2512.22471),
reproduced on a CPU. Does a small transformer match the exact Bayesian posterior when it is known in closed form,
do context-blind and recurrent controls, and do the paper's mechanistic claims (key geometry, routing, a
low-dimensional belief manifold, the logit lens, ablations) hold in our models?

- ``config.py``: the recipes per profile (headline transformer, controls, search) and the paper's numbers.
- ``run.py``: the outline (train or load every run, analyse, build frames, summarise, write results/D_bayes/),
  and the analyses that run the trained models (calibration, the mechanistic measurements).
- ``frames.py``: every table (seeds, curves, search, mechanism summary, verdicts) and chart aggregation.
- ``charts.py``: the Altair charts of those frames.
- ``summary.py``: :class:`BayesSummary`, the headline numbers the track page quotes.
"""
