"""The fixed prompts the interpretability analyses share, and how they are encoded.

Plain text, no chat template; the SmolLM2 tokenizer (from its GGUF) prepends its BOS token ``<|im_start|>``, so
position 0 is always that token.
"""

from __future__ import annotations

import torch

from lab.errors import LabError
from lab.models.loading import LoadedModel

# Analysed by the attention and residual-stream tracks: facts, a story, code, names, a count, verse.
PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Alice gave the book to Bob because Bob had asked Alice for it yesterday.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
)
# Shown as heatmaps: it repeats a clause, so previous-token and induction heads both have something to do.
PATTERN_PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat."
# Prompts in the format of the fine-tuning task (lab.data.records: event records), with a name and a city from its
# held-out pools: what a model fine-tuned on it was trained to answer, so where its attention is most likely to differ.
TASK_PROMPTS = (
    "Log this event: Greta opened a bakery in Havana in 2011.",
    "Note this down: In 1998, Kofi started a new job in Riga.",
    "Make a record of this: Selin ran a marathon in Kyoto in 2016.",
)


def encode(lm: LoadedModel, text: str) -> torch.Tensor:
    """``(1, T)`` token ids of ``text`` with the tokenizer's own special tokens."""
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 3:
        raise LabError(f"prompt {text!r} is only {ids.shape[1]} tokens: use at least 3")
    return ids


def bos_ids(lm: LoadedModel) -> list[int]:
    """``[BOS id]`` when the tokenizer has one, else ``[]``."""
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []
