"""Activation names, TransformerLens style: the one place that builds and parses them."""

from __future__ import annotations

import re
from collections.abc import Iterable

from lab.errors import LabError

RESIDUAL_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
PATTERN_KIND = "attn.hook_pattern"
KINDS = (*RESIDUAL_KINDS, PATTERN_KIND)  # what every capture adapter (HF family) offers per layer
HEAD_KIND = "attn.hook_z"  # per-head attention outputs before the output projection: lab's GPT only
EMBED_NAME = "hook_embed"
POS_EMBED_NAME = "hook_pos_embed"
FINAL_NAME = "ln_final.hook_normalized"
_NAME_RE = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?P<kind>hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|"
    r"hook_resid_post|attn\.hook_pattern)$"
)
SHORT_KINDS = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
    "pattern": PATTERN_KIND,
    "z": HEAD_KIND,
}
_LAYER_KINDS = (*KINDS, HEAD_KIND)


def act_name(kind: str, layer: int) -> str:
    """The full name of one activation, TransformerLens's ``get_act_name``: ``act_name("resid_pre", 3)`` ->
    ``"blocks.3.hook_resid_pre"``; ``kind`` is a short name (``resid_pre``, ``attn_out``, ``resid_mid``,
    ``mlp_out``, ``resid_post``, ``pattern``, ``z``) or a full kind (``hook_resid_pre``, ``attn.hook_pattern``)."""
    full = SHORT_KINDS.get(kind, kind)
    if full not in _LAYER_KINDS:
        raise LabError(f"unknown activation kind {kind!r}: choose one of {', '.join(SHORT_KINDS)}")
    return f"blocks.{int(layer)}.{full}"


def parse_name(name: str, n_layers: int) -> tuple[int, str]:
    """``"blocks.3.hook_resid_mid"`` -> ``(3, "hook_resid_mid")`` for the names the capture adapters offer
    (:data:`KINDS`); bad names raise :class:`LabError`."""
    m = _NAME_RE.match(name)
    if not m:
        raise LabError(
            f"unknown hook name {name!r}: use blocks.<layer>.<kind> with kind one of "
            f"{', '.join(KINDS)}, or {FINAL_NAME!r} (build lists with lab.interp.names.hook_names)"
        )
    layer = int(m["layer"])
    if layer >= n_layers:
        raise LabError(f"hook name {name!r}: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer, m["kind"]


def hook_names(n_layers: int, kinds: Iterable[str] = RESIDUAL_KINDS, layers: Iterable[int] | None = None) -> list[str]:
    """Full names for ``kinds`` x ``layers`` (all layers by default), layer-major."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in _LAYER_KINDS]
    if bad:
        raise LabError(f"unknown hook kind(s) {bad}: choose from {', '.join(_LAYER_KINDS)}")
    layers = range(n_layers) if layers is None else list(layers)
    return [act_name(k, l) for l in layers for k in kinds]
