"""Tokenizers made here: a character vocabulary for pretraining and a byte-level BPE for tiny models."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from lab.errors import LabError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # pad=0, bos=1, eos=2 (circuit-tracer needs a BOS id != 0)


class CharTokenizer:
    """nanoGPT-style character vocabulary: one id per distinct character of the training text."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> int64 ids, shape (T,). Unknown characters raise LabError."""
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise LabError(f"character {e.args[0]!r} is not in the {self.vocab_size}-character vocabulary") from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars})

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        return cls(json.loads(text)["chars"])


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on ``texts`` (offline, seconds) and wrap it as a transformers tokenizer.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS). Byte-level, so every string round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
