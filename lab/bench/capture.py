"""Benchmark (not a test): the cost of capturing every residual name of every layer, against a plain forward
pass and against TransformerLens ``run_with_cache`` on the same weights, in one run. :func:`run` prints the ratios
and returns them; the caller decides where they are written.

TransformerLens does not know SmolLM2 by name (and cannot reach the hub here), so the HookedTransformer is
built from a ``HookedTransformerConfig`` made from the HF config, with TransformerLens's own
``convert_llama_weights``; its logits are checked against HF's before anything is timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import polars as pl
import torch

from lab.bench import check_counts
from lab.errors import LabError
from lab.interp.adapters import adapter_for
from lab.interp.capture import capture
from lab.interp.names import FINAL_NAME, RESIDUAL_KINDS, hook_names
from lab.interp.tl_bridge import transformer_lens_model
from lab.models.loading import LoadedModel

# The parity checks that become columns of the benchmark frame (all of them also go to its provenance).
PARITY_COLUMNS = (
    "tl_logits_max_abs_diff",
    "tl_resid_max_abs_diff",
    "tl_resid_max_rel_diff",
    "tl_ln_final_times_w_max_abs_diff",
)


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


def capture_benchmark(
    lm: LoadedModel, tokens: int = 256, reps: int = 10, warmup: int = 2, text: str | None = None
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Median seconds per forward pass: plain HF forward; lab capture of every residual name; TransformerLens
    forward, ``run_with_cache`` on the same names and on everything. Returns (frame, parity checks)."""
    check_counts(tokens=tokens, reps=reps, warmup=warmup)
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

    fns: dict[str, Callable[[], Any]] = {
        "HF forward (no capture)": plain,
        "lab capture (all residual names)": lab_capture,
    }
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
        checks["tl_resid_max_rel_diff"] = max(
            float((tl_cache[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in resid
        )
        # TransformerLens's RMSNorm hook_normalized is taken *before* the learned scale w; ours after it.
        w = tl.ln_final.w.detach()
        checks["tl_ln_final_times_w_max_abs_diff"] = float((tl_cache[FINAL_NAME] * w - ref[FINAL_NAME]).abs().max())
        checks["logit_scale"] = float(ref.logits.abs().max())
        if not torch.allclose(tl_logits, ref.logits, atol=1e-3 * max(1.0, checks["logit_scale"]), rtol=0):
            raise LabError(
                f"TransformerLens logits differ from HF's by {checks['tl_logits_max_abs_diff']:.3g}: "
                "the weight conversion is wrong, so the timing would compare different models"
            )
        del ref, tl_cache
        fns.update(
            {
                "TransformerLens forward (no cache)": tl_forward,
                "TransformerLens run_with_cache (same names)": tl_cache_same,
                "TransformerLens run_with_cache (everything)": tl_cache_all,
            }
        )
    times = _median_times(fns, reps, warmup)
    base = statistics.median(times["HF forward (no capture)"])
    ours = statistics.median(times["lab capture (all residual names)"])
    frame = pl.DataFrame(
        {
            "method": list(times),
            "median_s": [statistics.median(v) for v in times.values()],
            "min_s": [min(v) for v in times.values()],
            "ratio_to_hf_forward": [statistics.median(v) / base for v in times.values()],
            "ratio_to_lab_capture": [statistics.median(v) / ours for v in times.values()],
            "tokens": [int(ids.shape[1])] * len(times),
            "reps": [reps] * len(times),
            "threads": [torch.get_num_threads()] * len(times),
        }
    )
    return frame, checks


def run(
    lm: LoadedModel, *, tokens: int = 256, reps: int = 10, warmup: int = 2, text: str | None = None
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Benchmark capture on ``lm`` and print the ratios; writes nothing.

    Returns:
        (one row per method: median and min seconds, ratios to the plain forward and to the lab capture, tokens,
        repetitions, threads, and the TransformerLens parity checks of :data:`PARITY_COLUMNS`; every parity check
        as a dict, for the provenance of whoever writes the frame).
    """
    frame, checks = capture_benchmark(lm, tokens=tokens, reps=reps, warmup=warmup, text=text)
    for method, med, r1, r2 in frame.select(
        "method", "median_s", "ratio_to_hf_forward", "ratio_to_lab_capture"
    ).iter_rows():
        print(
            f"capture benchmark: {method:<46} {1000 * med:8.1f} ms  x{r1:.2f} of HF forward  x{r2:.2f} of lab capture"
        )
    print(
        f"({checks['tokens']} tokens, {reps} interleaved repetitions, median; {torch.get_num_threads()} threads; "
        f"TL parity: logits {checks.get('tl_logits_max_abs_diff', 'n/a')}, residuals relative "
        f"{checks.get('tl_resid_max_rel_diff', 'n/a')})"
    )
    frame = frame.with_columns([pl.lit(checks.get(k)).cast(pl.Float64).alias(k) for k in PARITY_COLUMNS])
    return frame, checks
