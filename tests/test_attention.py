"""lab.attention: head scores on constructed patterns with known answers, and brute-force cross-checks."""

from __future__ import annotations

import math

import pytest
import torch

from lab.errors import LabError
from lab.interp import attention as att
from lab.tracks.B_attention import charts


def uniform_causal(T: int, L: int = 1, H: int = 1) -> torch.Tensor:
    """Every query attends equally to every key it can see."""
    p = torch.tril(torch.ones(T, T))
    p = p / p.sum(-1, keepdim=True)
    return p.expand(L, H, T, T).clone()


def one_hot_rows(targets: list[int]) -> torch.Tensor:
    """Row q puts all its weight on key targets[q]."""
    T = len(targets)
    p = torch.zeros(T, T)
    p[torch.arange(T), torch.tensor(targets)] = 1.0
    return p


def random_causal(T: int, L: int = 2, H: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(L, H, T, T, generator=g)
    return scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)


class TestHeadScores:
    """Entropy, sink share and previous-token score."""

    def test_uniform_attention_has_known_scores(self):
        T = 12
        s = att.head_scores(uniform_causal(T))
        assert s["entropy_norm"].item() == pytest.approx(1.0, abs=1e-6)
        assert s["entropy"].item() == pytest.approx(att.max_entropy(T), abs=1e-6)
        assert s["sink_share"].item() == pytest.approx(sum(1 / (q + 1) for q in range(1, T)) / (T - 1), abs=1e-6)
        assert s["prev_token"].item() == pytest.approx(att.chance_prev_token(T), abs=1e-6)

    def test_previous_token_and_sink_heads(self):
        T = 10
        prev = one_hot_rows([0] + list(range(T - 1)))[None, None]
        sink = one_hot_rows([0] * T)[None, None]
        sp, ss = att.head_scores(prev), att.head_scores(sink)
        assert sp["prev_token"].item() == 1.0 and sp["entropy"].item() == pytest.approx(0, abs=1e-9)
        assert sp["sink_share"].item() == pytest.approx(1 / (T - 1))  # only row 1's previous token is token 0
        assert ss["sink_share"].item() == 1.0 and ss["prev_token"].item() == 0.0

    def test_matches_brute_force_loops(self):
        p = random_causal(9)
        s = att.head_scores(p)
        L, H, T, _ = p.shape
        for l in range(L):
            for h in range(H):
                ent = [-sum(float(x) * math.log(float(x)) for x in p[l, h, q, : q + 1] if x > 0) for q in range(1, T)]
                assert s["entropy"][l, h].item() == pytest.approx(sum(ent) / len(ent), rel=1e-5)
                assert s["entropy_norm"][l, h].item() == pytest.approx(
                    sum(e / math.log(q + 1) for e, q in zip(ent, range(1, T), strict=True)) / (T - 1), rel=1e-5
                )
                assert s["sink_share"][l, h].item() == pytest.approx(float(p[l, h, 1:, 0].mean()), rel=1e-5)
                assert s["prev_token"][l, h].item() == pytest.approx(
                    sum(float(p[l, h, q, q - 1]) for q in range(2, T)) / (T - 2), rel=1e-5
                )

    def test_too_short(self):
        with pytest.raises(LabError, match="at least 3 tokens"):
            att.head_scores(uniform_causal(2))


