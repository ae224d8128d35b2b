"""Mechanistic analyses of the wind-tunnel transformer, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lab.data.windtunnel import posterior_metrics, sample_batch, summarize, value_log_probs
from lab.errors import LabError
from lab.interp.names import FINAL_NAME
from lab.interp.windtunnel import (
    ablate,
    ablations,
    attention_routing,
    final_state_pca,
    key_orthogonality,
    lens_stages,
    logit_lens,
    mean_abs_offdiag_cos,
    random_vectors_abs_cos,
)
from lab.models.windtunnel import ModelSpec, build_model

V = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelSpec("transformer", n_layer=2, n_head=2, d_model=16), V).eval()
    with torch.no_grad():  # larger weights than the init so that every component matters
        for p in m.parameters():
            p.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def batch():
    return sample_batch(V, 64, torch.Generator().manual_seed(1))


def manual_attention(blk, x, skip_head: int | None = None) -> torch.Tensor:
    """Causal multi-head attention from the block's weights, optionally with one head's output set to zero."""
    B, T, C = x.shape
    nh = blk.attn.n_head
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in blk.attn.qkv(x).split(C, dim=2))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // nh)
    y = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v  # (B, nh, T, hs)
    if skip_head is not None:
        y[:, skip_head] = 0.0
    return blk.attn.proj(y.transpose(1, 2).reshape(B, T, C))


def manual_logits(
    model, tokens, skip_ffn: int | None = None, skip_attn: int | None = None, skip_head: tuple[int, int] | None = None
) -> torch.Tensor:
    """The GPT forward written out by hand, optionally without one layer's FFN, attention, or (layer, head)."""
    T = tokens.shape[1]
    x = model.wte(tokens) + model.wpe(torch.arange(T))
    for l, blk in enumerate(model.blocks):
        if l != skip_attn:
            x = x + manual_attention(blk, blk.ln1(x), skip_head[1] if skip_head and skip_head[0] == l else None)
        if l != skip_ffn:
            x = x + blk.mlp(blk.ln2(x))
    return model.lm_head(model.ln_final(x))


def metrics_of(logits, batch):
    return summarize(posterior_metrics(value_log_probs(logits, V), batch.values, V))


