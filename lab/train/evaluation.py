"""How a fine-tuned chat model is judged: greedy answers, task success with Wilson intervals, perplexity on general
text, retention of the base model's answers to probe prompts, and batched log-probabilities of continuations.

Greedy decoding is transformers' ``generate`` almost: :func:`greedy_tokens` is its greedy loop over the same model
calls (left padding, the KV cache, positions from the attention mask), with two differences that ``generate`` lacks:
each prompt has its own token limit (so a run's held-out prompts and probes are answered in one batch), and a row
that has finished leaves the batch (``Cache.batch_select_indices``) instead of being computed to the longest answer.
On two cores decoding costs ~3 ms per row per token in fp32 on SmolLM2-135M, so both cut real work. A LoRA model
decodes from a merged copy (the adapter added into the fp32 weights once): the adapter's 7 small matmuls per layer
cost ~30 % of every decoding step otherwise. Decoding stays
fp32: bf16 weights are ~1.7x faster but changed 9 of the 42 base-model answers of Track A (held-out prompts and
probes; one probe among them), which would move the task and retention scores. ``reference=True`` is the path before
(``generate`` in batches of 16), kept for the benchmark (``lab bench generation``) and the tests.

:func:`continuation_logprobs` scores several continuations of each prompt from one batched forward of the prompts,
whose KV cache every continuation reuses: the batched form of ``lab.data.constraints.continuation_logprob``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl
import torch

from lab.data.records import Example, chat_text, end_token_id, pad_token_id, score_answer, wilson_interval
from lab.errors import LabError
from lab.profiles import Profile

PPL_WINDOW, PPL_WINDOWS = 128, 16  # general-text perplexity: the first 16 windows of 128 tokens
PROBE_TOKENS = 32  # greedy answer length of the retention probes
REFERENCE_BATCH = 16  # prompts per generate call on the reference path


# ----------------------------------------------------------------------------- decoding


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)  # the model's layer kinds (sliding-window layers where it has them)


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, positions), each (B, T): rows right-aligned, positions counted from each row's start."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_tokens(
    model, prompts: list[list[int]], limits: Sequence[int], end: int, pad: int, batch_size: int = 64
) -> list[list[int]]:
    """Greedy continuation of each token-id prompt until ``end`` (not included) or its own limit of new tokens.

    Prompts of similar length share a batch (less padding); a finished row leaves its batch.
    """
    if len(limits) != len(prompts) or min(limits, default=1) < 1:
        raise LabError("greedy_tokens needs one limit >= 1 per prompt")
    device = _device(model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        alive = order[start : start + batch_size]  # prompt index of each batch row
        ids, mask, position = _left_padded([prompts[i] for i in alive], pad, device)
        cache = _cache(model)
        step = dict(attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
        logits = model(input_ids=ids, logits_to_keep=1, **step).logits[:, -1]  # (B, V)
        position = position[:, -1:]
        while True:
            token = logits.argmax(-1)  # (B,)
            keep = []
            for row, (i, t) in enumerate(zip(alive, token.tolist(), strict=True)):
                if t != end:
                    out[i].append(t)
                    if len(out[i]) < limits[i]:
                        keep.append(row)
            if not keep:
                break
            if len(keep) < len(alive):  # finished rows leave the batch and the cache
                rows = torch.tensor(keep, device=device)
                cache.batch_select_indices(rows)
                mask, token, position = mask[rows], token[rows], position[rows]
                alive = [alive[row] for row in keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            position = position + 1
            logits = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
    return out


@torch.no_grad()
def _generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The reference path: transformers' ``generate`` on batches of ``batch_size`` left-padded prompts."""
    end, pad = end_token_id(tokenizer), pad_token_id(tokenizer)
    device = _device(model)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts[i : i + batch_size]
        ]
        ids, mask, _ = _left_padded(chunk, pad, device)
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
        for row in gen[:, ids.shape[1] :]:
            row = row.tolist()
            if end in row:
                row = row[: row.index(end)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def greedy_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 64,
    *,
    reference: bool = False,
) -> list[str]:
    """Greedy answers to chat prompts; decoding stops at the end-of-turn token.

    Args:
        max_new_tokens: The answers' token limit, or one limit per prompt.
        batch_size: Prompts decoded together.
        reference: transformers' ``generate`` in batches of ``batch_size`` (16 unless given; one limit for all), the
            path before :func:`greedy_tokens`: the same answers, slower.
    """
    if reference:
        if not isinstance(max_new_tokens, int):
            raise LabError("greedy_answers(reference=True) takes one max_new_tokens for every prompt")
        return _generate_answers(model, tokenizer, prompts, max_new_tokens, min(batch_size, REFERENCE_BATCH))
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    ids = [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    end = end_token_id(tokenizer)
    tokens = greedy_tokens(merged_for_decoding(model), ids, limits, end, pad_token_id(tokenizer), batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def merged_for_decoding(model):
    """A copy of a LoRA model with the adapter merged into fp32 base weights (peft's ``merge_and_unload``), or
    ``model`` itself when it has no adapter or its base is quantized or below fp32 (where merging rounds)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or getattr(model, "is_loaded_in_4bit", False):
        return model
    if any(p.dtype != torch.float32 for p in model.get_base_model().parameters()):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, prompts: Sequence[str], continuations: Sequence[Sequence[str]], batch_size: int = 32
) -> list[list[float]]:
    """``out[i][j]`` = sum of log p(tokens of ``continuations[i][j]`` | ``prompts[i]``), fp32.

    Tokenised as ``lab.data.constraints.continuation_logprob`` does (the prompt with the tokenizer's special tokens,
    the continuation without); each prompt runs once (left-padded batches) and its KV cache serves every
    continuation, whose tokens after the first run in one more forward.
    """
    device = _device(model)
    pad = pad_token_id(tokenizer)
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        batch = range(start, min(start + batch_size, len(prompts)))
        ids, mask, position = _left_padded([tokenizer(prompts[i])["input_ids"] for i in batch], pad, device)
        cache = _cache(model)
        first = (
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
            .log_softmax(-1)
        )  # (B, V)
        owner, toks = [], []  # batch row of each continuation, its tokens
        for row, i in enumerate(batch):
            for c in continuations[i]:
                owner.append(row)
                toks.append(tokenizer(c, add_special_tokens=False)["input_ids"])
        if any(not t for t in toks):
            raise LabError("continuation_logprobs: a continuation has no tokens")
        score = [first[row, t[0]].item() for row, t in zip(owner, toks, strict=True)]
        rest = max(len(t) for t in toks) - 1
        if rest > 0:  # the continuations' later tokens, each after its prompt's cached keys and values
            rows = torch.tensor(owner, device=device)
            cache.batch_select_indices(rows)  # one copy of the prompt's cache per continuation
            feed = torch.tensor([t[:-1] + [pad] * (rest + 1 - len(t)) for t in toks], device=device)  # (K, rest)
            fed = torch.tensor([[1] * (len(t) - 1) + [0] * (rest + 1 - len(t)) for t in toks], device=device)
            logp = (
                model(
                    input_ids=feed,
                    attention_mask=torch.cat([mask[rows], fed], dim=1),
                    position_ids=position[rows, -1:] + 1 + torch.arange(rest, device=device),
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits.float()
                .log_softmax(-1)
            )  # (K, rest, V)
            for k, t in enumerate(toks):
                score[k] += sum(logp[k, j, t[j + 1]].item() for j in range(len(t) - 1))
        it = iter(score)
        out += [[next(it) for _ in continuations[i]] for i in batch]
    return out


@torch.no_grad()
def labelled_token_loss(model, rows: list[dict[str, list[int]]], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the rows' labelled tokens (``labels`` -100 elsewhere), batched with
    right padding: the batched form of ``lab.data.constraints.mean_token_loss``."""
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in chunk], device=device)
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk], device=device)
        mask = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk], device=device
        )
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum", ignore_index=-100
        ).item()
        count += int((targets != -100).sum())
    if count == 0:
        raise LabError("no tokens to score: every row is shorter than two tokens")
    return total / count


