"""Opt-in activation capture with TransformerLens names, one adapter per architecture family.

Names (``l`` = layer index, as in TransformerLens):

- ``blocks.{l}.hook_resid_pre``   residual stream entering block ``l`` (``(B, T, d)``)
- ``blocks.{l}.hook_attn_out``    what the attention sublayer adds to the residual stream
- ``blocks.{l}.hook_resid_mid``   residual stream after the attention add, before the MLP
- ``blocks.{l}.hook_mlp_out``     what the MLP sublayer adds to the residual stream
- ``blocks.{l}.hook_resid_post``  residual stream leaving block ``l`` (= ``hook_resid_pre`` of ``l + 1``)
- ``blocks.{l}.attn.hook_pattern`` attention probabilities per *query* head, ``(B, n_heads, T_query, T_key)``
- ``ln_final.hook_normalized``    the final norm's output (weight included): what the unembedding reads.
  (TransformerLens's RMSNorm takes its ``hook_normalized`` *before* the learned scale, and folds that scale into
  the unembedding by default; for RMSNorm models ours equals TransformerLens's times ``ln_final.w``.)

``attn_out`` and ``mlp_out`` are always *the tensors added to the residual stream*, so ``resid_pre + attn_out =
resid_mid`` and ``resid_mid + mlp_out = resid_post`` hold exactly on every family; :mod:`lab.interp.adapters` says
where each name lives per family (Llama, Qwen2, Mistral, Qwen3, Phi-3, Gemma2, Gemma 3, GPT-2).

Under grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) patterns are per query head.
sdpa attention returns no weights, so pattern capture switches the model to eager attention for the one
forward pass and restores the previous implementation afterwards, also on errors.

Captured tensors are detached CPU copies. Pattern capture estimates its memory first (batch x layers x
heads x T^2 x bytes) and refuses past ``max_bytes`` with a :class:`LabError` naming the ways out that fit (no
streaming offered when even one layer's patterns exceed the budget); with ``stream_to=folder`` every requested
tensor is written to ``folder/<name>.safetensors`` as soon as its layer has run and dropped from memory. Bad inputs
(empty, float or out-of-vocabulary ids, more tokens than the model's positions, a mask of another shape, empty or
repeated heads, a budget that is not a positive integer) are refused the same way, before any forward pass.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lab.errors import LabError
from lab.interp.adapters import adapter_for, softcapped, unwrap
from lab.interp.hooks import hooks_removed, register
from lab.interp.names import FINAL_NAME, KINDS, PATTERN_KIND, act_name, hook_names, parse_name

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of captured tensors held in memory at once


# ----------------------------------------------------------------------------- memory


def pattern_bytes(batch: int, n_layers: int, n_heads: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of captured attention patterns: ``batch x layers x heads x T^2 x itemsize``."""
    return batch * n_layers * n_heads * seq_len * seq_len * torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class CaptureEstimate:
    """What a capture will hold in memory (bytes), computed before any forward pass."""

    patterns: int  # all requested patterns together
    pattern_per_layer: int  # one layer's patterns (what streaming holds at once)
    residuals: int
    logits: int
    seq_len: int
    n_pattern_layers: int
    n_heads: int
    batch: int = 1
    itemsize: int = 4  # bytes per captured number (the model's dtype)

    def held(self, streaming: bool) -> int:
        """Bytes held at the peak: everything, or (streaming) one layer's patterns plus the logits."""
        if streaming:
            return self.pattern_per_layer + self.logits
        return self.patterns + self.residuals + self.logits