class TestInduction:
    """Induction scores on repeated random sequences."""

    def test_repeated_random_tokens(self):
        g = torch.Generator().manual_seed(0)
        ids = att.repeated_random_tokens(7, range(10, 50), generator=g, prefix=[1])
        assert ids.shape == (1, 15) and ids[0, 0] == 1
        assert torch.equal(ids[0, 1:8], ids[0, 8:]) and len(set(ids[0, 1:8].tolist())) == 7
        with pytest.raises(LabError, match="distinct"):
            att.repeated_random_tokens(50, range(10), generator=g)

    def test_a_perfect_induction_head_scores_one(self):
        """Construct the pattern an ideal induction head computes from the tokens alone: attend to every key
        whose *previous* token equals the current token (else to the first token). On prefix + R + R it must
        score exactly 1."""
        n, prefix = 6, 1
        g = torch.Generator().manual_seed(1)
        toks = att.repeated_random_tokens(n, range(100), generator=g, prefix=[999])[0].tolist()
        T = len(toks)
        p = torch.zeros(T, T)
        for q in range(T):
            keys = [k for k in range(1, q + 1) if toks[k - 1] == toks[q]]
            for k in keys or [0]:
                p[q, k] = 1 / len(keys or [0])
        assert att.induction_scores(p[None, None], n, prefix).item() == pytest.approx(1.0)
        # ... and a previous-token head scores 0 on it (it looks one back, not n - 1 back).
        prev = one_hot_rows([0] + list(range(T - 1)))
        assert att.induction_scores(prev[None, None], n, prefix).item() == 0.0

    def test_uniform_attention_scores_the_analytic_chance_level(self):
        n, prefix = 8, 1
        T = prefix + 2 * n
        got = att.induction_scores(uniform_causal(T), n, prefix).item()
        assert got == pytest.approx(att.uniform_induction_score(n, prefix), abs=1e-7)
        assert got == pytest.approx(sum(1 / (prefix + n + i + 1) for i in range(n)) / n, abs=1e-7)

    def test_matches_a_loop_over_the_definition(self):
        n, prefix = 5, 2
        p = random_causal(prefix + 2 * n, seed=3)
        got = att.induction_scores(p, n, prefix)
        for l in range(p.shape[0]):
            for h in range(p.shape[1]):
                want = sum(float(p[l, h, prefix + n + i, prefix + i + 1]) for i in range(n)) / n
                assert got[l, h].item() == pytest.approx(want, rel=1e-6)

    def test_length_mismatch(self):
        with pytest.raises(LabError, match="pattern length"):
            att.induction_scores(uniform_causal(10), 5, 1)


class TestCompare:
    """Jensen–Shannon divergence and the per-head comparison."""

    def test_js_known_values(self):
        a = torch.tensor([1.0, 0.0])
        b = torch.tensor([0.0, 1.0])
        assert att.js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-9)
        assert att.js_divergence(a, b).item() == pytest.approx(1.0, abs=1e-6)  # disjoint: 1 bit
        p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
        m = (p + q) / 2

        def kl(x, y):
            return sum(float(xi) * math.log2(float(xi) / float(yi)) for xi, yi in zip(x, y, strict=True) if xi > 0)

        assert att.js_divergence(p, q).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-6)
        assert att.js_divergence(p, q).item() == pytest.approx(att.js_divergence(q, p).item(), rel=1e-9)

    def test_compare_patterns(self):
        a, b = random_causal(8, seed=0), random_causal(8, seed=1)
        same = att.compare_patterns(a, a)
        assert same["js_bits"].abs().max() < 1e-6 and same["entropy_change"].abs().max() == 0
        diff = att.compare_patterns(a, b)
        assert (diff["js_bits"] > 0).all()
        torch.testing.assert_close(diff["entropy_change"], diff["entropy_tuned"] - diff["entropy_base"])
        with pytest.raises(LabError, match="differ in shape"):
            att.compare_patterns(a, random_causal(9))


class TestFrames:
    """Frames, and the attention track's charts of them."""

    def test_pattern_frame_and_chart(self):
        p = random_causal(5)
        df = att.pattern_frame(p, [f"{i}:t" for i in range(5)], [(1, 2)], head_label="x")
        assert df.height == 15 and set(df["head_label"]) == {"x"}
        row = df.filter((df["query"] == 4) & (df["key"] == 1)).row(0, named=True)
        assert row["weight"] == pytest.approx(float(p[1, 2, 4, 1]))
        spec = charts.patterns(df).to_dict()
        assert spec["params"][0]["bind"]["options"] == ["x"]
        assert "datum.head_label == pattern" in [t.get("filter") for t in spec["transform"]]

    def test_head_frame_layer_profile_and_grid(self):
        s = att.head_scores(random_causal(8, L=3, H=2))
        s["induction"] = torch.rand(3, 2)
        df = att.head_frame(s)
        assert df.height == 6 and df.filter((df["layer"] == 2) & (df["head"] == 1))[
            "sink_share"
        ].item() == pytest.approx(float(s["sink_share"][2, 1]))
        prof = att.layer_profile(df)
        top = prof.filter(
            (prof["metric"] == "induction") & (prof["summary"] == "max over heads") & (prof["layer"] == 0)
        )
        assert top["value"].item() == pytest.approx(float(s["induction"][0].max()))
        assert charts.head_grid(df).to_dict()["params"][0]["bind"]["options"] == list(charts.HEAD_METRICS)
        charts.layer_profile(prof).to_dict()

    def test_token_labels_are_unique(self):
        from lab.models.loading import smoke_tokenizer

        tok = smoke_tokenizer()
        ids = tok("the the the").input_ids
        labels = att.token_labels(tok, ids)
        assert len(set(labels)) == len(labels)
