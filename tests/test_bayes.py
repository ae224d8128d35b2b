"""The bijection wind tunnel: task, exact posterior and metrics against independent truth; the models' wiring."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lab.data.windtunnel import (
    bayes_entropy_bits,
    bayes_posterior,
    key_positions,
    posterior_metrics,
    sample_batch,
    seq_len,
    summarize,
    uniform_floor_bits,
    value_log_probs,
)
from lab.errors import LabError
from lab.models.windtunnel import ModelSpec, build_model, n_params


def brute_force_posterior(keys: list[int], values: list[int], V: int) -> torch.Tensor:
    """P(pi(k_t) = v | first t-1 pairs) by enumerating all V! permutations, for every t: (V-1, V)."""
    perms = list(itertools.permutations(range(V)))
    out = torch.zeros(len(keys), V, dtype=torch.float64)
    for t, k in enumerate(keys):
        consistent = [p for p in perms if all(p[keys[i]] == values[i] for i in range(t))]
        for p in consistent:
            out[t, p[k]] += 1
        out[t] /= len(consistent)
    return out


class TestTask:
    """Sequences are what the paper describes."""

    def test_layout_and_bijection(self):
        V = 20
        b = sample_batch(V, 64, torch.Generator().manual_seed(0))
        assert b.tokens.shape == (64, 37) and seq_len(V) == 37
        assert torch.equal(b.tokens[:, 0::2], b.keys) and torch.equal(b.tokens[:, 1::2], b.values[:, :-1] + V)
        assert torch.equal(b.targets, b.values + V)
        for row_k, row_v in zip(b.keys.tolist(), b.values.tolist(), strict=True):
            assert len(set(row_k)) == V - 1 and len(set(row_v)) == V - 1  # distinct keys, injective pi
        assert key_positions(V).tolist() == list(range(0, 37, 2))

    def test_fresh_permutation_per_sequence(self):
        b = sample_batch(6, 2000, torch.Generator().manual_seed(1))
        # key 0's value, when key 0 is shown first, is uniform over 6 values across sequences
        first = b.values[:, 0][b.keys[:, 0] == 0]
        counts = torch.bincount(first, minlength=6).double()
        assert counts.min() > 0.6 * counts.mean()

    def test_bad_V_is_a_lab_error(self):
        with pytest.raises(LabError, match="V >= 3"):
            sample_batch(2, 4)


class TestPosterior:
    """The closed-form posterior against brute-force enumeration over permutations."""

    @pytest.mark.parametrize("V", [3, 4, 5])
    def test_matches_enumeration(self, V):
        b = sample_batch(V, 12, torch.Generator().manual_seed(V))
        post = bayes_posterior(b.values, V).double()
        for i in range(12):
            truth = brute_force_posterior(b.keys[i].tolist(), b.values[i].tolist(), V)
            torch.testing.assert_close(post[i], truth)

    def test_entropy_is_log2_of_remaining(self):
        V = 20
        b = sample_batch(V, 8, torch.Generator().manual_seed(0))
        post = bayes_posterior(b.values, V)
        h = -(torch.where(post > 0, post * post.clamp_min(1e-30).log2(), torch.zeros_like(post))).sum(-1)
        torch.testing.assert_close(h.double(), bayes_entropy_bits(V)[None].expand(8, -1), atol=1e-5, rtol=0)
        assert bayes_entropy_bits(V)[0] == pytest.approx(math.log2(20)) and bayes_entropy_bits(V)[-1] == 1.0


def _logits_from_value_probs(p: torch.Tensor, V: int) -> torch.Tensor:
    """Full-sequence logits (B, 2V-3, 2V) whose value softmax at key positions is ``p`` (B, V-1, V)."""
    B = p.shape[0]
    logits = torch.randn(B, seq_len(V), 2 * V)  # arbitrary elsewhere: the metric must ignore it
    logits[:, 0::2, V:] = torch.where(p > 0, p.log(), torch.full_like(p, -1e4))
    return logits


class TestMetric:
    """Entropy MAE and KL: analytic values for a perfect and a context-ignoring predictor."""

    def test_perfect_bayes_predictor_scores_zero(self):
        V = 20
        b = sample_batch(V, 256, torch.Generator().manual_seed(2))
        logits = _logits_from_value_probs(bayes_posterior(b.values, V), V)
        s = summarize(posterior_metrics(value_log_probs(logits, V), b.values, V))
        assert s["mae_bits"] == pytest.approx(0.0, abs=1e-5)
        assert s["kl_bits"] == pytest.approx(0.0, abs=1e-5)
        assert s["mass_eliminated"] == pytest.approx(0.0, abs=1e-6)

    @pytest.mark.parametrize("V", [5, 20])
    def test_uniform_predictor_scores_the_analytic_floor(self, V):
        b = sample_batch(V, 64, torch.Generator().manual_seed(3))
        logits = torch.zeros(64, seq_len(V), 2 * V)
        logits[:, :, :V] = 5.0  # key logits are excluded by the value-only softmax
        s = summarize(posterior_metrics(value_log_probs(logits, V), b.values, V))
        # derived independently: H_uniform = log2 V, H_t = log2(V - t + 1); sum_t log2(V-t+1) = log2(V!)
        floor = (n := V - 1) and (n * math.log2(V) - math.lgamma(V + 1) / math.log(2)) / n
        assert s["mae_bits"] == pytest.approx(floor, abs=1e-5)
        assert uniform_floor_bits(V) == pytest.approx(floor, abs=1e-12)
        # for the uniform guess, KL(posterior || uniform) = log2 V - H_t: the same number
        assert s["kl_bits"] == pytest.approx(floor, abs=1e-5)

    def test_floor_at_V20_is_1107_bits(self):
        assert round(uniform_floor_bits(20), 3) == 1.107

    def test_kl_and_eliminated_mass_match_a_direct_computation(self):
        V = 6
        b = sample_batch(V, 5, torch.Generator().manual_seed(4))
        logits = torch.randn(5, seq_len(V), 2 * V, generator=torch.Generator().manual_seed(5))
        m = posterior_metrics(value_log_probs(logits, V), b.values, V)
        for i in range(5):
            for t in range(V - 1):
                q = torch.softmax(logits[i, 2 * t, V:].double(), 0)
                seen = set(b.values[i, :t].tolist())
                rest = [v for v in range(V) if v not in seen]
                kl = sum((1 / len(rest)) * math.log2((1 / len(rest)) / q[v].item()) for v in rest)
                assert m["kl"][i, t].item() == pytest.approx(kl, abs=1e-4)
                assert m["mass_eliminated"][i, t].item() == pytest.approx(sum(q[v].item() for v in seen), abs=1e-5)
                h = -sum(x * math.log2(x) for x in q.tolist())
                assert m["h_model"][i, t].item() == pytest.approx(h, abs=1e-4)

    def test_authors_variant_averages_entropies_first(self):
        V = 5
        b = sample_batch(V, 2, torch.Generator().manual_seed(6))
        m = posterior_metrics(value_log_probs(torch.randn(2, seq_len(V), 2 * V), V), b.values, V)
        m["h_model"] = m["h_bayes"] + torch.tensor([[0.5] * 4, [-0.5] * 4])  # errors that cancel on average
        m["abs_err"] = (m["h_model"] - m["h_bayes"]).abs()
        s = summarize(m)
        assert s["mae_bits"] == pytest.approx(0.5) and s["mae_mean_entropy_bits"] == pytest.approx(0.0, abs=1e-6)


class TestModels:
    """Causality and context-blindness are properties of the wiring, checked by perturbing inputs."""

    V = 8

    def _out(self, model, tokens):
        out = model(tokens)
        return out[0] if isinstance(out, tuple) else out

    @pytest.mark.parametrize("kind", ["transformer", "lstm", "mlp"])
    def test_causal(self, kind):
        torch.manual_seed(0)
        model = build_model(ModelSpec(kind, n_layer=2, n_head=2, d_model=16, d_hidden=24), self.V).eval()
        b = sample_batch(self.V, 4, torch.Generator().manual_seed(0))
        other = b.tokens.clone()
        other[:, 7:] = (other[:, 7:] + 1) % (2 * self.V)
        a, c = self._out(model, b.tokens), self._out(model, other)
        torch.testing.assert_close(a[:, :7], c[:, :7])
        assert not torch.allclose(a[:, 7:], c[:, 7:])

    def test_mlp_is_context_blind(self):
        torch.manual_seed(0)
        model = build_model(ModelSpec("mlp", n_layer=2, d_model=16, d_hidden=24), self.V).eval()
        b = sample_batch(self.V, 4, torch.Generator().manual_seed(0))
        other = b.tokens.clone()
        other[:, :-1] = (other[:, :-1] + 3) % (2 * self.V)  # change everything but the last token
        torch.testing.assert_close(model(b.tokens)[:, -1], model(other)[:, -1])

    @pytest.mark.parametrize("kind", ["mlp", "lstm"])
    def test_controls_match_the_transformer_parameter_count(self, kind):
        tf = build_model(ModelSpec("transformer", n_layer=2, n_head=4, d_model=64), 20)
        ctl = build_model(ModelSpec(kind, n_layer=2, d_model=64), 20, match=n_params(tf))
        assert 0.9 * n_params(tf) <= n_params(ctl) <= n_params(tf)

    def test_tied_weights_counted_once(self):
        tf = build_model(ModelSpec("transformer", n_layer=1, n_head=1, d_model=8), 4)
        V2, T, C = 8, seq_len(4), 8
        per_block = 2 * C + 3 * C * C + C * C + 8 * C * C  # two LayerNorm weights, qkv, proj, 4x MLP
        assert n_params(tf) == V2 * C + T * C + per_block + C

    def test_spec_refuses_unknown_kind_bad_heads_and_sizes(self):
        """A ModelSpec validates itself: no model is ever built from a bad one."""
        with pytest.raises(LabError, match="unknown model kind 'rnn'"):
            ModelSpec("rnn")
        with pytest.raises(LabError, match="divisible"):
            ModelSpec("transformer", n_head=3, d_model=64)
        with pytest.raises(LabError, match="n_layer and d_model must be positive"):
            ModelSpec("mlp", n_layer=0)
        with pytest.raises(LabError, match="d_hidden >= 0"):
            ModelSpec("lstm", d_hidden=-1)
        assert ModelSpec("mlp", n_head=3, d_model=64).n_head == 3  # heads only constrain a transformer

    def test_control_without_width_or_target(self):
        with pytest.raises(LabError, match="d_hidden or a parameter count"):
            build_model(ModelSpec("mlp", d_model=16), 6)
