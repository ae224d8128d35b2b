"""Track B, attention: where heads look (entropy, first-token sinks, previous-token and induction heads), what
capturing every layer's attention costs in memory, and how Track A's LoRA fine-tune changes the patterns.

- ``config.py``: the recipe per profile (:class:`AttentionConfig`), and Track A's adapter as the track's input.
- ``run.py``: the outline, ``run(profile) -> AttentionSummary``, writing results/B_attention/.
- ``frames.py``: the frames (head scores, patterns, memory, base vs fine-tuned) built through lab.interp.attention.
- ``charts.py``: frame -> Altair chart.
- ``summary.py``: :class:`AttentionSummary`, the headline numbers the attention page quotes.
"""
