"""Track pretrain: does a tiny character-level GPT, trained on a 2-core CPU with nanoGPT's recipe, reach nanoGPT's
published validation loss on Shakespeare plays it never saw? And what do its loss curve, gradient norms and a
RoPE-vs-learned position-embedding ablation show along the way?

- ``config.py``: the recipe per profile (``RECIPES``, ``config_for``) and nanoGPT's reference number.
- ``run.py``: the outline: train or resume, summarise, write; the ablation and the throughput benchmark.
- ``frames.py``: training logs to the tables written to results/pretrain/.
- ``charts.py``: those tables to Altair charts (encoding only).
- ``summary.py``: ``PretrainSummary``, the headline numbers the site page quotes.
"""
