"""Interpretability: activation names (:mod:`.names`), the per-family adapters that map them to HF modules
(:mod:`.adapters`), capture (:mod:`.capture`), reading or replacing an activation at a site (:mod:`.hooks`) and
the interventions built on it (:mod:`.interventions`), attention and residual-stream analyses, the wind tunnel's
geometry (:mod:`.windtunnel`), transcoders (:mod:`.transcoders`, trained through :mod:`.topk`'s TopK-sparse step
on activations harvested by :mod:`.harvest`), attribution graphs (:mod:`.circuits`) and the TransformerLens bridge
(:mod:`.tl_bridge`). Nothing here knows a track."""
