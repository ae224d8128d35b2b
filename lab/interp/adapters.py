"""One capture adapter per HF architecture family: which module holds each TransformerLens name.

Nothing else in the lab knows HF module paths. ``attn_out`` and ``mlp_out`` are always *the tensors added to the
residual stream*, so that ``resid_pre + attn_out = resid_mid`` and ``resid_mid + mlp_out = resid_post`` hold
exactly on every family:

- Llama / SmolLM2, Qwen2, Mistral, Qwen3: pre-norm blocks ``input_layernorm -> self_attn``,
  ``post_attention_layernorm -> mlp``. (Qwen3's q/k norms sit inside ``self_attn``; Mistral's sliding window is
  an attention mask: neither moves a name.)
- Phi-3: the Llama layout with a dropout on each sublayer output before the add; ``hook_attn_out`` and
  ``hook_mlp_out`` are those dropouts' outputs (equal to the sublayer outputs in eval mode).
- Gemma2 and Gemma 3 (text): sandwich norms. The sublayer outputs are normed *before* the residual add, so
  ``hook_attn_out`` = ``post_attention_layernorm(self_attn(...))``, ``hook_mlp_out`` =
  ``post_feedforward_layernorm(mlp(...))``, and ``hook_resid_mid`` is the input of ``pre_feedforward_layernorm``.
  (In Llama ``post_attention_layernorm`` is the *pre*-MLP norm: the same HF name means different things.)
- GPT-2: ``transformer.h[l]`` with ``ln_1 -> attn``, ``ln_2 -> mlp``; final ``transformer.ln_f``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lab.errors import LabError
from lab.interp.hooks import Site
from lab.interp.names import FINAL_NAME, PATTERN_KIND, parse_name


class Adapter:
    """Maps TransformerLens names to the modules of one architecture family. Subclasses set the paths."""

    family = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model  # the *ForCausalLM module (peft wrappers already removed)

    # the family-specific parts ------------------------------------------------------------------
    def body(self) -> nn.Module:
        """The transformer without the LM head (forward returns hidden states)."""
        return self.model.model

    def layers(self) -> Sequence[nn.Module]:
        return self.model.model.layers

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def sites(self, layer: int) -> dict[str, Site]:
        """Kind (e.g. ``"hook_attn_out"``) -> where it is read in block ``layer``."""
        raise NotImplementedError

    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    # shared ----------------------------------------------------------------------------------------
    def n_layers(self) -> int:
        return len(self.layers())

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ Gemma2's logit soft-capping): residual ``(..., d)`` -> logits ``(..., V)``."""
        return softcapped(self.model, self.model.get_output_embeddings()(self.final_norm()(resid)))

    def site(self, name: str) -> Site:
        if name == FINAL_NAME:
            return Site(self.final_norm(), "output")
        layer, kind = parse_name(name, self.n_layers())
        return self.sites(layer)[kind]


class LlamaAdapter(Adapter):
    """Llama / SmolLM2, Qwen2, Mistral and Qwen3:
    ``input_layernorm -> self_attn``, ``post_attention_layernorm -> mlp``."""

    family = "llama"
    model_types = ("llama", "qwen2", "mistral", "qwen3")

    def sites(self, layer: int) -> dict[str, Site]:
        block = self.layers()[layer]
        return {
            "hook_resid_pre": Site(block, "input"),
            "hook_attn_out": Site(block.self_attn, "output"),
            "hook_resid_mid": Site(block.post_attention_layernorm, "input"),  # the pre-MLP norm's input
            "hook_mlp_out": Site(block.mlp, "output"),
            "hook_resid_post": Site(block, "output"),
            PATTERN_KIND: Site(block.self_attn, "weights"),
        }


class Phi3Adapter(LlamaAdapter):
    """Phi-3: Llama's layout; each sublayer's output passes a dropout (``resid_attn_dropout`` /
    ``resid_mlp_dropout``) before the residual add, and those dropouts' outputs are ``attn_out`` / ``mlp_out``."""

    family = "phi3"
    model_types = ("phi3",)

    def sites(self, layer: int) -> dict[str, Site]:
        block = self.layers()[layer]
        return {
            **super().sites(layer),
            "hook_attn_out": Site(block.resid_attn_dropout, "output"),
            "hook_mlp_out": Site(block.resid_mlp_dropout, "output"),
        }


class Gemma2Adapter(Adapter):
    """Gemma2 and Gemma 3 (text): sandwich norms; ``attn_out`` / ``mlp_out`` are the post-sublayer norms' outputs."""

    family = "gemma2"
    model_types = ("gemma2", "gemma3_text")

    def sites(self, layer: int) -> dict[str, Site]:
        block = self.layers()[layer]
        return {
            "hook_resid_pre": Site(block, "input"),
            "hook_attn_out": Site(block.post_attention_layernorm, "output"),
            "hook_resid_mid": Site(block.pre_feedforward_layernorm, "input"),
            "hook_mlp_out": Site(block.post_feedforward_layernorm, "output"),
            "hook_resid_post": Site(block, "output"),
            PATTERN_KIND: Site(block.self_attn, "weights"),
        }


class GPT2Adapter(Adapter):
    """GPT-2: ``transformer.h[l]`` with ``ln_1 -> attn``, ``ln_2 -> mlp``; final ``transformer.ln_f``."""

    family = "gpt2"
    model_types = ("gpt2",)

    def body(self) -> nn.Module:
        return self.model.transformer

    def layers(self) -> Sequence[nn.Module]:
        return self.model.transformer.h

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def n_heads(self) -> int:
        return int(self.model.config.n_head)

    def sites(self, layer: int) -> dict[str, Site]:
        block = self.layers()[layer]
        return {
            "hook_resid_pre": Site(block, "input"),
            "hook_attn_out": Site(block.attn, "output"),
            "hook_resid_mid": Site(block.ln_2, "input"),
            "hook_mlp_out": Site(block.mlp, "output"),
            "hook_resid_post": Site(block, "output"),
            PATTERN_KIND: Site(block.attn, "weights"),
        }


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, Phi3Adapter, Gemma2Adapter, GPT2Adapter)


def unwrap(model: Any) -> nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def adapter_for(model: Any) -> Adapter:
    """The adapter for ``model``'s architecture family; unsupported families raise :class:`LabError`."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    raise LabError(
        f"no capture adapter for model_type {model_type!r}: supported are {supported} "
        "(add an Adapter subclass in lab/interp/adapters.py for a new family)"
    )


def softcapped(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` after the model's final soft-capping (Gemma2), or unchanged where the family has none."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
