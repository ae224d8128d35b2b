"""The activations per-layer transcoders learn from: each decoder layer's MLP input and output (circuit-tracer's
``mlp.hook_in`` / ``mlp.hook_out`` for Llama-style models), every layer from one forward pass of the frozen model.

The training batches are harvested in bf16 (:func:`harvest_precision`: autocast, the matmuls in bf16, the norms
and the residual stream fp32; :func:`bf16_layer_weights`: the layers' weights held in bf16 meanwhile). Measured on
SmolLM2-135M (``lab bench harvest`` reports it with the speed, ~2x): the MLP inputs move by ~1.0 % and the outputs
by ~1.4 % of their norm (means over layers): an FVU floor of ~2e-4 under a perfect transcoder, far below the
transcoders' own (a 60-step cpu build: 0.448 mean, the same within 5e-5 as the fp32 dense build's). The held-out
harvest that FVU is measured on stays fp32.
"""

from __future__ import annotations

import contextlib

import torch

from lab.errors import LabError


def mlp_modules(model) -> list:
    """Each decoder layer's MLP module (Llama / Qwen2 / Gemma2 layout: ``model.model.layers[i].mlp``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LabError(f"{type(model).__name__} has no model.layers[i].mlp: transcoders support Llama-style models")
    return [layer.mlp for layer in layers]


@torch.no_grad()
def mlp_activations(
    model, input_ids: torch.Tensor, *, full_forward: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the MLP's input and output at every position but the first: two lists of (tokens, d_model),
    float32, from one forward pass that feeds every layer.

    The pass stops at the last layer (``model.model``: the final norm and the LM head, a fifth of SmolLM2's
    FLOPs, are no part of any MLP's activations); ``full_forward`` runs the whole model, as the harvest did before
    (the speed benchmark's baseline). The number format is the caller's: inside :func:`harvest_precision` the
    matmuls run in bf16.
    """
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def grab(_m, args, out):
        ins.append(args[0][:, 1:].reshape(-1, args[0].shape[-1]).float())
        outs.append(out[:, 1:].reshape(-1, out.shape[-1]).float())

    handles = [m.register_forward_hook(grab) for m in mlp_modules(model)]
    try:
        if full_forward:
            model(input_ids=input_ids)
        else:
            model.model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ins, outs


def harvest_precision(precision: str, device: str = "cpu"):
    """The context one training batch is harvested in: bf16 autocast for ``"bf16"``, none for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


@contextlib.contextmanager
def bf16_layer_weights(model, precision: str = "bf16"):
    """For the duration, the decoder layers' ``nn.Linear`` weights held as bf16 copies (for ``"bf16"``; ``"fp32"``
    changes nothing), the originals put back after. Autocast casts them to bf16 on every forward otherwise (~7 % of
    SmolLM2's bf16 forward); the numbers are the same, autocast rounds them the same way. The LM head (tied to the
    embedding) is outside the layers and untouched."""
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] if precision != "fp32" else []
    originals = [m.weight for m in linears]
    try:
        for m in linears:
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
        yield model
    finally:
        for m, w in zip(linears, originals, strict=True):
            m.weight = w
