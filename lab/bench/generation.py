"""Benchmark (not a test) of workload ``generation``: scoring a fine-tuned model the way Tracks A and E do, through
today's paths against the fast ones (:mod:`lab.train.evaluation`), in the same process, all in fp32.

- **A's answers**: greedy answers to held-out task prompts (40 new tokens) and retention probes (32). Baseline:
  ``task_success`` + ``probe_retention`` with ``reference=True`` (transformers' ``generate``, batches of 16, one call
  per kind). Fast: ``answer_all``, one batch with a limit per prompt, finished rows leaving it, decoded from a copy
  with the adapter merged into the fp32 weights.
- **E's scoring**: the log-probability of each held-out constraint prompt's right concept and its alternatives.
  Baseline: ``lab.data.constraints.continuation_logprob``, one sequence per forward. Fast:
  ``continuation_logprobs``, one batched forward of the prompts whose KV cache every continuation reuses.

The model is the profile's base with a fresh LoRA adapter attached (B = 0: a fine-tuned model's compute, the base
model's answers): all of A's held-out prompts and probes (one run's scoring) and every sixth of E's 48 prompts keep
a baseline call near 20 s on two cores. The paths' answers and log-probabilities are compared after timing
(``note``); answers that differ beyond float rounding's near-ties, or log-probabilities further apart than
:data:`AGREE_LOGPROB`, are an error.
"""

from __future__ import annotations

import statistics
import time

from lab.bench.speed import Measurement, alternate
from lab.data.constraints import continuation_logprob, held_out_prompts
from lab.data.records import PROBES, chat_text, make_task
from lab.errors import LabError
from lab.profiles import Profile
from lab.train.evaluation import PROBE_TOKENS, answer_all, continuation_logprobs, probe_retention, task_success
from lab.train.lora import FinetuneConfig, attach_lora, fresh_base

TARGET = 3.0  # issue 12: >= 3x for generation and scoring
AGREE_LOGPROB = 1e-3  # largest |log p fast - log p baseline| (nats)
MAX_DIFFERENT_ANSWERS = 0.1  # share of answers allowed to differ (a near-tie flipped by a different batch shape)


def measure(profile: Profile, *, repeats: int = 5) -> Measurement:
    """Seconds per call of scoring the subset of A's and E's prompts through the reference paths vs the fast ones."""
    cfg = FinetuneConfig()
    lm = fresh_base(profile)
    model, tok = attach_lora(lm.model, cfg), lm.tokenizer
    model.eval()
    test, probes = make_task(cfg.n_train, cfg.n_test, cfg.seed).test, PROBES
    scored = held_out_prompts()[::6]
    prompts = [p.prompt for p in scored]
    continuations = [[" " + c for c in (p.target, *p.alternatives)] for p in scored]
    got: dict[str, dict] = {"baseline": {}, "fast": {}}
    parts: dict[str, dict[str, list[float]]] = {"baseline": {"A": [], "E": []}, "fast": {"A": [], "E": []}}

    def timed(path: str, part: str, fn):
        t0 = time.perf_counter()
        got[path][part] = fn()
        parts[path][part].append(time.perf_counter() - t0)

    def baseline() -> None:
        timed(
            "baseline",
            "A",
            lambda: (
                task_success(model, tok, test, cfg.max_new_tokens, reference=True)["answer"].to_list()
                + probe_retention(model, tok, probes, PROBE_TOKENS, reference=True)["answer"].to_list()
            ),
        )
        timed(
            "baseline",
            "E",
            lambda: [
                [continuation_logprob(model, tok, p, c) for c in cs]
                for p, cs in zip(prompts, continuations, strict=True)
            ],
        )

    def fast() -> None:
        def answers():
            frames = answer_all(model, tok, test, cfg.max_new_tokens, probes)
            return frames[0]["answer"].to_list() + frames[1]["answer"].to_list()

        timed("fast", "A", answers)
        timed("fast", "E", lambda: continuation_logprobs(model, tok, prompts, continuations))

    times = alternate({"baseline": baseline, "fast": fast}, repeats=repeats)
    a_base, a_fast = got["baseline"]["A"], got["fast"]["A"]
    differ = sum(x != y for x, y in zip(a_base, a_fast, strict=True))
    gap = max(
        abs(x - y)
        for xs, ys in zip(got["baseline"]["E"], got["fast"]["E"], strict=True)
        for x, y in zip(xs, ys, strict=True)
    )
    if gap > AGREE_LOGPROB or differ > MAX_DIFFERENT_ANSWERS * len(a_base):
        raise LabError(
            f"generation bench: the fast paths disagree with the reference ({differ} of {len(a_base)} answers "
            f"differ, log-probabilities up to {gap:.1e} nats apart)"
        )
    chat = [chat_text(tok, p) for p in [ex.prompt for ex in test] + [p for p, _ in probes]]
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in chat + a_base)  # answers re-encoded
    tokens += sum(
        len(tok(p)["input_ids"]) + len(tok(c, add_special_tokens=False)["input_ids"])
        for p, cs in zip(prompts, continuations, strict=True)
        for c in cs
    )
    med = {path: {part: statistics.median(ts) for part, ts in d.items()} for path, d in parts.items()}
    return Measurement(
        workload="generation",
        baseline="fp32: generate in batches of 16 per kind (A); one forward per prompt + continuation (E)",
        fast="fp32: LoRA merged, one batch, per-prompt limits, finished rows leave (A); prompts batched, KV shared (E)",
        tokens_per_call=tokens,
        baseline_s=times["baseline"],
        fast_s=times["fast"],
        flops_per_token=2.0 * sum(p.numel() for p in lm.model.parameters()),
        fast_dtype="fp32",
        target=TARGET,
        note=(
            f"{lm.name} + LoRA r{cfg.rank} (B=0); A: {len(test)} held-out prompts + {len(probes)} probes, "
            f"median {med['baseline']['A']:.2f} s -> {med['fast']['A']:.2f} s "
            f"({med['baseline']['A'] / med['fast']['A']:.2f}x), {differ} answers differ; E: {len(prompts)} prompts x "
            f"{len(continuations[0])} continuations, {med['baseline']['E']:.2f} s -> {med['fast']['E']:.2f} s "
            f"({med['baseline']['E'] / med['fast']['E']:.2f}x), log p within {gap:.1e}"
        ),
    )
