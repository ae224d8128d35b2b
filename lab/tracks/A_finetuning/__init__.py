"""Track A, fine-tuning mechanics: what do ~100 examples of LoRA (and QLoRA) teach a small chat model about a new
answer format, which settings matter (learning rate, rank, batch size x LR), where Adam's moments grow, and what
the model forgets on the way? One main run is shared by six experiments; each sweep changes one thing from it.

- ``config.py``: the main run per profile (``RECIPES``, ``config_for``), the plan of runs, the final adapter's
  location (read by Track B).
- ``run.py``: the outline: score the base model, train or reuse every run and score it, write; the benchmark.
- ``frames.py``: the runs' logs and scores to the tables written to results/A_finetuning/.
- ``charts.py``: those tables to Altair charts (encoding only).
- ``summary.py``: ``FinetuneSummary``, the headline numbers the site page quotes.
"""
