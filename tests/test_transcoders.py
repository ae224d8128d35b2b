"""Transcoders: the activations they learn from, the unit folding, FVU, the build (learns, publishes, reloads into
circuit-tracer, resumes exactly after an interruption), its config's validation and its errors."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lab.data.corpus import smoke_corpus
from lab.errors import LabError
from lab.interp import quality as Q
from lab.interp import transcoders as T
from lab.interp.capture import capture
from lab.interp.names import act_name
from lab.models.loading import load_tiny_model
from lab.profiles import get_profile
from lab.tracks.E_circuits.config import config_for

CFG = config_for(get_profile("smoke")).transcoders  # the recipe the smoke profile builds


@pytest.fixture(scope="module")
def lm():
    return load_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def built(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tc") / "smoke"
    meta = T.build(CFG, lm, folder, corpus=smoke_corpus(), fresh=True, progress=False)
    return folder, meta


def test_mlp_activations_are_the_mlp_input_and_the_residual_update(lm):
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    ins, outs = T.mlp_activations(lm.model, ids)
    names = [act_name(k, i) for i in range(2) for k in ("resid_mid", "mlp_out")]
    cache = capture(lm.model, ids, names)
    for layer, block in enumerate(lm.model.model.layers):
        mid = cache[act_name("resid_mid", layer)][0, 1:]
        with torch.no_grad():
            expected_in = block.post_attention_layernorm(mid)
        assert torch.equal(ins[layer], expected_in)  # circuit-tracer's mlp.hook_in for Llama
        assert torch.equal(outs[layer], cache[act_name("mlp_out", layer)][0, 1:])  # position 0 left out


@pytest.mark.parametrize("skip", [False, True])
def test_fold_scales_makes_the_raw_transcoder_exactly_the_scaled_one(skip):
    gen = torch.Generator().manual_seed(0)
    tc = T.new_transcoder(16, replace(CFG, skip=skip), 0, gen)
    with torch.no_grad():
        tc.b_enc.normal_(generator=gen)
        tc.b_dec.normal_(generator=gen)
        if skip:
            tc.W_skip.normal_(generator=gen)
    x = torch.randn(50, 16, generator=gen) * 7.0
    sx, sy = T.unit_scale(x), 3.5
    with torch.no_grad():
        scaled_acts = tc.encode(x / sx)
        expected = tc(x / sx) * sy
        T.fold_scales(tc, sx, sy)
        assert torch.equal(tc.encode(x) != 0, scaled_acts != 0)  # the same features fire
        assert torch.allclose(tc(x), expected, rtol=1e-5, atol=1e-5)
    assert T.unit_scale(torch.full((4, 9), 2.0)) == pytest.approx(2.0)  # rows of norm 6 = 2 * sqrt(9)


def test_fvu_identities():
    y = torch.randn(100, 8)
    assert Q.fvu(y, y) == 0.0
    assert Q.fvu(y, y.mean(0).expand_as(y)) == pytest.approx(1.0)
    assert Q.fvu(y, torch.zeros_like(y)) == pytest.approx(float((y**2).sum() / ((y - y.mean(0)) ** 2).sum()))


def test_build_learns_and_reports_what_the_saved_transcoders_do(lm, built):
    folder, meta = built
    cfg = CFG
    assert meta["n_layers"] == 2 and meta["d_transcoder"] == cfg.d_transcoder and meta["k"] == cfg.k
    assert meta["curve"][0]["train_fvu_mean"] > 1.0  # random features at step 1
    for row in meta["layers"]:
        assert row["fvu"] < 0.8 and row["l0"] == cfg.k  # TopK: exactly k active per token
    # reloaded from safetensors as circuit-tracer's TranscoderSet: the same held-out numbers, recomputed
    tcs, meta2 = T.load_transcoders(folder=folder)
    assert meta2 == json.loads((folder / "meta.json").read_text())
    assert tcs.feature_input_hook == "mlp.hook_in" and tcs.feature_output_hook == "mlp.hook_out"
    _, val = T.training_texts(lm.tokenizer, smoke_corpus())
    ids = T.token_sequences(lm.tokenizer, val, cfg.seq_len, cfg.eval_seqs, cfg.seed + 1)
    ins, outs = T.mlp_activations(lm.model, ids)
    again = Q.evaluate(list(tcs), ins, outs)
    for a, b in zip(again, meta["layers"], strict=True):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-5) and a["dead_share"] == b["dead_share"]
    # each feature's strongest held-out activations, against all of them
    top = T.top_contexts(folder)
    assert torch.equal(top["eval_ids"], ids)
    for layer, tc in enumerate(tcs):
        acts = tc.encode(ins[layer])
        for feat in range(0, cfg.d_transcoder, 17):
            fired = acts[:, feat][acts[:, feat] != 0].sort(descending=True).values[: top["value"].shape[1]]
            got = top["value"][layer, : fired.numel(), feat]
            torch.testing.assert_close(got, fired, rtol=1e-5, atol=1e-6)
            tokens = top["token"][layer, : fired.numel(), feat]
            torch.testing.assert_close(acts[tokens, feat], got, rtol=1e-5, atol=1e-6)  # and where they were
    # built already with the same config: returned without training; another config is not this build
    assert T.build(cfg, lm, folder, corpus=smoke_corpus(), progress=False)["train_s"] == meta["train_s"]
    assert T.built(cfg, folder) == meta2 and T.built(replace(cfg, seed=1), folder) is None
    # published whole: no temp sibling and no resume checkpoint left beside the folder
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_feature_labels_quote_the_tokens_the_feature_fired_on(lm, built):
    from lab.interp.quality import label_frame

    folder, _ = built
    top = T.top_contexts(folder)
    seq_len = top["eval_ids"].shape[1] - 1
    frame = label_frame(top, lm.tokenizer, [(0, 3), (1, 5)])
    assert frame["layer"].to_list() == [0, 1] and frame["feature"].to_list() == [3, 5]
    for row in frame.iter_rows(named=True):
        tokens = top["token"][row["layer"], :, row["feature"]].tolist()
        fired = [t for t in tokens if t >= 0]
        assert len(row["contexts"]) == len(fired) == len(row["activations"])
        for text, t in zip(row["contexts"], fired, strict=True):  # the bracketed token is the one at that index
            seq, pos = divmod(t, seq_len)
            assert text.endswith(f"[{lm.tokenizer.decode([int(top['eval_ids'][seq, 1 + pos])])}]")
        assert row["activations"] == sorted(row["activations"], reverse=True)
        words = [c[c.rindex("[") + 1 : -1].strip() for c in row["contexts"]]
        assert row["label"].split(" · ")[0] in {w or repr(w) for w in words} | {repr(w) for w in words}


def test_a_build_started_from_another_continues_from_its_weights(lm, built, tmp_path):
    """``init_from``: the start is the given build in this run's rescaled units; with a vanishing learning rate
    the result is that build again (the unit rescaling undone exactly) and measures the same."""
    folder, meta = built
    cfg = replace(CFG, steps=4, lr=1e-12)
    again = T.build(cfg, lm, tmp_path / "again", corpus=smoke_corpus(), init_from=folder, progress=False)
    start, _ = T.load_transcoders(folder)
    got, _ = T.load_transcoders(tmp_path / "again")
    for a, b in zip(start, got, strict=True):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(again["layers"], meta["layers"], strict=True):  # the same held-out set (same seed)
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-4)
    assert again["init_from"] is not None


def test_interrupted_build_resumes_to_the_same_weights(lm, built, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    ref_folder, _ = built
    folder = tmp_path / "smoke"
    real = T.mlp_activations
    calls = {"n": 0}

    def dies_midway(model, ids):
        calls["n"] += 1
        if calls["n"] == 40:  # after the checkpoint at step 30 (steps // 4 = 15, 30, 45)
            raise KeyboardInterrupt
        return real(model, ids)

    monkeypatch.setattr(T, "mlp_activations", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        T.build(CFG, lm, folder, corpus=smoke_corpus(), fresh=True, progress=False)
    assert not (folder / "meta.json").exists()  # nothing half-built is presented as built
    assert (tmp_path / "smoke.building" / "checkpoint.pt").exists()
    monkeypatch.setattr(T, "mlp_activations", real)
    meta = T.build(CFG, lm, folder, corpus=smoke_corpus(), progress=False)
    assert meta["resumed_from_step"] == 30 and not (tmp_path / "smoke.building").exists()
    for layer in range(2):
        a = load_file(folder / f"layer_{layer}.safetensors")
        b = load_file(ref_folder / f"layer_{layer}.safetensors")
        for k in b:
            assert torch.equal(a[k], b[k]), k


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(LabError, match="lab transcoders build"):
        T.load_transcoders(tmp_path)


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"k": 129}, r"bad TranscoderConfig: k=129 exceeds d_transcoder=128: .* lower k or raise d_transcoder"),
        ({"steps": 0}, r"steps must be an integer >= 1 \(got 0\)"),
        ({"checkpoints": 0}, r"checkpoints must be an integer >= 1 \(got 0\)"),
        ({"lr": 0.0}, r"lr must be a finite number > 0 \(got 0.0\)"),
        ({"lr": float("inf")}, r"lr must be a finite number > 0 \(got inf\)"),
    ],
)
def test_config_refuses_what_cannot_train(change, fix):
    with pytest.raises(LabError, match=fix):
        replace(CFG, **change)


def test_short_text_source_is_refused(lm):
    with pytest.raises(LabError, match="seq_len"):
        T.token_sequences(lm.tokenizer, {"tiny": "a b"}, 32, 4, 0)
    cfg = replace(CFG, seq_len=8)
    ids = T.token_sequences(lm.tokenizer, {"x": "the king speaks of the moon " * 20}, cfg.seq_len, 5, 0)
    assert ids.shape == (5, 9) and (ids[:, 0] == lm.tokenizer.bos_token_id).all()


class TestDamagedState:
    """A damaged resume checkpoint or built folder gives one LabError naming the file and the fix."""

    def _cut(self, path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def test_truncated_resume_checkpoint(self, lm, tmp_path):
        folder = tmp_path / "smoke"
        ckpt = tmp_path / "smoke.building" / "checkpoint.pt"
        ckpt.parent.mkdir()
        state = {"key": "x", "step": 1, "transcoders": [torch.zeros(1000)]}
        buf = io.BytesIO()
        torch.save(state, buf)
        ckpt.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(LabError) as err:
            T.build(CFG, lm, folder, corpus=smoke_corpus(), progress=False)
        message = str(err.value)
        assert message.startswith(f"{ckpt} is truncated or corrupt (")
        assert message.endswith(f": pass --fresh to start the build over (or delete {ckpt})")

    def test_foreign_resume_checkpoint(self, lm, tmp_path):
        ckpt = tmp_path / "smoke.building" / "checkpoint.pt"
        ckpt.parent.mkdir()
        torch.save({"key": "another build", "step": 1}, ckpt)
        with pytest.raises(
            LabError, match=r"checkpoint.pt belongs to another config or model than this build: pass --fresh"
        ):
            T.build(CFG, lm, tmp_path / "smoke", corpus=smoke_corpus(), progress=False)

    def test_pickled_code_in_a_checkpoint_is_refused(self, lm, tmp_path):
        """weights_only loading: a checkpoint that would run code on load is refused, not executed."""
        ckpt = tmp_path / "smoke.building" / "checkpoint.pt"
        ckpt.parent.mkdir()
        torch.save({"key": "x", "step": 1, "object": Path("/etc/passwd")}, ckpt)  # not a plain container
        with pytest.raises(LabError, match=r"checkpoint.pt is truncated or corrupt \(it holds objects other than"):
            T.build(CFG, lm, tmp_path / "smoke", corpus=smoke_corpus(), progress=False)

    @pytest.mark.parametrize("name", ["meta.json", "layer_1.safetensors"])
    def test_damaged_built_folder(self, built, tmp_path, name):
        import shutil

        ref, _ = built
        folder = tmp_path / "smoke"
        shutil.copytree(ref, folder)
        self._cut(folder / name)
        fix = f": delete {folder} and build them again (`lab transcoders build --profile <profile>`)"
        with pytest.raises(LabError) as err:
            T.load_transcoders(folder)
        assert str(err.value).startswith(f"{folder / name} is truncated or corrupt (") and str(err.value).endswith(fix)
        if name == "meta.json":
            with pytest.raises(LabError, match="meta.json is truncated or corrupt"):
                T.built(CFG, folder)
