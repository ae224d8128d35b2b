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

import operator
from collections.abc import Iterable, Sequence
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
    positions_attr = "max_position_embeddings"  # the config field holding the longest input the model takes

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

    def n_positions(self) -> int | None:
        """The most tokens one input may hold (the config's position limit), or ``None`` where it names none."""
        limit = getattr(self.model.config, self.positions_attr, None)
        return int(limit) if limit else None

    def check_heads(self, heads: Any) -> list[int] | None:
        """``heads`` as a list of distinct query-head indices of this model (``None``: all heads), or
        :class:`LabError` naming the fix."""
        n = self.n_heads()
        if heads is None:
            return None
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
            raise LabError(f"heads={heads!r}: pass a list of query head indices, e.g. heads=[0, {n - 1}]")
        listed = list(heads)
        if not listed:
            raise LabError(
                f"heads=[] selects no head: list at least one query head (0..{n - 1}), or pass heads=None for all {n}"
            )
        try:
            if any(isinstance(h, bool) for h in listed):
                raise TypeError
            index = [operator.index(h) for h in listed]
        except TypeError:
            raise LabError(
                f"heads={listed!r}: head indices must be whole numbers in 0..{n - 1}, e.g. heads=[0, {n - 1}]"
            ) from None
        if any(h < 0 or h >= n for h in index):
            raise LabError(
                f"heads={index}: the model has {n} query heads (0..{n - 1}); list indices in that range "
                "(negative ones do not count from the end)"
            )
        twice = sorted({h for h in index if index.count(h) > 1})
        if twice:
            raise LabError(f"heads={index} lists head(s) {twice} more than once: list each query head once")
        return index

    def check_input(self, input_ids: Any, attention_mask: Any = None) -> None:
        """Raise :class:`LabError` naming the fix unless ``input_ids`` is a ``(batch, tokens)`` tensor of this
        model's token ids that fits its positions, and ``attention_mask`` (if any) has the same shape; no compute."""
        if not isinstance(input_ids, torch.Tensor):
            raise LabError(
                f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}: "
                "wrap the ids, e.g. torch.tensor([ids])"
            )
        shape = tuple(input_ids.shape)
        if input_ids.dim() == 1:
            raise LabError(f"input_ids must be (batch, tokens), got shape {shape}: add a batch axis")
        if input_ids.dim() != 2:
            raise LabError(
                f"input_ids must be (batch, tokens), got shape {shape}: pass a 2-D tensor, one row of token ids "
                "per sequence"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise LabError(
                f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}: encode text "
                "with the model's own tokenizer, or convert whole-number ids with input_ids.long()"
            )
        if input_ids.numel() == 0:
            raise LabError(f"input_ids of shape {shape} holds no tokens: pass at least one row of at least one token")
        limit = self.n_positions()
        if limit is not None and shape[1] > limit:
            raise LabError(
                f"input_ids has {shape[1]} tokens, more than the model's {limit} positions "
                f"(config.{self.positions_attr}): pass at most {limit} tokens (truncate or split the text)"
            )
        n_rows = self.model.get_input_embeddings().num_embeddings
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= n_rows:
            raise LabError(
                f"token ids must lie in 0..{n_rows - 1} (the model's vocabulary), got {low}..{high}: "
                "encode text with the model's own tokenizer"
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape
        ):
            got = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, torch.Tensor)
                else type(attention_mask).__name__
            )
            raise LabError(
                f"attention_mask must be a tensor shaped like input_ids {shape}, got {got}: pass the mask the "
                "tokenizer returned with these ids (1 = token, 0 = padding), or attention_mask=None"
            )

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
    positions_attr = "n_positions"

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
