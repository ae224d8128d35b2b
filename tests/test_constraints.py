"""Track E's synthetic constraint corpus: deterministic, held out properly, scored exactly."""

import math

import pytest
import torch

from lab.data import constraints as C
from lab.errors import LabError


class TestCorpus:
    """Generated deterministically by seed, with held-out prompts that never leak into training."""

    def test_deterministic_and_seed_dependent(self):
        assert C.training_examples(seed=3) == C.training_examples(seed=3)
        assert C.training_examples(seed=3) != C.training_examples(seed=4)

    def test_counts_and_balance(self):
        rows = C.training_examples(per_type=32)
        for ctype, words in C.CONSTRAINTS.items():
            texts = [r["text"] for r in rows if r["constraint_type"] == ctype]
            assert len(texts) == 32 >= 25
            for w, concept in words.items():
                mine = [t for t in texts if w in t]
                assert len(mine) == 8 and all(concept in t for t in mine)
            assert len(set(texts)) == len(texts)  # varied surface forms, no duplicates

    def test_dataset_splits(self):
        ds = C.constraint_dataset(per_type=30, seed=1)
        assert set(ds) == {"train", "validation"}
        assert ds["train"].column_names == ["text", "constraint_type", "example_id"]
        ids = set(ds["train"]["example_id"]) | set(ds["validation"]["example_id"])
        assert len(ids) == ds["train"].num_rows + ds["validation"].num_rows == 60

    def test_held_out_prompts_do_not_leak(self):
        train = " ".join(r["text"] for r in C.training_examples())
        prompts = C.held_out_prompts()
        assert {p.constraint_type for p in prompts} == {"mapping", "spatial"}
        for p in prompts:
            assert p.prompt not in train
            assert not any(n in train for n in C._NAMES_TEST)
            assert p.target not in p.alternatives and len(p.alternatives) == 3

    def test_too_few_examples(self):
        with pytest.raises(LabError, match="too small"):
            C.training_examples(per_type=2)

    def test_graph_prompts_are_the_first_prompts_of_the_first_words(self):
        """Two words x two prompts per type, spelled out from the held-out templates (names, then things, vary)."""
        from lab.models.loading import smoke_tokenizer

        tok = smoke_tokenizer()
        rows = C.graph_prompts(tok, ["Write a poem"], graph_words=2, graph_per_word=2)
        mapping = "{n} was {w} the whole day. In one word, {n} felt"
        expected = [("seed-0", "seed", "", "User: Write a poem\nAssistant: ", "")]  # smoke BPE: no chat template
        for w, c in (("blarf", "happy"), ("gleem", "sad")):
            expected += [
                (f"mapping-{w}-{j}", "mapping", w, mapping.format(n=n, w=w), c) for j, n in enumerate(["Priya", "Hugo"])
            ]
        for w, c in (("florp", "up"), ("drenn", "down")):
            expected += [
                (f"spatial-{w}-{j}", "spatial", w, f"Priya saw {t} {w}. It moved", c)
                for j, t in enumerate(["the balloon", "the elevator"])
            ]
        keys = ("prompt_id", "constraint_type", "word", "text", "target")
        assert [tuple(r[k] for k in keys) for r in rows] == expected
        first = [None] + [tok.encode(" " + c, add_special_tokens=False)[0] for *_, c in expected[1:]]
        assert [r["target_id"] for r in rows] == first


class TestScoring:
    """Log-probability scoring agrees with an independent computation."""

    @pytest.fixture(scope="class")
    def lm(self):
        from lab.models.loading import load_tiny_model

        return load_tiny_model("llama", seed=0)

    def test_continuation_logprob_matches_token_by_token(self, lm):
        model, tok = lm.model, lm.tokenizer
        prompt, cont = "Hugo was blarf. He felt", " happy"
        got = C.continuation_logprob(model, tok, prompt, cont)
        ids = tok(prompt)["input_ids"]
        total = 0.0
        for t in tok(cont, add_special_tokens=False)["input_ids"]:  # one forward per token, prefix grows
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits, -1)[t].item()
            ids = ids + [t]
        assert got == pytest.approx(total, abs=1e-4)

    def test_score_frame(self, lm):
        prompts = C.held_out_prompts()[:3]
        df = C.score_prompts(lm.model, lm.tokenizer, prompts)
        assert df.height == 3
        for row, p in zip(df.iter_rows(named=True), prompts, strict=True):
            alts = [C.continuation_logprob(lm.model, lm.tokenizer, p.prompt, " " + a) for a in p.alternatives]
            # batched scoring equals the one-at-a-time log-probs to float rounding
            assert row["logprob_best_alternative"] == pytest.approx(max(alts), abs=1e-5)
            assert row["correct"] == (row["logprob_target"] > row["logprob_best_alternative"])
            assert row["margin"] == row["logprob_target"] - row["logprob_best_alternative"]
            assert math.isclose(row["margin"], row["logprob_target"] - max(alts), abs_tol=1e-4)