# ----------------------------------------------------------------------------- evaluation


def task_success(
    model, tokenizer, test: tuple[Example, ...], max_new_tokens: int, *, reference: bool = False
) -> pl.DataFrame:
    """One row per test prompt: the greedy answer and its structural scores."""
    return _task_frame(
        test, greedy_answers(model, tokenizer, [ex.prompt for ex in test], max_new_tokens, reference=reference)
    )


def _task_frame(test: tuple[Example, ...], answers: list[str]) -> pl.DataFrame:
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


def probe_retention(
    model,
    tokenizer,
    probes: tuple[tuple[str, str], ...],
    max_new_tokens: int = PROBE_TOKENS,
    *,
    reference: bool = False,
) -> pl.DataFrame:
    """Greedy answer to each probe and whether it is identical to the base model's (correct) answer."""
    answers = greedy_answers(model, tokenizer, [p for p, _ in probes], max_new_tokens, reference=reference)
    return _probe_frame(probes, answers)


def _probe_frame(probes: tuple[tuple[str, str], ...], answers: list[str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "prompt": [p for p, _ in probes],
            "expected": [a for _, a in probes],
            "answer": answers,
            "retained": [a.strip() == e for a, (_, e) in zip(answers, probes, strict=True)],
        }
    )


def answer_all(
    model, tokenizer, test: tuple[Example, ...], max_new_tokens: int, probes: tuple[tuple[str, str], ...]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`task_success` and :func:`probe_retention` (probes at :data:`PROBE_TOKENS`) from one decoding batch."""
    prompts = [ex.prompt for ex in test] + [p for p, _ in probes]
    limits = [max_new_tokens] * len(test) + [PROBE_TOKENS] * len(probes)
    answers = greedy_answers(model, tokenizer, prompts, limits)
    return _task_frame(test, answers[: len(test)]), _probe_frame(probes, answers[len(test) :])


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
    answers, kept = answer_all(model, tokenizer, test, max_new_tokens, probes)
    fmt, exact = rate_with_ci(answers["format_ok"]), rate_with_ci(answers["exact"])
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