def check_max_bytes(max_bytes: Any) -> None:
    """Raise :class:`LabError` unless ``max_bytes`` is a whole number of bytes above zero."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes <= 0:
        raise LabError(
            f"max_bytes must be a whole number of bytes above 0, got {max_bytes!r}: e.g. max_bytes=2 << 30 for "
            f"2 GiB (the default is {DEFAULT_MAX_BYTES}, {format_bytes(DEFAULT_MAX_BYTES)})"
        )


def estimate(
    model: Any,
    input_ids: torch.Tensor,
    names: Sequence[str],
    *,
    heads: Sequence[int] | None = None,
    logits: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> CaptureEstimate:
    """Memory that :func:`capture` would hold for these names and this input (no forward pass); bad inputs,
    names or heads raise :class:`LabError`."""
    ad = adapter_for(model)
    ad.check_input(input_ids, attention_mask)
    heads = ad.check_heads(heads)
    batch, seq = input_ids.shape
    n_layers = ad.n_layers()
    parsed = [parse_name(n, n_layers) if n != FINAL_NAME else (-1, FINAL_NAME) for n in names]
    dtype = next(ad.model.parameters()).dtype
    item = torch.empty((), dtype=dtype).element_size()
    n_heads = len(heads) if heads is not None else ad.n_heads()
    n_pat = sum(1 for _, k in parsed if k == PATTERN_KIND)
    d = int(getattr(ad.model.config, "hidden_size", 0) or getattr(ad.model.config, "n_embd", 0))
    n_res = len(parsed) - n_pat
    vocab = int(ad.model.config.vocab_size)
    return CaptureEstimate(
        patterns=pattern_bytes(batch, n_pat, n_heads, seq, dtype),
        pattern_per_layer=pattern_bytes(batch, 1 if n_pat else 0, n_heads, seq, dtype),
        residuals=n_res * batch * seq * d * item,
        logits=batch * seq * vocab * item if logits else 0,
        seq_len=seq,
        n_pattern_layers=n_pat,
        n_heads=n_heads,
        batch=batch,
        itemsize=item,
    )


def max_tokens_within(budget: int, batch: int, n_layers: int, n_heads: int, item: int = 4) -> int:
    """Longest sequence whose patterns fit ``budget`` bytes (0 where not even one token fits)."""
    return math.isqrt(max(0, int(budget)) // max(1, batch * n_layers * n_heads * item))


def check_budget(est: CaptureEstimate, max_bytes: int, *, streaming: bool, batch: int | None = None) -> None:
    """Raise :class:`LabError` naming the ways out when the capture would hold more than ``max_bytes``; a way
    out is named only where it fits the budget."""
    check_max_bytes(max_bytes)
    need = est.held(streaming)
    if need <= max_bytes:
        return
    batch = est.batch if batch is None else batch
    what = (
        f"attention patterns for {est.n_pattern_layers} layer(s) x {est.n_heads} head(s) x {est.seq_len}^2 "
        f"positions ({format_bytes(est.patterns)})"
        if est.n_pattern_layers
        else "the requested activations"
    )
    over = (
        f"capture would hold {format_bytes(need)} ({what}; residuals {format_bytes(est.residuals)}, "
        f"logits {format_bytes(est.logits)}), over the budget of {format_bytes(max_bytes)}"
    )
    if est.n_pattern_layers and est.pattern_per_layer > max_bytes:
        raise LabError(over + _one_layer_over(est, max_bytes, need, streaming, batch))
    layers = 1 if streaming else max(1, est.n_pattern_layers)
    ways = [] if streaming else ["fewer layers (names=...)"]
    if est.n_pattern_layers and (est.pattern_per_layer if streaming else est.patterns) > max_bytes:
        fit = max_tokens_within(max_bytes, batch, layers, est.n_heads, est.itemsize)
        ways += ["fewer heads (heads=[...])", f"a shorter text (at most ~{fit} tokens fit with these layers and heads)"]
    else:  # the patterns fit: the residuals or logits beside them do not
        ways.append("a shorter text")
    if not streaming and not est.n_pattern_layers:
        logits_too = "" if est.logits <= max_bytes else " with logits=False"
        ways.append(f"streaming to disk{logits_too} (stream_to=<folder>: each tensor written as its layer finishes)")
    elif not streaming:
        one_layer = est.pattern_per_layer + est.logits
        if one_layer <= max_bytes:
            ways.append(
                f"streaming to disk (stream_to=<folder>: one layer in memory at a time, {format_bytes(one_layer)})"
            )
        else:  # one layer's patterns fit (checked above), the logits on top do not
            ways.append(
                "streaming to disk with logits=False (stream_to=<folder>: one layer in memory at a time, "
                f"{format_bytes(est.pattern_per_layer)})"
            )
    if est.logits:
        ways.append(f"logits=False (saves {format_bytes(est.logits)})")
    raise LabError(over + ": use " + ", ".join(ways) + ", or raise max_bytes")


def _one_layer_over(est: CaptureEstimate, max_bytes: int, need: int, streaming: bool, batch: int) -> str:
    """The ways out when even one layer's patterns exceed the budget, so neither fewer layers nor streaming helps:
    fewer tokens or heads (as many as fit, streamed) or a larger budget."""
    streamed = "streamed one layer at a time (stream_to=<folder>" + (", logits=False)" if est.logits else ")")
    tokens = max_tokens_within(max_bytes, batch, 1, est.n_heads, est.itemsize)
    ways = [f"a shorter text (at most ~{tokens} tokens fit {streamed}"]
    if not streaming and est.n_pattern_layers > 1:
        in_memory = max_tokens_within(max_bytes, batch, est.n_pattern_layers, est.n_heads, est.itemsize)
        ways[0] += f"; ~{in_memory} in memory with these layers and heads"
    ways[0] += ")"
    heads = max_bytes // (batch * est.seq_len * est.seq_len * est.itemsize)
    if heads:  # else not even one head of one layer fits at this length
        ways.append(
            f"fewer heads (at most {heads} of {est.n_heads} fit at {est.seq_len} tokens, {streamed}: heads=[...])"
        )
    larger = f"at least {est.pattern_per_layer} = {format_bytes(est.pattern_per_layer)} to stream"
    if need != est.pattern_per_layer:
        larger += f"{' with logits=False' if est.logits else ''}; {need} as requested"
    return (
        f"; even one layer's patterns ({format_bytes(est.pattern_per_layer)}) exceed it, so neither fewer layers "
        f"nor streaming to disk fits: use {', '.join(ways)}, or raise max_bytes ({larger})"
    )


# ----------------------------------------------------------------------------- capture


@dataclass
class Capture:
    """Captured activations by name (detached CPU tensors), the logits, and streamed files."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    files: dict[str, Path] = field(default_factory=dict)
    estimate: CaptureEstimate | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        if name in self.files:
            return load_streamed(self.files[name], name)
        raise KeyError(f"{name} was not captured (captured: {', '.join([*self.tensors, *self.files][:8])}...)")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.files

    def stack(self, kind: str, layers: Iterable[int]) -> torch.Tensor:
        """``kind`` over ``layers`` stacked on a new first axis, e.g. ``(L, B, T, d)``."""
        return torch.stack([self[act_name(kind, l)] for l in layers])


