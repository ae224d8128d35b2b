"""Track E — circuit-informed fine-tuning: can a small model learn invented words from a LoRA fine-tune, and do
its attribution graphs show when? A synthetic constraint corpus (WS2), LoRA checkpoints at 25/50/75/100 % of
training (WS3), and circuit-tracer attribution graphs of the base model and every checkpoint (WS1/WS5), compared
across checkpoints and used as an early-stopping rule against the validation loss.

Per checkpoint and constraint type: held-out accuracy (the right concept's log-probability beats every
alternative's), mean margin, validation loss. Per-layer transcoders are trained once on the base model (a cached
build, ``lab transcoders build``); each graph prompt is traced at each checkpoint, pruned with circuit-tracer's
defaults, and compared (feature-node Jaccard, edge-weight correlation) with bootstrap intervals and sign-flip
tests; the circuit rule stops once the graphs stop changing, the loss rule once the validation loss rises.

- ``config.py``: the recipe per profile (corpus size, LoRA run, transcoders, graph prompts, stopping threshold).
- ``run.py``: the outline (train -> score -> transcoders -> graphs -> frames -> summary -> write), its cached
  stages, and ``build_transcoders`` for the CLI.
- ``frames.py``: scores and graph records to frames: checkpoints, graph comparisons, statistics, stopping rules.
- ``charts.py``: those frames drawn (accuracy and loss, transcoder quality, circuit metrics, one graph).
- ``summary.py``: ``CircuitsSummary``, the headline numbers the site quotes.

Writes to results/E_circuits/: ``checkpoints`` (+ chart), ``prompts``, ``loss`` (+ chart), ``transcoders``
(+ chart), ``graphs``, ``circuit_compare``, ``circuit_stats`` (+ chart), ``circuit_tests``, ``stopping``,
``stopping_sweep``, ``graph_edges`` / ``graph_nodes`` (+ chart of one graph per stage), ``summary``, and
circuit-tracer's own JSON of the seed prompts' pruned graphs (base and final model) under ``graphs/``.
"""
