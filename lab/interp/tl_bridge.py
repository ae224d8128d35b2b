"""The TransformerLens bridge: a ``HookedTransformer`` with the same weights as an HF model, built offline
with TransformerLens's own weight converters."""

from __future__ import annotations

from typing import Any

import torch

from lab.errors import LabError
from lab.interp.adapters import unwrap

# TransformerLens's weight converter for each HF architecture the bridge supports.
TL_CONVERTERS = {
    "LlamaForCausalLM": "convert_llama_weights",
    "Qwen2ForCausalLM": "convert_qwen2_weights",
    "Gemma2ForCausalLM": "convert_gemma_weights",
    "GPT2LMHeadModel": "convert_gpt2_weights",
    "MistralForCausalLM": "convert_mistral_weights",
    "Qwen3ForCausalLM": "convert_qwen3_weights",
    "Phi3ForCausalLM": "convert_phi3_weights",
    "Gemma3ForCausalLM": "convert_gemma_weights",
}
# HF model_type -> architecture, for the rotary families mapped below.
_ROTARY_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def transformer_lens_config(hf_config: Any, dtype: torch.dtype) -> Any:
    """A ``HookedTransformerConfig`` for an HF config of a family in :data:`TL_CONVERTERS`, built offline.

    TransformerLens's ``HookedTransformer`` builds configs only for its list of hub names (``from_pretrained``
    refuses local folders in 2.18 and in 3.2.1), so the fields are mapped here, following
    its own per-architecture tables in ``loading_from_pretrained.py``.
    """
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    mt = c.model_type
    common: dict[str, Any] = {"dtype": dtype, "device": "cpu", "default_prepend_bos": False}
    if mt in _ROTARY_ARCHITECTURES:
        if getattr(c, "rope_scaling", None):
            raise LabError("the TransformerLens conversion here does not handle rope_scaling")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
        rot = {
            "d_model": c.hidden_size,
            "d_head": head_dim,
            "n_heads": c.num_attention_heads,
            "d_mlp": c.intermediate_size,
            "n_layers": c.num_hidden_layers,
            "n_ctx": min(c.max_position_embeddings, 4096),
            "eps": c.rms_norm_eps,
            "d_vocab": c.vocab_size,
            "n_key_value_heads": kv,
            "normalization_type": "RMS",
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "rotary_dim": head_dim,
            "rotary_base": c.rope_theta,
            "final_rms": True,
            "gated_mlp": True,
            "original_architecture": _ROTARY_ARCHITECTURES[mt],
            **common,
        }
        if mt in ("llama", "qwen2", "phi3"):
            return HookedTransformerConfig(**rot, act_fn=c.hidden_act)
        if mt == "qwen3":
            return HookedTransformerConfig(**rot, act_fn=c.hidden_act, use_qk_norm=True)
        n = c.num_hidden_layers
        local = {"window_size": c.sliding_window, "use_local_attn": True}
        if mt == "mistral":  # every layer attends within the sliding window, when it has one
            if not c.sliding_window:
                return HookedTransformerConfig(**rot, act_fn=c.hidden_act)
            return HookedTransformerConfig(**rot, act_fn=c.hidden_act, attn_types=["local"] * n, **local)
        gemma = {
            "act_fn": c.hidden_activation,
            "attn_scale": float(c.query_pre_attn_scalar) ** 0.5,
            "use_normalization_before_and_after": True,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in c.layer_types[:n]],
            **local,
        }
        if mt == "gemma2":  # sandwich norms, soft-capping, sliding-window layers
            return HookedTransformerConfig(
                **rot,
                **gemma,
                attn_scores_soft_cap=c.attn_logit_softcapping or -1.0,
                output_logits_soft_cap=c.final_logit_softcapping or -1.0,
            )
        return HookedTransformerConfig(
            **rot,
            **gemma,
            use_qk_norm=True,  # gemma3: q/k norms, two rotary bases
            rotary_base_local=c.rope_local_base_freq,
        )
    if mt == "gpt2":
        return HookedTransformerConfig(
            d_model=c.n_embd,
            d_head=c.n_embd // c.n_head,
            n_heads=c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd,
            n_layers=c.n_layer,
            n_ctx=c.n_positions,
            eps=c.layer_norm_epsilon,
            d_vocab=c.vocab_size,
            act_fn=c.activation_function,
            normalization_type="LN",
            positional_embedding_type="standard",
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
            original_architecture="GPT2LMHeadModel",
            **common,
        )
    mapped = ", ".join([*_ROTARY_ARCHITECTURES, "gpt2"])
    raise LabError(f"no TransformerLens config mapping for model_type {mt!r} ({mapped} are mapped)")


def transformer_lens_model(model: Any) -> Any:
    """A TransformerLens ``HookedTransformer`` holding the same weights as the HF ``model`` (a family in
    :data:`TL_CONVERTERS`), converted with TransformerLens's own weight converters and left unprocessed (no
    LayerNorm folding or centring), so that activations compare one to one."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions as wc

    hf = unwrap(model)
    cfg = transformer_lens_config(hf.config, next(hf.parameters()).dtype)
    convert = getattr(wc, TL_CONVERTERS[cfg.original_architecture])
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    tl.eval()
    return tl
