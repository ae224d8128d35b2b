"""Interventions on a forward pass: replace named activations, e.g. zero-ablate sublayer outputs.

One mechanism for every model: lab's GPT replaces at its hook points, HF models at the sites their capture
adapter names (:mod:`lab.interp.adapters`); both through :func:`lab.interp.hooks.register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lab.errors import LabError
from lab.interp.adapters import adapter_for
from lab.interp.hooks import Site, hooks_removed, register
from lab.models.gpt import GPT

ABLATABLE_KINDS = ("hook_attn_out", "hook_mlp_out")  # the sublayer outputs added to the residual stream


def site_of(model: Any, name: str) -> Site:
    """Where activation ``name`` lives: a hook point's output on lab's GPT, the adapter's site on HF models."""
    if isinstance(model, GPT):
        points = model.hook_points()
        if name not in points:
            raise LabError(f"unknown activation name {name!r}: see lab.models.gpt.hook_names({model.cfg.n_layer})")
        return Site(points[name], "output")
    return adapter_for(model).site(name)


@contextmanager
def replaced(model: Any, replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Within the block, every forward pass of ``model`` uses ``fn(activation)`` in place of each named activation."""
    handles = [register(site_of(model, name), fn) for name, fn in replacements.items()]
    with hooks_removed(handles):
        yield


def filled(index: Any = ..., value: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ablation ``fn``: a copy of the activation with its ``index`` part (all of it by default) set to zero, or
    to ``value`` broadcast over it (mean-ablation with a batch mean)."""

    def fill(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = 0.0 if value is None else value.expand_as(x[index])
        return x

    return fill


def zero_ablated(model: Any, names: Iterable[str]) -> Any:
    """Context: the named sublayer outputs (``hook_attn_out`` / ``hook_mlp_out``) set to zero, i.e. those sublayers
    removed from the residual stream."""
    names = list(names)
    for name in names:
        if not name.endswith(ABLATABLE_KINDS):
            raise LabError(f"can only zero-ablate {' / '.join(ABLATABLE_KINDS)}, not {name!r}")
    return replaced(model, {name: filled() for name in names})


def run_with_ablation(
    model: Any, input_ids: torch.Tensor, names: Iterable[str], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (CPU) of an HF model's forward pass with the named sublayer outputs zero-ablated; bad inputs raise
    :class:`LabError` before it runs (as :func:`lab.interp.capture.capture`'s)."""
    adapter_for(model).check_input(input_ids, attention_mask)
    with zero_ablated(model, names), torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.detach().to("cpu")
