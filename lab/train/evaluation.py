"""How a fine-tuned chat model is judged: greedy answers (batched, left-padded), task success with Wilson
intervals, perplexity on general text, and retention of the base model's answers to probe prompts."""

from __future__ import annotations

import math

import polars as pl
import torch

from lab.data.records import Example, chat_text, end_token_id, pad_token_id, score_answer, wilson_interval
from lab.errors import LabError
from lab.profiles import Profile

PPL_WINDOW, PPL_WINDOWS = 128, 16  # general-text perplexity: the first 16 windows of 128 tokens


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding; decoding stops at the end-of-turn token."""
    end, pad = end_token_id(tokenizer), pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts[i : i + batch_size]
        ]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        for row in gen[:, width:]:
            row = row.tolist()
            if end in row:
                row = row[: row.index(end)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def task_success(model, tokenizer, test: tuple[Example, ...], max_new_tokens: int) -> pl.DataFrame:
    """One row per test prompt: the greedy answer and its structural scores."""
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in test], max_new_tokens)
    rows = []
    for ex, ans in zip(test, answers, strict=True):
        ok, exact = score_answer(ans, ex.fields)
        rows.append({"prompt": ex.prompt, "answer": ans, "format_ok": ok, "exact": exact})
    return pl.DataFrame(
        rows, schema={"prompt": pl.Utf8, "answer": pl.Utf8, "format_ok": pl.Boolean, "exact": pl.Boolean}
    )


def rate_with_ci(flags: pl.Series) -> dict[str, float]:
    """Rate of True and its Wilson 95 % interval."""
    k, n = int(flags.sum()), flags.len()
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else 0.0, "lo": lo, "hi": hi, "k": k, "n": n}


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, window: int = PPL_WINDOW, n_windows: int = PPL_WINDOWS, batch_size: int = 8
) -> float:
    """exp(mean next-token cross-entropy) over the first ``n_windows`` non-overlapping ``window``-token spans."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: window * n_windows]
    n = len(ids) // window
    if n == 0:
        raise LabError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    x = torch.tensor(ids[: n * window], device=device).view(n, window)  # (N, W)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size]
        logits = model(input_ids=xb).logits[:, :-1].float()  # (B, W-1, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += xb[:, 1:].numel()
    return math.exp(total / count)


def probe_retention(model, tokenizer, probes: tuple[tuple[str, str], ...], max_new_tokens: int = 32) -> pl.DataFrame:
    """Greedy answer to each probe and whether it is identical to the base model's (correct) answer."""
    answers = greedy_answers(model, tokenizer, [p for p, _ in probes], max_new_tokens)
    return pl.DataFrame(
        {
            "prompt": [p for p, _ in probes],
            "expected": [a for _, a in probes],
            "answer": answers,
            "retained": [a.strip() == e for a, (_, e) in zip(answers, probes, strict=True)],
        }
    )


def general_text(profile: Profile, chars: int = 40_000) -> tuple[str, str]:
    """(name, text) for the forgetting perplexity: held-out Shakespeare works (cpu/gpu) or the smoke text."""
    from lab.data.corpus import load_corpus

    corpus = load_corpus(profile)
    return f"{corpus.name} held-out: {', '.join(corpus.val_works)}", corpus.val_text[:chars]


def score_model(
    model, tokenizer, test: tuple[Example, ...], max_new_tokens: int, text: str, probes: tuple[tuple[str, str], ...]
) -> dict:
    """Everything a fine-tuning run is judged on, for one model: task success on ``test`` (greedy; format and
    exact rates with Wilson intervals), perplexity on ``text`` and retention of the ``probes``' answers.

    Returns:
        Counts, rates and intervals (``format_*``, ``exact_*``, ``n_test``), ``ppl``, ``probes_retained``,
        ``probes_n``, and the rows behind them (``answers``, ``probe_answers``) as lists of dicts.
    """
    answers = task_success(model, tokenizer, test, max_new_tokens)
    fmt, exact = rate_with_ci(answers["format_ok"]), rate_with_ci(answers["exact"])
    kept = probe_retention(model, tokenizer, probes)
    return {
        "format_k": fmt["k"],
        "format_rate": fmt["rate"],
        "format_lo": fmt["lo"],
        "format_hi": fmt["hi"],
        "exact_k": exact["k"],
        "exact_rate": exact["rate"],
        "exact_lo": exact["lo"],
        "exact_hi": exact["hi"],
        "n_test": fmt["n"],
        "ppl": perplexity(model, tokenizer, text),
        "probes_retained": int(kept["retained"].sum()),
        "probes_n": kept.height,
        "answers": answers.to_dicts(),
        "probe_answers": kept.to_dicts(),
    }
