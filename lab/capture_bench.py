"""Benchmark (not a test): the cost of capturing every residual name of every layer, against a plain forward
pass and against TransformerLens ``run_with_cache`` on the same weights, in one run. Prints the ratios.

    python -m lab.capture_bench [--profile cpu] [--tokens 256] [--reps 10] [--write]

TransformerLens does not know SmolLM2 by name (and cannot reach the hub here), so the HookedTransformer is
built from a ``HookedTransformerConfig`` made from the HF config, with TransformerLens's own
``convert_llama_weights``; its logits are checked against HF's before anything is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import polars as pl
import torch

from lab.capture import FINAL_NAME, RESIDUAL_KINDS, adapter_for, capture, hook_names, unwrap
from lab.errors import LabError
from lab.models import LoadedModel, load_model
from lab.profiles import Profile, get_profile
from lab.results import write_result

TRACK = "C_probing"


def transformer_lens_config(hf_config: Any, dtype: torch.dtype) -> Any:
    """A ``HookedTransformerConfig`` for an HF Llama / Qwen2 / Gemma2 / GPT-2 config, built offline.

    TransformerLens 2.18 builds configs only for its list of hub names (``from_pretrained`` refuses local
    folders, and its local-config path fails for these four families), so the fields are mapped here, following
    its own per-architecture tables in ``loading_from_pretrained.py``.
    """
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    mt = c.model_type
    common: dict[str, Any] = {"dtype": dtype, "device": "cpu", "default_prepend_bos": False}
    if mt in ("llama", "qwen2", "gemma2"):
        if getattr(c, "rope_scaling", None):
            raise LabError("the TransformerLens conversion here does not handle rope_scaling")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
        rot = {"d_model": c.hidden_size, "d_head": head_dim, "n_heads": c.num_attention_heads,
               "d_mlp": c.intermediate_size, "n_layers": c.num_hidden_layers,
               "n_ctx": min(c.max_position_embeddings, 4096), "eps": c.rms_norm_eps, "d_vocab": c.vocab_size,
               "n_key_value_heads": kv, "normalization_type": "RMS", "positional_embedding_type": "rotary",
               "rotary_adjacent_pairs": False, "rotary_dim": head_dim, "rotary_base": c.rope_theta,
               "final_rms": True, "gated_mlp": True}
        if mt == "llama":
            return HookedTransformerConfig(**rot, act_fn=c.hidden_act, original_architecture="LlamaForCausalLM",
                                           **common)
        if mt == "qwen2":
            return HookedTransformerConfig(**rot, act_fn=c.hidden_act, original_architecture="Qwen2ForCausalLM",
                                           **common)
        n = c.num_hidden_layers  # gemma2: sandwich norms, soft-capping, sliding-window layers
        return HookedTransformerConfig(
            **rot, act_fn=c.hidden_activation, original_architecture="Gemma2ForCausalLM",
            attn_scale=float(c.query_pre_attn_scalar) ** 0.5, use_normalization_before_and_after=True,
            attn_scores_soft_cap=c.attn_logit_softcapping or -1.0, output_logits_soft_cap=c.final_logit_softcapping or -1.0,
            window_size=c.sliding_window, use_local_attn=True,
            attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types[:n]], **common)
    if mt == "gpt2":
        return HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
            act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard",
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
            original_architecture="GPT2LMHeadModel", **common)
    raise LabError(f"no TransformerLens config mapping for model_type {mt!r} (llama, qwen2, gemma2, gpt2 are mapped)")


def transformer_lens_model(model: Any) -> Any:
    """A TransformerLens ``HookedTransformer`` holding the same weights as the HF ``model`` (Llama, Qwen2, Gemma2
    or GPT-2), converted with TransformerLens's own weight converters and left unprocessed (no LayerNorm folding
    or centring), so that activations compare one to one."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions as wc

    hf = unwrap(model)
    cfg = transformer_lens_config(hf.config, next(hf.parameters()).dtype)
    convert = {"LlamaForCausalLM": wc.convert_llama_weights, "Qwen2ForCausalLM": wc.convert_qwen2_weights,
               "Gemma2ForCausalLM": wc.convert_gemma_weights, "GPT2LMHeadModel": wc.convert_gpt2_weights}
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert[cfg.original_architecture](hf, cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    tl.eval()
    return tl


def _median_times(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Time each function ``reps`` times, interleaved round-robin (so drift on a shared machine hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def capture_benchmark(lm: LoadedModel, tokens: int = 256, reps: int = 10, warmup: int = 2,
                      text: str | None = None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Median seconds per forward pass: plain HF forward; lab capture of every residual name; TransformerLens
    forward, ``run_with_cache`` on the same names and on everything. Returns (frame, parity checks)."""
    model = lm.model
    n_layers = adapter_for(model).n_layers()
    names = [*hook_names(n_layers, RESIDUAL_KINDS), FINAL_NAME]
    text = text or "The quick brown fox jumps over the lazy dog. " * 200
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise LabError(f"benchmark text has only {ids.shape[1]} tokens (< {tokens}): pass a longer text")

    def plain() -> Any:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def lab_capture() -> Any:
        return capture(model, ids, names)

    fns: dict[str, Callable[[], Any]] = {"HF forward (no capture)": plain, "lab capture (all residual names)": lab_capture}
    checks: dict[str, Any] = {"tokens": int(ids.shape[1]), "names": len(names)}
    tl = None
    try:
        tl = transformer_lens_model(model)
    except LabError as e:
        checks["transformer_lens"] = f"not run: {e}"
    if tl is not None:
        tl_names = set(names)

        def tl_forward() -> Any:
            with torch.no_grad():
                return tl(ids)

        def tl_cache_same() -> Any:
            with torch.no_grad():
                return tl.run_with_cache(ids, names_filter=lambda n: n in tl_names)

        def tl_cache_all() -> Any:
            with torch.no_grad():
                return tl.run_with_cache(ids)

        # Parity before timing: same logits, same residual stream.
        ref = capture(model, ids, names)
        tl_logits, tl_cache = tl_cache_same()
        checks["tl_logits_max_abs_diff"] = float((tl_logits - ref.logits).abs().max())
        resid = [n for n in names if n != FINAL_NAME]
        checks["tl_resid_max_abs_diff"] = max(float((tl_cache[n] - ref[n]).abs().max()) for n in resid)
        checks["tl_resid_max_rel_diff"] = max(float((tl_cache[n] - ref[n]).abs().max() / ref[n].abs().max())
                                              for n in resid)
        # TransformerLens's RMSNorm hook_normalized is taken *before* the learned scale w; ours after it.
        w = tl.ln_final.w.detach()
        checks["tl_ln_final_times_w_max_abs_diff"] = float((tl_cache[FINAL_NAME] * w - ref[FINAL_NAME]).abs().max())
        checks["logit_scale"] = float(ref.logits.abs().max())
        if not torch.allclose(tl_logits, ref.logits, atol=1e-3 * max(1.0, checks["logit_scale"]), rtol=0):
            raise LabError(f"TransformerLens logits differ from HF's by {checks['tl_logits_max_abs_diff']:.3g}: "
                           "the weight conversion is wrong, so the timing would compare different models")
        del ref, tl_cache
        fns.update({"TransformerLens forward (no cache)": tl_forward,
                    "TransformerLens run_with_cache (same names)": tl_cache_same,
                    "TransformerLens run_with_cache (everything)": tl_cache_all})
    times = _median_times(fns, reps, warmup)
    base = statistics.median(times["HF forward (no capture)"])
    ours = statistics.median(times["lab capture (all residual names)"])
    frame = pl.DataFrame({
        "method": list(times),
        "median_s": [statistics.median(v) for v in times.values()],
        "min_s": [min(v) for v in times.values()],
        "ratio_to_hf_forward": [statistics.median(v) / base for v in times.values()],
        "ratio_to_lab_capture": [statistics.median(v) / ours for v in times.values()],
        "tokens": [int(ids.shape[1])] * len(times),
        "reps": [reps] * len(times),
        "threads": [torch.get_num_threads()] * len(times),
    })
    return frame, checks


def run_benchmark(profile: str | Profile | None = None, *, tokens: int | None = None, reps: int | None = None,
                  write: bool = False, lm: LoadedModel | None = None) -> pl.DataFrame:
    """Load the profile's model, benchmark, print the ratios; optionally write results/C_probing/benchmark."""
    p = get_profile(profile)
    if p.threads:
        torch.set_num_threads(p.threads)
    smoke = p.name == "smoke"
    tokens = tokens or (32 if smoke else 256)
    reps = reps or (3 if smoke else 10)
    lm = lm or load_model(p)
    t0 = time.perf_counter()
    frame, checks = capture_benchmark(lm, tokens=tokens, reps=reps, warmup=1 if smoke else 2)
    for method, med, r1, r2 in frame.select("method", "median_s", "ratio_to_hf_forward", "ratio_to_lab_capture").iter_rows():
        print(f"capture benchmark: {method:<46} {1000 * med:8.1f} ms  x{r1:.2f} of HF forward  x{r2:.2f} of lab capture")
    print(f"({checks['tokens']} tokens, {reps} interleaved repetitions, median; {torch.get_num_threads()} threads; "
          f"TL parity: logits {checks.get('tl_logits_max_abs_diff', 'n/a')}, residuals relative "
          f"{checks.get('tl_resid_max_rel_diff', 'n/a')})")
    frame = frame.with_columns([pl.lit(checks.get(k)).cast(pl.Float64).alias(k) for k in (
        "tl_logits_max_abs_diff", "tl_resid_max_abs_diff", "tl_resid_max_rel_diff", "tl_ln_final_times_w_max_abs_diff")])
    if write:
        write_result(TRACK, "benchmark", frame, config={"tokens": tokens, "reps": reps, "model": lm.name, **checks},
                     seed=None, profile=p.name, wall_time_s=time.perf_counter() - t0)
    return frame


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.capture_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--write", action="store_true", help="also write results/C_probing/benchmark.parquet")
    a = ap.parse_args(argv)
    try:
        run_benchmark(a.profile, tokens=a.tokens, reps=a.reps, write=a.write)
    except LabError as e:
        raise SystemExit(f"capture_bench: error: {e}")


if __name__ == "__main__":
    main()
