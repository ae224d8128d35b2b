"""Tokenizers round-trip text exactly."""

import pytest

from lab.data.corpus import smoke_text
from lab.errors import LabError
from lab.models.tokenizer import CharTokenizer, train_bpe_tokenizer

SAMPLES = [
    "To be, or not to be: that is the question.",
    "  leading spaces\n\ttabs\n",
    "naïve café — ünïcödé ✓ 漢字",
    "",
]


class TestCharTokenizer:
    """Character vocabulary: exact round trip, json round trip, clear error on unknown chars."""

    def test_round_trip(self):
        text = smoke_text()
        tok = CharTokenizer.from_text(text)
        assert tok.decode(tok.encode(text)) == text
        assert tok.vocab_size == len(set(text))

    def test_json_round_trip(self):
        tok = CharTokenizer.from_text("hello world")
        tok2 = CharTokenizer.from_json(tok.to_json())
        assert tok2.chars == tok.chars and tok2.encode("low").tolist() == tok.encode("low").tolist()

    def test_unknown_char(self):
        with pytest.raises(LabError, match="'z'"):
            CharTokenizer.from_text("abc").encode("abz")


class TestBPE:
    """Byte-level BPE trained here: any string round-trips; BOS is a special token with id 1."""

    @pytest.fixture(scope="class")
    def tok(self):
        return train_bpe_tokenizer([smoke_text()], vocab_size=400)

    @pytest.mark.parametrize("text", SAMPLES)
    def test_round_trip(self, tok, text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text

    def test_specials(self, tok):
        assert tok.bos_token_id == 1 and tok.pad_token_id == 0 and tok.eos_token_id == 2
        assert tok("the king")["input_ids"][0] == 1

    def test_learned_merges_compress(self, tok):
        line = "The king speaks of the moon."
        assert len(tok(line, add_special_tokens=False)["input_ids"]) < len(line.encode()) / 2

    def test_save_load(self, tok, tmp_path):
        from transformers import AutoTokenizer

        tok.save_pretrained(tmp_path)
        again = AutoTokenizer.from_pretrained(tmp_path)
        assert again("the ghost weeps")["input_ids"] == tok("the ghost weeps")["input_ids"]
