"""Interpretability: activation names (:mod:`.names`), capture (:mod:`.capture`), interventions
(:mod:`.interventions`), attention and residual-stream analyses, the wind tunnel's geometry
(:mod:`.windtunnel`), transcoders and attribution graphs (:mod:`.transcoders`, :mod:`.circuits`) and the
TransformerLens bridge (:mod:`.tl_bridge`)."""