class TestGeometryHelpers:
    """Cosine statistics with known answers."""

    def test_offdiag_cos(self):
        assert mean_abs_offdiag_cos(torch.eye(5)) == pytest.approx(0.0)
        assert mean_abs_offdiag_cos(torch.ones(4, 3)) == pytest.approx(1.0)
        assert mean_abs_offdiag_cos(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(1.0)

    def test_random_vector_baseline(self):
        assert random_vectors_abs_cos(2) == pytest.approx(2 / math.pi)  # uniform angle on the circle
        assert random_vectors_abs_cos(3) == pytest.approx(0.5)  # cos uniform on [-1, 1] on the sphere
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(200_000, 16, generator=g), torch.randn(200_000, 16, generator=g)
        mc = (torch.nn.functional.cosine_similarity(a, b).abs().mean()).item()
        assert random_vectors_abs_cos(16) == pytest.approx(mc, abs=3e-3)


class TestKeys:
    def test_key_orthogonality_from_weights(self, model, batch):
        df = key_orthogonality(model, batch)
        assert df.height == 2 * model.cfg.n_head
        # independent: keys from embeddings by hand, averaged per token id with a Python loop
        blk = model.blocks[0]
        T = batch.tokens.shape[1]
        x = model.wte(batch.tokens) + model.wpe(torch.arange(T))
        k = blk.attn.qkv(blk.ln1(x))[..., 16:32].detach()  # (B, T, C) keys
        for h in range(2):
            kh = k[..., h * 8 : (h + 1) * 8]
            means = torch.stack([kh[batch.tokens == tok].mean(0) for tok in range(V)])
            got = df.filter((df["head"] == h) & (df["tokens"] == "key tokens"))["mean_abs_cos"].item()
            assert got == pytest.approx(mean_abs_offdiag_cos(means), abs=1e-5)


class TestRouting:
    def test_uniform_attention_has_analytic_masses(self, batch):
        torch.manual_seed(0)
        m = build_model(ModelSpec("transformer", n_layer=1, n_head=2, d_model=16), V).eval()
        with torch.no_grad():
            m.blocks[0].attn.qkv.weight[:32].zero_()  # q = k = 0: every query attends uniformly
        df = attention_routing(m, batch)
        qpos = np.arange(4, 2 * V - 3, 2)
        n = qpos + 1  # tokens visible from position p
        assert df["value_mass"][0] == pytest.approx(np.mean((qpos // 2) / n))
        assert df["key_mass"][0] == pytest.approx(np.mean((qpos // 2) / n))
        assert df["self_mass"][0] == pytest.approx(np.mean(1 / n))
        assert df["value_evenness"][0] == pytest.approx(1.0)

    def test_masses_sum_to_one(self, model, batch):
        df = attention_routing(model, batch)
        total = df["value_mass"] + df["key_mass"] + df["self_mass"]
        assert np.allclose(total.to_numpy(), 1.0, atol=1e-5)


class TestPCA:
    def test_against_numpy(self, model, batch):
        comps, points = final_state_pca(model, batch, n_components=3)
        _, _, cache = model(batch.tokens, capture={FINAL_NAME})
        X = cache[FINAL_NAME][:, 0::2].reshape(-1, 16).double().numpy()
        ev = np.linalg.eigvalsh(np.cov(X.T))[::-1]
        np.testing.assert_allclose(comps["variance_share"].to_numpy(), (ev / ev.sum())[:3], rtol=1e-6)
        r = np.corrcoef(points["pc1"].to_numpy(), points["h_bayes"].to_numpy())[0, 1]
        assert comps["corr_h_bayes"][0] == pytest.approx(r, abs=1e-9)
        assert points.height == batch.tokens.shape[0] * (V - 1)


class TestLens:
    def test_last_stage_is_the_output(self, model, batch):
        df = logit_lens(model, batch)
        assert df.height == len(lens_stages(2)) == 5
        out = metrics_of(model(batch.tokens)[0], batch)
        assert df["kl_bits"][-1] == pytest.approx(out["kl_bits"], rel=1e-5)
        assert df["mae_bits"][-1] == pytest.approx(out["mae_bits"], rel=1e-5)


class TestAblation:
    def test_ffn_zero_equals_manual_forward_without_it(self, model, batch):
        for l in range(2):
            got = ablate(model, batch, "ffn", l)
            want = metrics_of(manual_logits(model, batch.tokens, skip_ffn=l), batch)
            assert got["kl_bits"] == pytest.approx(want["kl_bits"], rel=1e-5)
            got = ablate(model, batch, "attn", l)
            want = metrics_of(manual_logits(model, batch.tokens, skip_attn=l), batch)
            assert got["kl_bits"] == pytest.approx(want["kl_bits"], rel=1e-5)

    def test_head_zero_equals_manual_forward_without_it(self, model, batch):
        """Zeroing one head's slice of attn.hook_z = recomputing attention by hand without that head."""
        with torch.no_grad():
            torch.testing.assert_close(manual_logits(model, batch.tokens), model(batch.tokens)[0], rtol=1e-4, atol=1e-3)
            for l, h in ((0, 0), (0, 1), (1, 1)):
                got = ablate(model, batch, "head", l, h)
                want = metrics_of(manual_logits(model, batch.tokens, skip_head=(l, h)), batch)
                assert got["kl_bits"] == pytest.approx(want["kl_bits"], rel=1e-5)
                assert got["kl_bits"] != pytest.approx(ablate(model, batch, "head", l, 1 - h)["kl_bits"], rel=1e-3)

    def test_single_head_ablation_equals_block_ablation(self, batch):
        torch.manual_seed(1)
        m = build_model(ModelSpec("transformer", n_layer=2, n_head=1, d_model=16), V).eval()
        for method in ("zero", "mean"):  # proj is linear without bias: its input's mean maps to its output's mean
            a = ablate(m, batch, "head", 0, 0, method)
            b = ablate(m, batch, "attn", 0, method=method)
            assert a["kl_bits"] == pytest.approx(b["kl_bits"], rel=1e-5)

    def test_hooks_are_removed(self, model, batch):
        before = metrics_of(model(batch.tokens)[0], batch)
        df = ablations(model, batch)
        after = metrics_of(model(batch.tokens)[0], batch)
        assert before == after
        assert df.filter(df["target"] == "none")["mae_bits"].item() == pytest.approx(before["mae_bits"])
        assert df.height == 1 + 2 * (2 * 2 + 2)

    def test_bad_arguments(self, model, batch):
        with pytest.raises(LabError, match="target"):
            ablate(model, batch, "mlp", 0)
        with pytest.raises(LabError, match="out of range"):
            ablate(model, batch, "ffn", 5)
        with pytest.raises(LabError, match="head must be"):
            ablate(model, batch, "head", 0, 7)
        with pytest.raises(LabError, match="lab.models.gpt.GPT"):
            logit_lens(build_model(ModelSpec("mlp", d_model=8, d_hidden=8), V), batch)
