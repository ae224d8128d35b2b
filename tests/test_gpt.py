"""The tiny GPT: its hook points satisfy the residual-stream identities, read and replace activations, and leave
training on the fused path; both attention paths agree."""

import math

import pytest
import torch
import torch.nn.functional as F

from lab.errors import LabError
from lab.interp.interventions import replaced, zero_ablated
from lab.interp.names import act_name
from lab.models.gpt import GPT, GPTConfig, HookPoint, hook_names

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
            torch.testing.assert_close(
                c[act_name("resid_pre", l)] + c[act_name("attn_out", l)], c[act_name("resid_mid", l)]
            )
            torch.testing.assert_close(
                c[act_name("resid_mid", l)] + c[act_name("mlp_out", l)], c[act_name("resid_post", l)]
            )
            if l + 1 < CFG.n_layer:
                assert torch.equal(c[act_name("resid_post", l)], c[act_name("resid_pre", l + 1)])
        torch.testing.assert_close(c["hook_embed"] + c["hook_pos_embed"], c["blocks.0.hook_resid_pre"])

    def test_final_norm_and_unembed_reproduce_logits(self, gpt, run):
        _, logits, c = run
        last = c[act_name("resid_post", CFG.n_layer - 1)]
        manual = F.layer_norm(last, (CFG.d_model,), gpt.ln_final.weight) @ gpt.wte.weight.T
        torch.testing.assert_close(manual, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c["ln_final.hook_normalized"] @ gpt.wte.weight.T, logits)

    def test_patterns_are_causal_distributions(self, run):
        idx, _, c = run
        T = idx.shape[1]
        for l in range(CFG.n_layer):
            pat = c[act_name("pattern", l)]  # (B, nh, T, T)
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
        torch.testing.assert_close(
            loss,
            F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), idx[:, 1:].reshape(-1)),
            rtol=1e-5,
            atol=1e-5,
        )


class TestHookPoints:
    """Named identity modules: capture and interventions both go through them."""

    def test_names_come_from_the_module_tree(self, gpt):
        """The hook points' paths in the module tree are the names ``hook_names`` builds, in forward order."""
        assert list(gpt.hook_points()) == hook_names(CFG.n_layer)
        assert all(isinstance(m, HookPoint) for m in gpt.hook_points().values())

    def test_hook_z_is_the_per_head_input_of_the_output_projection(self, gpt, run):
        """attn_out = proj(z with its heads concatenated): z holds each head's output."""
        idx, _, c = run
        for l in range(CFG.n_layer):
            z = c[act_name("z", l)]  # (B, T, nh, hs)
            assert z.shape == (2, idx.shape[1], CFG.n_head, CFG.d_model // CFG.n_head)
            torch.testing.assert_close(gpt.blocks[l].attn.proj(z.flatten(2)), c[act_name("attn_out", l)])

    def test_pattern_is_materialised_only_when_hooked(self, gpt, run):
        """The eager softmax runs only for a layer whose pattern is requested; otherwise the fused kernel does."""
        idx, _, _ = run
        calls = []
        h = gpt.blocks[0].attn.hook_pattern.register_forward_pre_hook(lambda *a: calls.append(1))  # does not count
        try:
            gpt(idx, capture=[act_name("resid_mid", 0), act_name("z", 0)])
            assert calls == []
            gpt(idx, capture=[act_name("pattern", 0)])
            assert calls == [1]
        finally:
            h.remove()

    def test_hooks_are_removed_after_capture_and_after_errors(self, gpt, run):
        idx, _, _ = run
        gpt(idx, capture=hook_names(CFG.n_layer))
        with pytest.raises(LabError):
            gpt(torch.zeros(1, 17, dtype=torch.long), capture=["blocks.0.hook_resid_pre"])
        assert not any(p._forward_hooks for p in gpt.hook_points().values())

    def test_zero_ablating_the_last_mlp_unembeds_resid_mid(self, gpt, run):
        """Zeroing hook_mlp_out removes the MLP: the logits become the unembedded resid_mid."""
        idx, _, c = run
        last = CFG.n_layer - 1
        with torch.no_grad(), zero_ablated(gpt, [act_name("mlp_out", last)]):
            ablated, _, _ = gpt(idx)
        manual = gpt.lm_head(gpt.ln_final(c[act_name("resid_mid", last)]))
        torch.testing.assert_close(ablated, manual, rtol=1e-5, atol=1e-5)
        assert (ablated - run[1]).abs().max() > 1e-3  # the MLP mattered

    def test_replacing_resid_pre_changes_everything_downstream(self, gpt, run):
        """A replacement at a hook point is what the rest of the forward pass reads."""
        idx, _, c = run
        swapped = c[act_name("resid_pre", 1)].flip(0)  # the other sequence's stream
        with torch.no_grad(), replaced(gpt, {act_name("resid_pre", 1): lambda x: swapped}):
            got, _, cache = gpt(idx, capture=[act_name("resid_post", CFG.n_layer - 1)])  # reading while replacing
        torch.testing.assert_close(got, run[1].flip(0), rtol=1e-5, atol=1e-5)
        last = act_name("resid_post", CFG.n_layer - 1)
        torch.testing.assert_close(cache[last], c[last].flip(0), rtol=1e-5, atol=1e-5)

    def test_old_checkpoint_keys_load(self, gpt, run):
        """Checkpoints that call the final norm ``ln_f`` (before it became ``ln_final``) load unchanged."""
        idx, logits, _ = run
        old = {("ln_f.weight" if k == "ln_final.weight" else k): v for k, v in gpt.state_dict().items()}
        fresh = GPT(CFG).eval()
        fresh.load_state_dict(old)
        with torch.no_grad():
            torch.testing.assert_close(fresh(idx)[0], logits, rtol=1e-5, atol=1e-5)

    def test_compiles_without_graph_breaks(self, gpt, run):
        """Hook points without hooks are plain identities: torch.compile traces the model in one graph."""
        idx, logits, _ = run
        compiled = torch.compile(gpt, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(idx)[0], logits, rtol=1e-5, atol=1e-5)


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
        torch.testing.assert_close(
            c["blocks.1.hook_resid_mid"] + c["blocks.1.hook_mlp_out"], c["blocks.1.hook_resid_post"]
        )
        torch.testing.assert_close(m(idx)[0], logits, rtol=1e-5, atol=1e-5)  # fused == eager path
