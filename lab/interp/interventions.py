"""Interventions on a forward pass: zero-ablation of sublayer outputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lab.errors import LabError
from lab.interp.capture import adapter_for, hooks_removed
from lab.interp.names import parse_name


# ----------------------------------------------------------------------------- interventions


def run_with_ablation(model: Any, input_ids: torch.Tensor, names: Iterable[str],
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a forward pass with the named sublayer outputs (``hook_attn_out`` / ``hook_mlp_out``) set to zero,
    i.e. with those sublayers removed from the residual stream."""
    ad = adapter_for(model)
    handles = []
    for name in names:
        _, kind = parse_name(name, ad.n_layers())
        if kind not in ("hook_attn_out", "hook_mlp_out"):
            raise LabError(f"can only zero-ablate hook_attn_out / hook_mlp_out, not {name!r}")
        site = ad.site(name)

        def zero(mod, args, output):
            if isinstance(output, tuple):
                return (torch.zeros_like(output[0]), *output[1:])
            return torch.zeros_like(output)
        handles.append(site.module.register_forward_hook(zero))
    with hooks_removed(handles), torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.detach().to("cpu")