def load_streamed(path: Path, name: str) -> torch.Tensor:
    """One tensor written by a streaming capture."""
    from safetensors.torch import load_file

    return load_file(str(path))[name]


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch ``model`` to eager attention (which returns weights) for the block; restore the previous one after."""
    inner = unwrap(model)
    previous = inner.config._attn_implementation
    if previous != "eager":
        inner.set_attn_implementation("eager")
        if inner.config._attn_implementation != "eager":
            raise LabError(
                f"{type(inner).__name__} cannot switch to eager attention, so its patterns cannot be "
                "captured: load it with attn_implementation='eager'"
            )
    try:
        yield
    finally:
        if previous != "eager":
            inner.set_attn_implementation(previous)


def capture(
    model: Any,
    input_ids: torch.Tensor,
    names: Iterable[str],
    *,
    attention_mask: torch.Tensor | None = None,
    heads: Sequence[int] | None = None,
    logits: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    stream_to: str | Path | None = None,
    progress: bool = False,
) -> Capture:
    """Run one forward pass of ``model`` on ``input_ids`` and keep the activations called ``names``.

    Args:
        model: A causal LM of a supported family (or a peft model wrapping one).
        input_ids: ``(B, T)`` integer token ids, at least one token and at most the model's positions.
        names: TransformerLens names (see the module docstring); :func:`hook_names` builds lists.
        attention_mask: Optional ``(B, T)`` padding mask (the shape of ``input_ids``), passed to the model.
        heads: Keep only these query heads (distinct indices, in this order) of each captured pattern.
        logits: Also return the logits; ``False`` runs the model body only (no ``(B, T, V)`` tensor).
        max_bytes: Refuse (before running) when the capture would hold more than this many bytes (an int > 0).
        stream_to: Folder: write each tensor to ``<name>.safetensors`` as its layer finishes, keep none in memory.
        progress: tqdm bar over blocks.

    Returns:
        A :class:`Capture`; ``capture[name]`` reads streamed tensors back from disk.
    """
    names = list(dict.fromkeys(names))
    check_max_bytes(max_bytes)
    ad = adapter_for(model)
    # validates the input, the names and the heads too, all before any forward pass
    est = estimate(model, input_ids, names, heads=heads, logits=logits, attention_mask=attention_mask)
    heads = ad.check_heads(heads)
    check_budget(est, max_bytes, streaming=stream_to is not None)
    folder = Path(stream_to) if stream_to is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    out = Capture(estimate=est)
    head_index = torch.tensor(list(heads)) if heads is not None else None

    def keep(name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if name.endswith(PATTERN_KIND) and head_index is not None:
            value = value.index_select(1, head_index.to(value.device))
        value = value.to("cpu", copy=True)  # a copy: later in-place ops inside the model cannot change it
        if folder is None:
            out.tensors[name] = value
        else:
            from safetensors.torch import save_file

            path = folder / f"{name}.safetensors"
            save_file({name: value.contiguous()}, str(path))
            out.files[name] = path

    handles = [register(ad.site(name), lambda x, name=name: keep(name, x)) for name in names]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ad.n_layers(), desc="capture", unit="block", leave=False)
        handles += [layer.register_forward_hook(lambda *a: bar.update(1)) for layer in ad.layers()]

    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    with hooks_removed(handles), torch.no_grad(), eager_attention(model) if est.n_pattern_layers else nullcontext():
        if logits:
            out.logits = model(input_ids=input_ids, **kwargs).logits.detach().to("cpu")
        else:
            ad.body()(input_ids=input_ids, **kwargs)
    if bar is not None:
        bar.close()
    return out


def unembed(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits that the model's final norm and unembedding make of residual vectors ``(..., d)`` (logit lens)."""
    ad = adapter_for(model)
    p = next(ad.model.parameters())
    with torch.no_grad():
        return ad.unembed(resid.to(p.device, p.dtype)).detach().to("cpu")


