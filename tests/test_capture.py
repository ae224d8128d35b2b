"""lab.interp.capture: TransformerLens-named capture on every tiny architecture (Llama, Qwen2, Gemma2, GPT-2,
Mistral, Qwen3, Phi-3, Gemma 3), checked against exact identities, HF's own outputs and TransformerLens; the eager
switch, the memory guard, streaming and zero-ablation."""

from __future__ import annotations

import re

import pytest
import torch

from lab.errors import LabError
from lab.interp.adapters import adapter_for
from lab.interp.capture import capture, estimate, invariant_errors, load_streamed, model_shape, unembed
from lab.interp.interventions import replaced, run_with_ablation
from lab.interp.names import FINAL_NAME, KINDS, PATTERN_KIND, RESIDUAL_KINDS, act_name, hook_names
from lab.models.loading import CAPTURE_ARCHS, load_tiny_model

ATOL = 1e-6  # float32; the identities hold to ~2e-7 on every family in practice (see the C_probing page)


def _ids(lm, batch=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(lm.tokenizer), (batch, T), generator=g)


def _all_names(model):
    return [*hook_names(adapter_for(model).n_layers(), KINDS), FINAL_NAME]


def _twin(lm, attn_implementation):
    """An independent copy of the same tiny model (same seed), loaded with ``attn_implementation``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(lm.model.config, attn_implementation=attn_implementation)
    m.load_state_dict(lm.model.state_dict())
    return m.eval()


class TestInvariants:
    """The residual-stream identities and parity with HF, on Llama, Qwen2, Gemma2 and GPT-2."""

    def test_residual_identities(self, tiny_model):
        m = tiny_model.model
        cap = capture(m, _ids(tiny_model), _all_names(m))
        n = adapter_for(m).n_layers()
        for l in range(n):
            pre, attn, mid = (cap[act_name(k, l)] for k in ("resid_pre", "attn_out", "resid_mid"))
            mlp, post = cap[act_name("mlp_out", l)], cap[act_name("resid_post", l)]
            torch.testing.assert_close(pre + attn, mid, atol=ATOL, rtol=0)
            torch.testing.assert_close(mid + mlp, post, atol=ATOL, rtol=0)
            assert attn.abs().max() > 0 and mlp.abs().max() > 0  # not trivially satisfied
            if l + 1 < n:
                torch.testing.assert_close(post, cap[act_name("resid_pre", l + 1)], atol=0, rtol=0)

    def test_first_resid_pre_is_the_embedding(self, tiny_model):
        m = tiny_model.model
        ids = _ids(tiny_model)
        cap = capture(m, ids, ["blocks.0.hook_resid_pre"])
        with torch.no_grad():
            hidden = m(input_ids=ids, output_hidden_states=True).hidden_states  # HF: embeddings, then each block
        torch.testing.assert_close(cap["blocks.0.hook_resid_pre"], hidden[0], atol=ATOL, rtol=0)

    def test_patterns_equal_hf_eager_output_attentions(self, tiny_model):
        m = tiny_model.model
        ids = _ids(tiny_model)
        n = adapter_for(m).n_layers()
        cap = capture(m, ids, hook_names(n, [PATTERN_KIND]))
        with torch.no_grad():
            ref = _twin(tiny_model, "eager")(input_ids=ids, output_attentions=True).attentions
        for l in range(n):
            torch.testing.assert_close(cap[act_name("pattern", l)], ref[l], atol=1e-6, rtol=0)

    def test_pattern_rows_sum_to_one_and_are_causal(self, tiny_model):
        m = tiny_model.model
        cap = capture(m, _ids(tiny_model), hook_names(adapter_for(m).n_layers(), [PATTERN_KIND]))
        for name, p in cap.tensors.items():
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
            assert torch.triu(p, diagonal=1).abs().max() == 0, name
            assert (p >= 0).all()

    def test_patterns_are_per_query_head(self, tiny_model):
        m = tiny_model.model
        shape = model_shape(m)
        cap = capture(m, _ids(tiny_model, T=10), ["blocks.0.attn.hook_pattern"])
        assert cap["blocks.0.attn.hook_pattern"].shape == (2, shape["n_heads"], 10, 10)
        if tiny_model.arch != "gpt2":
            assert shape["n_kv_heads"] < shape["n_heads"]  # the tiny configs really use grouped-query attention

    def test_final_norm_and_unembedding_reproduce_hf_logits(self, tiny_model):
        m = tiny_model.model
        ids = _ids(tiny_model)
        n = adapter_for(m).n_layers()
        last = act_name("resid_post", n - 1)
        cap = capture(m, ids, [last, FINAL_NAME])
        with torch.no_grad():
            hf = _twin(tiny_model, m.config._attn_implementation)(input_ids=ids).logits
            from_final = m.get_output_embeddings()(cap[FINAL_NAME])
        softcap = getattr(m.config, "final_logit_softcapping", None)
        if softcap is not None:  # Gemma2 soft-caps its logits
            from_final = torch.tanh(from_final / softcap) * softcap
        torch.testing.assert_close(unembed(m, cap[last]), hf, atol=1e-5, rtol=0)
        torch.testing.assert_close(from_final, hf, atol=1e-5, rtol=0)
        torch.testing.assert_close(cap.logits, hf, atol=1e-5, rtol=0)

    def test_invariant_errors_reports_all_small(self, tiny_model):
        errs = invariant_errors(tiny_model.model, _ids(tiny_model))
        assert len(errs) == 8 and max(errs.values()) < 1e-5, errs


class TestArchitectureSpecifics:
    """What each name holds where families differ."""

    @pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
    def test_gemma_attn_out_is_post_normed(self, arch):
        """Gemma2 / Gemma 3 sandwich norms: attn_out is post_attention_layernorm's output, not self_attn's."""
        lm = load_tiny_model(arch)
        block = lm.model.model.layers[0]
        raw = {}

        def keep(mod, args, out):
            raw["attn"] = out[0].detach()  # returns None: the output is left alone

        h = block.self_attn.register_forward_hook(keep)
        ids = _ids(lm)
        try:
            cap = capture(lm.model, ids, ["blocks.0.hook_attn_out"])
        finally:
            h.remove()
        with torch.no_grad():
            normed = block.post_attention_layernorm(raw["attn"])
        torch.testing.assert_close(cap["blocks.0.hook_attn_out"], normed, atol=0, rtol=0)
        assert (cap["blocks.0.hook_attn_out"] - raw["attn"]).abs().max() > 1e-3  # the norm really changes it

    def test_phi3_sublayer_outputs_are_what_the_dropouts_add(self):
        """Phi-3 adds dropout(attn_out): in training mode the identities hold only if attn_out / mlp_out are
        read after the dropouts, as the adapter does."""
        from transformers import AutoModelForCausalLM

        lm = load_tiny_model("phi3")
        cfg = lm.model.config
        cfg.resid_pdrop = 0.5
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        m.load_state_dict(lm.model.state_dict())
        m.train()
        torch.manual_seed(1)
        cap = capture(m, _ids(lm), hook_names(2, RESIDUAL_KINDS))
        for l in range(2):
            torch.testing.assert_close(
                cap[act_name("resid_pre", l)] + cap[act_name("attn_out", l)],
                cap[act_name("resid_mid", l)],
                atol=ATOL,
                rtol=0,
            )
            torch.testing.assert_close(
                cap[act_name("resid_mid", l)] + cap[act_name("mlp_out", l)],
                cap[act_name("resid_post", l)],
                atol=ATOL,
                rtol=0,
            )
            assert (cap[act_name("attn_out", l)] == 0).float().mean() > 0.3  # dropout really zeroed entries

    def test_qwen3_and_gemma3_patterns_use_their_qk_norms(self):
        """Qwen3 / Gemma 3 normalise q and k inside attention: scaling q_norm's weight changes the captured
        pattern exactly as it changes HF's own eager attentions."""
        for arch in ("qwen3", "gemma3"):
            lm = load_tiny_model(arch)
            ids = _ids(lm)
            before = capture(lm.model, ids, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
            with torch.no_grad():
                lm.model.model.layers[0].self_attn.q_norm.weight.add_(2.0)  # x3 (Gemma scales by 1 + w)
            after = capture(lm.model, ids, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
            with torch.no_grad():
                ref = _twin(lm, "eager")(input_ids=ids, output_attentions=True).attentions[0]
            torch.testing.assert_close(after, ref, atol=1e-6, rtol=0)
            assert (after - before).abs().max() > 1e-3, arch

    def test_mistral_sliding_window_is_in_the_patterns(self):
        """Mistral's tiny config attends within 16 tokens: no query sees a key more than 15 positions back."""
        lm = load_tiny_model("mistral")
        assert lm.model.config.sliding_window == 16
        pat = capture(lm.model, _ids(lm, T=40), hook_names(2, [PATTERN_KIND]))
        query, key = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
        for p in pat.tensors.values():
            assert p[..., query - key >= 16].abs().max() == 0
            assert p[..., (query - key < 16) & (query >= key)].min() > 0

    def test_llama_patterns_from_first_principles(self):
        """Recompute layer-0 patterns from resid_pre with the q/k projections, RoPE and GQA head sharing."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        lm = load_tiny_model("llama")
        m, cfg = lm.model, lm.model.config
        ids = _ids(lm, batch=1, T=16)
        cap = capture(m, ids, ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"])
        attn = m.model.layers[0].self_attn
        hd = cfg.hidden_size // cfg.num_attention_heads
        with torch.no_grad():
            x = m.model.layers[0].input_layernorm(cap["blocks.0.hook_resid_pre"])
            q = attn.q_proj(x).view(1, 16, cfg.num_attention_heads, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, 16, cfg.num_key_value_heads, hd).transpose(1, 2)
            cos, sin = m.model.rotary_emb(x, torch.arange(16)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            for h in range(cfg.num_attention_heads):
                scores = q[0, h] @ k[0, h // group].T / hd**0.5
                scores = scores.masked_fill(torch.triu(torch.ones(16, 16, dtype=torch.bool), 1), float("-inf"))
                torch.testing.assert_close(
                    cap["blocks.0.attn.hook_pattern"][0, h], scores.softmax(-1), atol=1e-6, rtol=0
                )

    def test_peft_wrapped_model_is_unwrapped(self):
        from peft import LoraConfig, get_peft_model

        base = load_tiny_model("llama")
        ids = _ids(base)
        names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
        ref = capture(base.model, ids, names)
        tuned = get_peft_model(load_tiny_model("llama").model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        got = capture(tuned, ids, names)  # LoRA B = 0 at init: same activations, through the wrapper
        for n in names:
            torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0)

    def test_unknown_family_is_refused(self):
        from transformers import BertConfig, BertLMHeadModel

        with pytest.raises(
            LabError,
            match="no capture adapter for model_type 'bert': supported are llama, qwen2, "
            "mistral, qwen3, phi3, gemma2, gemma3_text, gpt2",
        ):
            adapter_for(
                BertLMHeadModel(
                    BertConfig(
                        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50
                    )
                )
            )


class TestEagerSwitch:
    """Eager attention only while patterns are captured; hooks never left behind."""

    def _sdpa_llama(self):
        lm = load_tiny_model("llama")
        assert lm.model.config._attn_implementation == "sdpa"
        return lm

    def test_switches_only_for_patterns_and_restores(self):
        lm = self._sdpa_llama()
        seen = []
        h = lm.model.model.layers[0].register_forward_hook(lambda *a: seen.append(lm.model.config._attn_implementation))
        try:
            capture(lm.model, _ids(lm), ["blocks.0.hook_resid_post"])
            capture(lm.model, _ids(lm), ["blocks.0.attn.hook_pattern"])
        finally:
            h.remove()
        assert seen == ["sdpa", "eager"]
        assert lm.model.config._attn_implementation == "sdpa"

    def test_restores_after_an_error_and_removes_hooks(self):
        lm = self._sdpa_llama()

        def boom(*a):
            raise RuntimeError("boom")

        h = lm.model.model.layers[1].register_forward_hook(boom)
        before = [len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in lm.model.modules()]
        try:
            with pytest.raises(RuntimeError, match="boom"):
                capture(lm.model, _ids(lm), _all_names(lm.model))
        finally:
            h.remove()
        assert lm.model.config._attn_implementation == "sdpa"
        after = [len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in lm.model.modules()]
        assert [
            a + (1 if mod is lm.model.model.layers[1] else 0) for a, mod in zip(after, lm.model.modules(), strict=True)
        ] == before

    def test_captured_tensors_are_detached_cpu(self):
        lm = self._sdpa_llama()
        cap = capture(lm.model, _ids(lm), _all_names(lm.model))
        for t in [*cap.tensors.values(), cap.logits]:
            assert t.device.type == "cpu" and not t.requires_grad and t.grad_fn is None


class TestMemoryGuard:
    """Estimates, refusal before compute, heads subsets, streaming to disk."""

    def _llama(self):
        return load_tiny_model("llama")

    def test_estimate_equals_captured_bytes(self):
        lm = self._llama()
        ids = _ids(lm, batch=2, T=40)
        names = _all_names(lm.model)
        est = estimate(lm.model, ids, names)
        cap = capture(lm.model, ids, names)
        held = sum(t.numel() * t.element_size() for t in cap.tensors.values())
        assert est.patterns + est.residuals == held
        assert est.logits == cap.logits.numel() * cap.logits.element_size()
        assert est.patterns == 2 * 2 * 4 * 40 * 40 * 4  # batch x layers x heads x T^2 x float32

    def test_refuses_before_any_forward_and_names_the_ways_out(self):
        """Two layers' patterns (1.28 MB) are over a 1 MB budget, one layer's (640 kB, plus 309 kB of logits)
        is not: every way out is offered, streaming included."""
        lm = self._llama()
        calls = []
        h = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
        ids = _ids(lm, batch=1, T=200)
        try:
            with pytest.raises(LabError) as err:
                capture(lm.model, ids, hook_names(2, [PATTERN_KIND]), max_bytes=1_000_000)
        finally:
            h.remove()
        assert calls == []
        msg = str(err.value)
        for way in ("fewer layers", "fewer heads", "shorter text", "streaming to disk (stream_to", "max_bytes"):
            assert way in msg, way
        # "at most ~N tokens fit": N really fits and N + 1 does not (brute force over the estimate).
        fit = int(msg.split("at most ~")[1].split()[0])
        names = hook_names(2, [PATTERN_KIND])
        assert estimate(lm.model, _ids(lm, 1, fit), names).patterns <= 1_000_000
        assert estimate(lm.model, _ids(lm, 1, fit + 1), names).patterns > 1_000_000

    def test_no_streaming_offered_when_one_layer_is_over_the_budget(self):
        """The issue's case: 20k tokens, 1 GiB. One layer's patterns (4 heads x 20000^2 x 4 B = 6.4 GB) exceed the
        budget, so streaming is not offered; the tokens that fit and the bytes needed are right (pattern_bytes)."""
        from transformers import AutoModelForCausalLM

        from lab.interp.capture import DEFAULT_MAX_BYTES, pattern_bytes
        from lab.models.loading import tiny_config

        cfg = tiny_config("llama", vocab_size=512)
        cfg.max_position_embeddings = 1 << 15  # so the position limit lets 20k tokens through to the guard
        model = AutoModelForCausalLM.from_config(cfg).eval()
        budget, T = DEFAULT_MAX_BYTES, 20_000
        for logits in (True, False):
            with pytest.raises(LabError) as err:
                capture(model, torch.zeros((1, T), dtype=torch.long), hook_names(2, [PATTERN_KIND]), logits=logits)
            msg = str(err.value)
            assert "neither fewer layers nor streaming to disk fits" in msg
            assert "streaming to disk (" not in msg and "streaming to disk with" not in msg
            assert "fewer heads" not in msg  # even one head of one layer is 1.6 GB
            assert pattern_bytes(1, 1, 1, T) > budget
            fit = int(msg.split("at most ~")[1].split()[0])  # streamed: one layer at a time
            assert pattern_bytes(1, 1, 4, fit) <= budget < pattern_bytes(1, 1, 4, fit + 1)
            in_memory = int(msg.split("; ~")[1].split()[0])  # both layers held
            assert pattern_bytes(1, 2, 4, in_memory) <= budget < pattern_bytes(1, 2, 4, in_memory + 1)
            assert f"at least {pattern_bytes(1, 1, 4, T)} = " in msg
            requested = pattern_bytes(1, 2, 4, T) + (T * 512 * 4 if logits else 0)
            assert f"; {requested} as requested" in msg

    def test_one_layer_over_the_budget_suggestions_do_fit(self, tmp_path):
        """The shorter text and the fewer heads the guard names really pass it, streamed; one more does not."""
        from lab.interp.capture import pattern_bytes

        lm = self._llama()
        names = hook_names(2, [PATTERN_KIND])
        budget = 100_000
        with pytest.raises(LabError) as err:
            capture(lm.model, _ids(lm, 1, 100), names, max_bytes=budget, logits=False)
        msg = str(err.value)
        assert "streaming to disk (" not in msg
        tokens = int(msg.split("at most ~")[1].split()[0])
        heads = int(msg.split("fewer heads (at most ")[1].split()[0])
        assert (tokens, heads) == (79, 2)
        assert pattern_bytes(1, 1, 4, tokens) <= budget < pattern_bytes(1, 1, 4, tokens + 1)
        assert pattern_bytes(1, 1, heads, 100) <= budget < pattern_bytes(1, 1, heads + 1, 100)
        kw = dict(max_bytes=budget, logits=False, stream_to=tmp_path)
        assert len(capture(lm.model, _ids(lm, 1, tokens), names, **kw).files) == 2
        with pytest.raises(LabError, match="even one layer's patterns"):
            capture(lm.model, _ids(lm, 1, tokens + 1), names, **kw)
        assert len(capture(lm.model, _ids(lm, 1, 100), names, heads=list(range(heads)), **kw).files) == 2
        with pytest.raises(LabError, match="even one layer's patterns"):
            capture(lm.model, _ids(lm, 1, 100), names, heads=list(range(heads + 1)), **kw)

    def test_streaming_a_long_input_matches_in_memory(self, tmp_path):
        lm = self._llama()
        ids = _ids(lm, batch=1, T=200)
        names = [*hook_names(2, [PATTERN_KIND, "hook_resid_post"])]
        budget = 800_000  # in memory: 2 x 4 x 200^2 x 4 = 1.28 MB of patterns, refused; one layer (640 kB) fits
        with pytest.raises(LabError):
            capture(lm.model, ids, names, max_bytes=budget, logits=False)
        streamed = capture(lm.model, ids, names, max_bytes=budget, logits=False, stream_to=tmp_path)
        assert streamed.tensors == {} and streamed.logits is None
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.safetensors" for n in names)
        full = capture(lm.model, ids, names, logits=False)
        for n in names:
            torch.testing.assert_close(streamed[n], full[n], atol=0, rtol=0)
            torch.testing.assert_close(load_streamed(tmp_path / f"{n}.safetensors", n), full[n], atol=0, rtol=0)

    def test_heads_subset(self):
        lm = self._llama()
        ids = _ids(lm)
        full = capture(lm.model, ids, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
        some = capture(lm.model, ids, ["blocks.1.attn.hook_pattern"], heads=[3, 1])["blocks.1.attn.hook_pattern"]
        torch.testing.assert_close(some, full[:, [3, 1]], atol=0, rtol=0)
        assert estimate(lm.model, ids, ["blocks.1.attn.hook_pattern"], heads=[3, 1]).patterns == some.numel() * 4

    @pytest.mark.parametrize(
        "names, kwargs, match",
        [
            (["blocks.0.hook_nope"], {}, "unknown hook name"),
            (["blocks.9.hook_resid_pre"], {}, "has 2 layers"),
            (["blocks.0.attn.hook_pattern"], {"heads": [7]}, "4 query heads"),
            (["blocks.0.attn.hook_z"], {}, "unknown hook name"),  # lab's GPT only
        ],
    )
    def test_bad_requests(self, names, kwargs, match):
        lm = self._llama()
        with pytest.raises(LabError, match=match):
            capture(lm.model, _ids(lm), names, **kwargs)

    def test_bad_token_ids_and_shapes(self):
        lm = self._llama()
        with pytest.raises(LabError, match="token ids must lie in"):
            capture(lm.model, torch.tensor([[1, 2, 10_000]]), ["blocks.0.hook_resid_pre"])
        with pytest.raises(LabError, match="batch"):
            capture(lm.model, torch.tensor([1, 2, 3]), ["blocks.0.hook_resid_pre"])
        with pytest.raises(LabError, match="unknown hook kind"):
            hook_names(2, ["resid"])


BAD_INPUTS = [  # (what, input_ids, keyword arguments, the fix the message must name)
    ("no tokens", torch.zeros((1, 0), dtype=torch.long), {}, "holds no tokens: pass at least one row"),
    ("no rows", torch.zeros((0, 5), dtype=torch.long), {}, "holds no tokens: pass at least one row"),
    ("float ids", torch.ones((1, 5)), {}, "integer token ids (torch.long), got dtype torch.float32"),
    ("bool ids", torch.ones((1, 5), dtype=torch.bool), {}, "got dtype torch.bool: encode text"),
    ("1-D ids", torch.ones(5, dtype=torch.long), {}, "got shape (5,): add a batch axis"),
    ("3-D ids", torch.ones((1, 1, 5), dtype=torch.long), {}, "got shape (1, 1, 5): pass a 2-D tensor"),
    ("a list", [[1, 2, 3]], {}, "must be a torch.Tensor of token ids, got list"),
    ("past the vocabulary", torch.tensor([[1, 2, 10_000]]), {}, "token ids must lie in 0..385"),
    ("negative id", torch.tensor([[1, -2, 3]]), {}, "token ids must lie in 0..385"),
    ("past the positions", torch.ones((1, 257), dtype=torch.long), {}, "pass at most 256 tokens"),
    ("mask shape", torch.ones((2, 5), dtype=torch.long), {"attention_mask": torch.ones((1, 5))}, "got (1, 5)"),
    ("mask a list", torch.ones((1, 3), dtype=torch.long), {"attention_mask": [[1, 1, 1]]}, "got list"),
]


class TestInputChecks:
    """Every bad input, head list or budget is a LabError naming the fix, raised before any forward pass."""

    @pytest.fixture(scope="class")
    def llama(self):
        return load_tiny_model("llama")

    def _refused(self, model, call, match):
        calls = []
        h = model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            with pytest.raises(LabError, match=match):
                call()
        finally:
            h.remove()
        assert calls == [], "refused only after a forward pass"

    @pytest.mark.parametrize("what, ids, kwargs, fix", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
    def test_bad_input_ids_capture_estimate_and_ablation(self, llama, what, ids, kwargs, fix):
        m, names = llama.model, ["blocks.0.attn.hook_pattern"]
        fix = re.escape(fix)
        self._refused(m, lambda: capture(m, ids, names, **kwargs), fix)
        self._refused(m, lambda: estimate(m, ids, names, **kwargs), fix)
        self._refused(m, lambda: run_with_ablation(m, ids, ["blocks.0.hook_mlp_out"], **kwargs), fix)

    def test_gpt2_position_limit_is_n_positions(self):
        """GPT-2's learned position table has n_positions rows: 257 tokens raised IndexError before."""
        lm = load_tiny_model("gpt2")
        ids = torch.ones((1, 257), dtype=torch.long)
        fix = re.escape("more than the model's 256 positions (config.n_positions): pass at most 256 tokens")
        self._refused(lm.model, lambda: capture(lm.model, ids, ["blocks.0.hook_resid_pre"]), fix)
        self._refused(lm.model, lambda: run_with_ablation(lm.model, ids, ["blocks.0.hook_mlp_out"]), fix)
        assert capture(lm.model, ids[:, :256], ["blocks.0.hook_resid_pre"]).logits.shape[1] == 256

    @pytest.mark.parametrize(
        "heads, fix",
        [
            ([], "heads=[] selects no head: list at least one query head (0..3), or pass heads=None for all 4"),
            ([1, 1], "heads=[1, 1] lists head(s) [1] more than once: list each query head once"),
            ([0, 2, 0, 2], "lists head(s) [0, 2] more than once"),
            ([-1], "heads=[-1]: the model has 4 query heads (0..3); list indices in that range"),
            ([4], "the model has 4 query heads (0..3)"),
            ([1.0], "head indices must be whole numbers in 0..3"),
            ([True], "head indices must be whole numbers in 0..3"),
            (2, "heads=2: pass a list of query head indices, e.g. heads=[0, 3]"),
            ("01", "pass a list of query head indices"),
        ],
    )
    def test_bad_heads(self, llama, heads, fix):
        ids = _ids(llama)
        m = llama.model
        self._refused(m, lambda: capture(m, ids, ["blocks.0.attn.hook_pattern"], heads=heads), re.escape(fix))
        self._refused(m, lambda: estimate(m, ids, ["blocks.0.attn.hook_pattern"], heads=heads), re.escape(fix))

    @pytest.mark.parametrize("max_bytes", [-1, 0, 1.5, 1e9, True, "1GB", None])
    def test_bad_max_bytes(self, llama, max_bytes):
        """max_bytes=-1 gave TypeError ('complex') from the square root of a negative budget."""
        from lab.interp.capture import check_budget

        fix = re.escape(f"max_bytes must be a whole number of bytes above 0, got {max_bytes!r}: e.g. max_bytes=2 << 30")
        m, ids = llama.model, _ids(llama)
        self._refused(m, lambda: capture(m, ids, ["blocks.0.attn.hook_pattern"], max_bytes=max_bytes), fix)
        est = estimate(m, ids, ["blocks.0.attn.hook_pattern"])
        with pytest.raises(LabError, match=fix):
            check_budget(est, max_bytes, streaming=False)

    def test_good_inputs_still_pass(self, llama):
        """int32 ids, a full mask and a numpy-style head list give the plain capture's values."""
        m, ids = llama.model, _ids(llama)
        names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
        ref = capture(m, ids, names)
        for got in (
            capture(m, ids.int(), names),
            capture(m, ids, names, attention_mask=torch.ones_like(ids)),
            capture(m, ids, names, heads=torch.arange(4)),
        ):
            for n in names:
                torch.testing.assert_close(got[n], ref[n], atol=0, rtol=0)


class TestAblation:
    """Zeroing a sublayer's output really removes it from the residual stream."""

    def test_zero_last_mlp_gives_unembedded_resid_mid(self, tiny_model):
        m = tiny_model.model
        ids = _ids(tiny_model)
        n = adapter_for(m).n_layers()
        cap = capture(m, ids, [act_name("resid_mid", n - 1)])
        ablated = run_with_ablation(m, ids, [act_name("mlp_out", n - 1)])
        torch.testing.assert_close(ablated, unembed(m, cap[act_name("resid_mid", n - 1)]), atol=1e-5, rtol=0)

    def test_zero_whole_last_block_gives_unembedded_resid_pre(self, tiny_model):
        m = tiny_model.model
        ids = _ids(tiny_model)
        n = adapter_for(m).n_layers()
        cap = capture(m, ids, [act_name("resid_pre", n - 1)])
        ablated = run_with_ablation(m, ids, [act_name("attn_out", n - 1), act_name("mlp_out", n - 1)])
        torch.testing.assert_close(ablated, unembed(m, cap[act_name("resid_pre", n - 1)]), atol=1e-5, rtol=0)
        with pytest.raises(LabError, match="only zero-ablate"):
            run_with_ablation(m, ids, ["blocks.0.hook_resid_pre"])

    def test_replacing_resid_pre_swaps_the_downstream_stream(self, tiny_model):
        """A replacement at an input site (the block's hidden_states) is what the rest of the model reads:
        the other sequence's resid_pre gives the other sequence's logits."""
        m = tiny_model.model
        ids = _ids(tiny_model)
        n = adapter_for(m).n_layers()
        name = act_name("resid_pre", n - 1)
        cap = capture(m, ids, [name])
        with torch.no_grad(), replaced(m, {name: lambda x: cap[name].flip(0)}):
            swapped = m(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(swapped, cap.logits.flip(0), atol=1e-5, rtol=0)

    def test_hf_patterns_can_be_read_not_replaced(self):
        lm = load_tiny_model("llama")
        with pytest.raises(LabError, match="read, not replaced"):
            with replaced(lm.model, {"blocks.0.attn.hook_pattern": torch.zeros_like}):
                capture(lm.model, _ids(lm), ["blocks.0.attn.hook_pattern"])


class TestTransformerLensParity:
    """TransformerLens (same weights, its own converters) reads the same activations and logits on every family."""

    def test_every_capture_family_has_a_converter(self):
        from lab.interp.tl_bridge import TL_CONVERTERS

        for arch in CAPTURE_ARCHS:
            assert type(load_tiny_model(arch).model).__name__ in TL_CONVERTERS, arch

    def test_activations_and_logits_match(self, tiny_model):
        from lab.interp.tl_bridge import transformer_lens_model

        m = tiny_model.model
        ids = _ids(tiny_model, T=40)  # longer than the sliding windows (16)
        names = hook_names(adapter_for(m).n_layers(), KINDS)
        cap = capture(m, ids, names)
        with torch.no_grad():
            logits, cache = transformer_lens_model(m).run_with_cache(ids, names_filter=lambda n: n in names)
        for n in names:
            torch.testing.assert_close(cache[n], cap[n], atol=2e-5, rtol=0)
        torch.testing.assert_close(logits, cap.logits, atol=1e-5, rtol=0)
