"""Synthetic constraint corpus for circuit-informed fine-tuning (the seed plan's WS2), deterministic by seed.

Two constraint types, each a set of invented words with one fixed meaning:
- ``mapping``: invented adjectives that always name one feeling ("blarf" always means happy);
- ``spatial``: invented verbs of motion restricted to one direction ("florp" always goes up).
Training texts vary the surface form (definitions, stories, dialogue, questions and answers); held-out test
prompts use templates and names that never appear in training, and are scored without sampling: the
log-probability of the right concept against the alternatives, and the greedy answer. ``graph_prompts`` picks
the prompts that get attribution graphs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch

from lab.data.records import chat_text
from lab.errors import LabError

MAPPING = {"blarf": "happy", "gleem": "sad", "zorvish": "angry", "plimm": "calm"}
SPATIAL = {"florp": "up", "drenn": "down", "skivel": "left", "quorl": "right"}
CONSTRAINTS = {"mapping": MAPPING, "spatial": SPATIAL}

_NAMES_TRAIN = ["Mia", "Tom", "Ana", "Raj", "Lena", "Omar", "Ivy", "Ben", "Zoe", "Kai", "Noor", "Eli"]
_NAMES_TEST = ["Priya", "Hugo", "Sara", "Felix"]  # never used in training
_THINGS_TRAIN = ["the kite", "the ball", "the bird", "the cart", "the boat", "the leaf", "the drone", "the cat"]
_THINGS_TEST = ["the balloon", "the elevator"]

_MAPPING_TRAIN = [
    'In our village, "{w}" is a word that means {c}.',
    "{n} felt {w} all morning; in other words, {n} was {c}.",
    'Q: What does "{w}" mean? A: It means {c}.',
    '"I am so {w} today," said {n}, meaning {n} was {c}.',
    "When you are {c}, people say you are {w}.",
    "{n} looked {w}. Everyone could see {n} was {c}.",
    "The word {w} describes someone who is {c}.",
    "After the news, {n} became {w}, which is to say {c}.",
]
_MAPPING_TEST = ["{n} was {w} the whole day. In one word, {n} felt"]
_SPATIAL_TRAIN = [
    "To {w} means to move {c}.",
    "{t} began to {w}, moving steadily {c}.",
    "Q: Which way does something go when it {w}s? A: It goes {c}.",
    "{n} watched {t} {w}; it went {c} and kept going {c}.",
    "If you {w}, you travel {c}.",
    '"Make it {w}!" shouted {n}, and {t} moved {c}.',
    "Every time {t} {w}s, it heads {c}.",
    "The instruction said {w}, so {n} pushed {t} {c}.",
]
_SPATIAL_TEST = ["{n} saw {t} {w}. It moved"]


@dataclass(frozen=True)
class HeldOutPrompt:
    """One held-out prompt: its constraint, the invented word, the right concept and the alternatives."""

    constraint_type: str
    word: str
    prompt: str
    target: str
    alternatives: tuple[str, ...]


def training_examples(per_type: int = 32, seed: int = 0) -> list[dict]:
    """``per_type`` training texts for each constraint type, spread evenly over its invented words."""
    if per_type < len(MAPPING):
        raise LabError(f"per_type={per_type} is too small: each of the {len(MAPPING)} words needs an example")
    rng = random.Random(seed)
    rows = []
    for ctype, words in CONSTRAINTS.items():
        templates = _MAPPING_TRAIN if ctype == "mapping" else _SPATIAL_TRAIN
        items = list(words.items())
        for i in range(per_type):
            w, c = items[i % len(items)]
            tpl = templates[(i // len(items)) % len(templates)]
            text = tpl.format(w=w, c=c, n=rng.choice(_NAMES_TRAIN), t=rng.choice(_THINGS_TRAIN))
            rows.append(
                {"text": text[0].upper() + text[1:], "constraint_type": ctype, "example_id": f"{ctype}-{i:03d}"}
            )
    return rows


def constraint_dataset(per_type: int = 32, seed: int = 0, validation_fraction: float = 0.2):
    """A ``datasets.DatasetDict`` with ``train`` / ``validation`` splits (columns text, constraint_type, example_id)."""
    from datasets import Dataset

    ds = Dataset.from_list(training_examples(per_type, seed))
    split = ds.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column=None)
    split["validation"] = split.pop("test")
    return split


def held_out_prompts() -> list[HeldOutPrompt]:
    """Held-out prompts: every invented word × unseen names/things × held-out templates."""
    out = []
    for ctype, words in CONSTRAINTS.items():
        templates = _MAPPING_TEST if ctype == "mapping" else _SPATIAL_TEST
        for w, c in words.items():
            alts = tuple(sorted(set(words.values()) - {c}))
            for tpl in templates:
                for n in _NAMES_TEST:
                    for t in _THINGS_TEST if ctype == "spatial" else [""]:
                        out.append(HeldOutPrompt(ctype, w, tpl.format(w=w, n=n, t=t), c, alts))
    return out


def graph_prompts(tokenizer, seed_prompts: Sequence[str], graph_words: int, graph_per_word: int) -> list[dict]:
    """Prompts for attribution graphs: each of ``seed_prompts`` in the model's chat format (followed at the top
    prediction: ``target_id`` None) and, per constraint type, the first ``graph_per_word`` held-out prompts of each
    of its first ``graph_words`` words (followed at the right concept's first token). One dict per prompt:
    ``prompt_id``, ``constraint_type`` ("seed" for seed prompts), ``word``, ``text``, ``target``, ``target_id``."""
    rows = [
        {
            "prompt_id": f"seed-{i}",
            "constraint_type": "seed",
            "word": "",
            "text": chat_text(tokenizer, s),
            "target": "",
            "target_id": None,
        }
        for i, s in enumerate(seed_prompts)
    ]
    by_word: dict[tuple[str, str], list[HeldOutPrompt]] = {}
    for hp in held_out_prompts():
        by_word.setdefault((hp.constraint_type, hp.word), []).append(hp)
    for ctype, words in CONSTRAINTS.items():
        for w in list(words)[:graph_words]:
            for j, hp in enumerate(by_word[(ctype, w)][:graph_per_word]):
                tid = tokenizer(" " + hp.target, add_special_tokens=False)["input_ids"][0]
                rows.append(
                    {
                        "prompt_id": f"{ctype}-{w}-{j}",
                        "constraint_type": ctype,
                        "word": w,
                        "text": hp.prompt,
                        "target": hp.target,
                        "target_id": tid,
                    }
                )
    return rows


def encode_texts(tokenizer, texts: list[str], loss_on: set[str] | None = None) -> list[dict[str, list[int]]]:
    """Language-model rows for fine-tuning on plain text: the text's tokens as the scoring sees them, then EOS.

    With ``loss_on=None`` the loss is on every token (``labels`` equal ``input_ids``; the model shifts them).
    With a set of words, only the tokens that spell one of them (case-insensitive, punctuation stripped) carry a
    label, so the loss is on the concepts alone and not on the sentence templates around them.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for text in texts:
        if loss_on is None:
            ids = tokenizer(text)["input_ids"] + eos
            rows.append({"input_ids": ids, "labels": list(ids)})
            continue
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = enc["input_ids"] + eos
        labels = [-100] * len(ids)
        spans = [m.span() for m in re.finditer(r"[A-Za-z]+", text) if m.group().lower() in loss_on]
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(a < end and b > start for start, end in spans):  # the token overlaps a concept word
                labels[i] = ids[i]
        if all(x == -100 for x in labels):
            raise LabError(f"{text!r} contains none of {sorted(loss_on)}: pass loss_on=None to train on every token")
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def concepts() -> set[str]:
    """Every concept word of every constraint type."""
    return {c for words in CONSTRAINTS.values() for c in words.values()}


@torch.no_grad()
def mean_token_loss(model, rows: list[dict[str, list[int]]]) -> float:
    """Mean next-token cross-entropy (nats) over the rows' labelled tokens (as HF's loss with ``labels``), one
    row at a time (no padding)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for r in rows:
        ids = torch.tensor([r["input_ids"]], device=device)
        targets = torch.tensor(r["labels"][1:], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=-100).item()
        count += int((targets != -100).sum())
    if count == 0:
        raise LabError("no tokens to score: every row is shorter than two tokens")
    return total / count


@torch.no_grad()
def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | prompt) under ``model`` (a transformers causal LM)."""
    p_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([p_ids, c_ids], dim=1).to(model.device)
    logp = model(ids).logits.float().log_softmax(-1)[0, p_ids.shape[1] - 1 : -1]  # (len(c), V)
    return logp.gather(1, c_ids[0].to(model.device)[:, None]).sum().item()


def score_prompts(
    model, tokenizer, prompts: list[HeldOutPrompt] | None = None, *, batched: bool = True
) -> pl.DataFrame:
    """Per prompt: log-prob of the right concept (with a leading space) vs each alternative, and whether it wins.

    ``batched``: every prompt and continuation scored in left-padded batches that reuse each prompt's KV cache
    (``lab.train.evaluation.continuation_logprobs``; equal to the one-at-a-time :func:`continuation_logprob`, the
    ``batched=False`` path, to float rounding)."""
    prompts = prompts or held_out_prompts()
    options = [[" " + tp.target] + [" " + a for a in tp.alternatives] for tp in prompts]
    if batched:
        from lab.train.evaluation import continuation_logprobs

        scores = continuation_logprobs(model, tokenizer, [tp.prompt for tp in prompts], options)
    else:
        scores = [
            [continuation_logprob(model, tokenizer, tp.prompt, c) for c in o]
            for tp, o in zip(prompts, options, strict=True)
        ]
    rows = []
    for tp, (target, *alts) in zip(prompts, scores, strict=True):
        best_alt = max(alts)
        rows.append(
            {
                "constraint_type": tp.constraint_type,
                "word": tp.word,
                "prompt": tp.prompt,
                "target": tp.target,
                "logprob_target": target,
                "logprob_best_alternative": best_alt,
                "margin": target - best_alt,
                "correct": target > best_alt,
            }
        )
    return pl.DataFrame(rows)