def model_shape(model: Any) -> dict[str, int | str]:
    """Family, layers, query heads, key/value heads and width of ``model``."""
    ad = adapter_for(model)
    cfg = ad.model.config
    return {
        "family": ad.family,
        "model_type": cfg.model_type,
        "n_layers": ad.n_layers(),
        "n_heads": ad.n_heads(),
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or ad.n_heads()),
        "d_model": int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)),
    }


def invariant_errors(model: Any, input_ids: torch.Tensor) -> dict[str, float]:
    """Largest absolute violation of each identity the capture must satisfy, on ``input_ids``:
    ``resid_pre + attn_out = resid_mid``, ``resid_mid + mlp_out = resid_post``, ``resid_post[l] = resid_pre[l+1]``,
    patterns = HF's own eager ``output_attentions``, pattern rows sum to 1, unembed(last resid_post) = logits,
    unembedding ``ln_final.hook_normalized`` = logits, and captured logits = an uncaptured forward's logits."""
    ad = adapter_for(model)
    n = ad.n_layers()
    cap = capture(model, input_ids, [*hook_names(n, KINDS), FINAL_NAME])
    err: dict[str, float] = {}

    def worst(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return max(float((a.double() - b.double()).abs().max()) for a, b in pairs)

    def at(kind: str, layer: int) -> torch.Tensor:
        return cap[act_name(kind, layer)]

    err["pre_plus_attn_minus_mid"] = worst(
        (at("resid_pre", l) + at("attn_out", l), at("resid_mid", l)) for l in range(n)
    )
    err["mid_plus_mlp_minus_post"] = worst(
        (at("resid_mid", l) + at("mlp_out", l), at("resid_post", l)) for l in range(n)
    )
    err["post_minus_next_pre"] = (
        worst((at("resid_post", l), at("resid_pre", l + 1)) for l in range(n - 1)) if n > 1 else 0.0
    )
    with torch.no_grad(), eager_attention(model):
        ref = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    err["pattern_minus_hf_eager"] = worst((at("pattern", l), ref.attentions[l].cpu()) for l in range(n))
    err["pattern_row_sum_minus_1"] = worst((at("pattern", l).sum(-1), torch.ones(())) for l in range(n))
    err["unembed_last_post_minus_logits"] = float(
        (unembed(model, at("resid_post", n - 1)).double() - cap.logits.double()).abs().max()
    )
    head = ad.model.get_output_embeddings()
    with torch.no_grad():
        from_final = softcapped(ad.model, head(cap[FINAL_NAME].to(next(ad.model.parameters()).device)))
        plain = model(input_ids=input_ids, use_cache=False).logits
    err["unembed_ln_final_minus_logits"] = float((from_final.cpu().double() - cap.logits.double()).abs().max())
    err["captured_minus_plain_logits"] = float((plain.cpu().double() - cap.logits.double()).abs().max())
    return err
