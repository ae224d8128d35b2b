"""The tiny GPT: observable activations satisfy the residual-stream identities; both attention paths agree."""

import math

import pytest
import torch
import torch.nn.functional as F

from lab.errors import LabError
from lab.models.gpt import GPT, GPTConfig, hook_names

CFG = GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, d_model=32)


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    m = GPT(CFG).eval()
    with torch.no_grad():  # make it non-trivial: perturb all weights away from the tiny init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.fixture(scope="module")
def run(gpt):
    idx = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _, cache = gpt(idx, capture=hook_names(CFG.n_layer))
    return idx, logits, cache


class TestCapture:
    """Residual-stream identities hold exactly (up to float rounding)."""

    def test_block_identities(self, run):
        _, _, c = run
        for l in range(CFG.n_layer):
            torch.testing.assert_close(c[f"blocks.{l}.hook_resid_pre"] + c[f"blocks.{l}.hook_attn_out"],
                                       c[f"blocks.{l}.hook_resid_mid"])
            torch.testing.assert_close(c[f"blocks.{l}.hook_resid_mid"] + c[f"blocks.{l}.hook_mlp_out"],
                                       c[f"blocks.{l}.hook_resid_post"])
            if l + 1 < CFG.n_layer:
                assert torch.equal(c[f"blocks.{l}.hook_resid_post"], c[f"blocks.{l + 1}.hook_resid_pre"])
        torch.testing.assert_close(c["hook_embed"] + c["hook_pos_embed"], c["blocks.0.hook_resid_pre"])

    def test_final_norm_and_unembed_reproduce_logits(self, gpt, run):
        _, logits, c = run
        last = c[f"blocks.{CFG.n_layer - 1}.hook_resid_post"]
        manual = F.layer_norm(last, (CFG.d_model,), gpt.ln_f.weight) @ gpt.wte.weight.T
        torch.testing.assert_close(manual, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c["ln_final.hook_normalized"] @ gpt.wte.weight.T, logits)

    def test_patterns_are_causal_distributions(self, run):
        idx, _, c = run
        T = idx.shape[1]
        for l in range(CFG.n_layer):
            pat = c[f"blocks.{l}.attn.hook_pattern"]  # (B, nh, T, T)
            assert pat.shape == (2, CFG.n_head, T, T)
            torch.testing.assert_close(pat.sum(-1), torch.ones(2, CFG.n_head, T))
            assert torch.all(pat.triu(1) == 0)

    def test_pattern_matches_manual_softmax(self, gpt, run):
        _, _, c = run
        x = F.layer_norm(c["blocks.0.hook_resid_pre"], (CFG.d_model,), gpt.blocks[0].ln1.weight)
        q, k, _ = gpt.blocks[0].attn.qkv(x).split(CFG.d_model, dim=2)
        hs = CFG.d_model // CFG.n_head
        q = q.view(2, -1, CFG.n_head, hs).transpose(1, 2)
        k = k.view(2, -1, CFG.n_head, hs).transpose(1, 2)
        T = q.shape[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs) + torch.full((T, T), -1e9).triu(1)
        torch.testing.assert_close(scores.softmax(-1), c["blocks.0.attn.hook_pattern"])

    def test_eager_and_fused_paths_agree(self, gpt, run):
        idx, logits_eager, _ = run
        with torch.no_grad():
            logits_fused, _, cache = gpt(idx)
        assert cache == {}
        torch.testing.assert_close(logits_fused, logits_eager, rtol=1e-5, atol=1e-5)

    def test_opt_in_only(self, gpt, run):
        idx, _, _ = run
        _, _, cache = gpt(idx, capture=["blocks.1.hook_resid_mid"])
        assert list(cache) == ["blocks.1.hook_resid_mid"] and not cache["blocks.1.hook_resid_mid"].requires_grad

    def test_errors(self, gpt):
        with pytest.raises(LabError, match="unknown activation names"):
            gpt(torch.zeros(1, 4, dtype=torch.long), capture=["blocks.9.hook_resid_pre"])
        with pytest.raises(LabError, match="block size 16"):
            gpt(torch.zeros(1, 17, dtype=torch.long))

    def test_loss_is_cross_entropy_of_full_sequence_logits(self, gpt, run):
        idx, logits, _ = run
        _, loss, _ = gpt(idx[:, :-1], idx[:, 1:])
        torch.testing.assert_close(loss, F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size),
                                                         idx[:, 1:].reshape(-1)), rtol=1e-5, atol=1e-5)


class TestRoPE:
    """Rotary embeddings: attention scores depend only on the offset between positions."""

    def test_scores_depend_on_relative_position_only(self):
        from lab.models.gpt import apply_rope, rope_tables

        torch.manual_seed(0)
        hs, T = 8, 12
        q, k = torch.randn(hs), torch.randn(hs)
        cos, sin = rope_tables(T, hs)
        Q = apply_rope(q.expand(1, 1, T, hs), cos, sin)[0, 0]  # the same vector at every position
        K = apply_rope(k.expand(1, 1, T, hs), cos, sin)[0, 0]
        S = Q @ K.T  # (T, T) score of query at m with key at n
        for off in range(-3, 4):
            diag = torch.diagonal(S, offset=off)
            torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(S[5, 5], S[5, 2])  # but it does depend on the offset

    def test_rotation_preserves_norm(self):
        from lab.models.gpt import apply_rope, rope_tables

        x = torch.randn(2, 3, 10, 16)
        cos, sin = rope_tables(10, 16)
        torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))

    def test_rope_model_identities(self):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, d_model=16, pos_emb="rope")
        m = GPT(cfg).eval()
        idx = torch.randint(0, 30, (1, 8))
        logits, _, c = m(idx, capture=hook_names(2))
        assert "hook_pos_embed" not in c
        torch.testing.assert_close(c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"], c["blocks.1.hook_resid_post"])
        torch.testing.assert_close(m(idx)[0], logits, rtol=1e-5, atol=1e-5)  # fused == eager path
