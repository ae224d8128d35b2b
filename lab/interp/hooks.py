"""Reading and replacing one activation at a :class:`Site`: the one hook mechanism behind capture and interventions.

A site is a module and a slot: on lab's GPT every name is a hook point's output; on HF models the capture
adapters (:mod:`lab.interp.adapters`) say which module's input or output holds each name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lab.errors import LabError

# fn(activation) -> None reads it; a tensor returned replaces it.
HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Site:
    """Where a hook name lives in a model: a module and whether we read its input or its output."""

    module: nn.Module
    slot: str  # "input" (first positional argument or ``hidden_states``), "output" (tensor or first of a tuple),
    #            "weights" (second element of the attention module's output tuple; read only)


def register(site: Site, fn: HookFn) -> Any:
    """Run ``fn`` on the activation at ``site`` on every forward pass; returns the removable handle."""
    if site.slot == "input":

        def pre_hook(mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    if site.slot == "output":

        def hook(mod, args, output):
            new = fn(output[0] if isinstance(output, (tuple, list)) else output)
            if new is None or not isinstance(output, (tuple, list)):
                return new
            return (new, *output[1:])

        return site.module.register_forward_hook(hook)
    if site.slot == "weights":

        def weights_hook(mod, args, output):
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                raise LabError(
                    f"{type(mod).__name__} returned no attention weights: it must run with eager "
                    "attention (lab.interp.capture switches it; report this as a bug)"
                )
            if fn(output[1]) is not None:
                raise LabError(
                    "an HF model's attention weights can be read, not replaced (its output is already "
                    "computed when they are returned)"
                )

        return site.module.register_forward_hook(weights_hook)
    raise LabError(f"unknown site slot {site.slot!r}: input, output or weights")


@contextmanager
def hooks_removed(handles: list[Any]) -> Iterator[None]:
    """Remove ``handles`` when the block ends, also on errors."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
