"""Pretraining: schedule, learning on the smoke corpus, resume == uninterrupted."""

import json
import math
from dataclasses import replace

import pytest
import torch

from lab.data.corpus import smoke_corpus
from lab.errors import LabError
from lab.profiles import get_profile
from lab.tracks.pretrain.config import RECIPES, config_for
from lab.train.pretraining import PretrainConfig, train_gpt

CFG = config_for(get_profile("smoke"))


class Stop(Exception):
    pass


def test_lr_schedule_analytic():
    c = config_for(get_profile("cpu"))
    assert c.lr_at(0) == pytest.approx(c.lr / (c.warmup_iters + 1))
    assert c.lr_at(c.warmup_iters) == pytest.approx(c.lr)
    mid = c.warmup_iters + (c.max_iters - c.warmup_iters) // 2
    assert c.lr_at(mid) == pytest.approx((c.lr + c.min_lr) / 2, rel=1e-3)
    assert c.lr_at(c.max_iters) == pytest.approx(c.min_lr)


class TestConfig:
    """PretrainConfig validates itself; the track has a recipe per profile."""

    @pytest.mark.parametrize(
        "change, match",
        [
            (dict(batch_size=0), r"batch_size must be an integer >= 1 \(got 0\)"),
            (dict(max_iters=0), r"max_iters must be an integer >= 1"),
            (dict(eval_interval=0), r"eval_interval must be an integer >= 1 \(got 0\)"),
            (dict(eval_iters=0), r"eval_iters must be an integer >= 1 \(got 0\)"),
            (dict(checkpoint_interval=0), r"checkpoint_interval must be an integer >= 1 \(got 0\)"),
            (dict(block_size=8.5), r"block_size must be an integer >= 1 \(got 8.5\)"),
            (dict(warmup_iters=-1), r"warmup_iters must be an integer >= 0 \(got -1\)"),
            (dict(pos_emb="alibi"), r"pos_emb must be one of 'learned', 'rope' \(got 'alibi'\)"),
            (dict(n_head=3), r"n_head 3 must divide d_model 128"),
            (dict(lr=0.0), r"lr must be a finite number > 0 \(got 0.0\); nanoGPT's character models use 1e-3"),
            (dict(lr=float("inf")), r"lr must be a finite number > 0 \(got inf\)"),
            (dict(lr=float("nan")), r"lr must be a finite number > 0 \(got nan\)"),
            (dict(min_lr=2e-3), r"min_lr must be in \[0, 0.001\] \(got 0.002\) with lr 0.001; nanoGPT uses lr / 10"),
            (dict(min_lr=float("nan")), r"min_lr must be in \[0, 0.001\] \(got nan\)"),
            (dict(dropout=1.0), r"dropout must be in \[0, 1\) \(got 1.0\)"),
            (dict(dropout=2.0), r"dropout must be in \[0, 1\) \(got 2.0\)"),
            (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0 \(got -0.1\)"),
            (dict(beta2=1.0), r"beta2 must be in \[0, 1\) \(got 1.0\)"),
            (dict(grad_clip=0.0), r"grad_clip must be a finite number > 0 \(got 0.0\); nanoGPT uses 1.0"),
            (dict(grad_clip=float("inf")), r"grad_clip must be a finite number > 0 \(got inf\)"),
        ],
    )
    def test_bad_value_names_the_fix(self, change, match):
        with pytest.raises(LabError, match=match):
            PretrainConfig(**change)
        with pytest.raises(LabError, match=match):  # replace() runs the same checks
            replace(PretrainConfig(), **change)

    def test_every_problem_in_one_error(self):
        with pytest.raises(LabError) as err:
            PretrainConfig(batch_size=0, pos_emb="x")
        assert "batch_size" in str(err.value) and "pos_emb" in str(err.value)

    def test_a_recipe_per_profile(self):
        from lab.profiles import PROFILES

        assert set(RECIPES) == set(PROFILES)
        assert all(config_for(p) is RECIPES[name] for name, p in PROFILES.items())

    def test_unknown_profile_names_the_recipes(self):
        from lab.profiles import Profile

        with pytest.raises(LabError, match=r"no recipe for profile 'laptop'.*RECIPES.*smoke, cpu, gpu"):
            config_for(Profile("laptop", "", "cpu", "smoke", "tiny-llama"))

    def test_cpu_recipe_is_nanogpt_cpu_recipe(self):
        c = config_for(get_profile("cpu"))
        assert (c.n_layer, c.d_model, c.n_head, c.block_size, c.batch_size, c.max_iters) == (4, 128, 4, 64, 12, 2000)
        assert (c.lr, c.min_lr, c.warmup_iters) == (1e-3, 1e-4, 100)
        assert c.pos_emb == "rope"  # our one documented change (the track measures learned too)

    def test_gpu_recipe_is_nanogpt_gpu_recipe(self):
        c = config_for(get_profile("gpu"))  # nanoGPT config/train_shakespeare_char.py
        assert (c.n_layer, c.n_head, c.d_model, c.block_size, c.batch_size, c.max_iters) == (6, 6, 384, 256, 64, 5000)
        assert (c.lr, c.min_lr, c.dropout, c.warmup_iters, c.beta2) == (1e-3, 1e-4, 0.2, 100, 0.99)


class TestTraining:
    """Training on the generated smoke corpus."""

    @pytest.fixture(scope="class")
    def result(self, tmp_path_factory):
        return train_gpt(CFG, smoke_corpus(), tmp_path_factory.mktemp("ck"), progress=False)

    def test_initial_loss_is_uniform_over_vocab(self, result):
        first = next(e for e in result.log.evals if e["step"] == 0 and e["split"] == "val")
        assert first["loss"] == pytest.approx(math.log(result.tokenizer.vocab_size), abs=0.1)

    def test_loss_falls(self, result):
        val = [e["loss"] for e in result.log.evals if e["split"] == "val"]
        assert val[-1] < val[0] - 1.0

    def test_logs_every_step(self, result):
        assert [s["step"] for s in result.log.steps] == list(range(CFG.max_iters))
        assert all(s["grad_norm"] > 0 and s["tokens_per_s"] > 0 for s in result.log.steps)
        assert [s["lr"] for s in result.log.steps] == [CFG.lr_at(i) for i in range(CFG.max_iters)]

    def test_checkpoints_and_samples(self, result, tmp_path):
        assert [s["step"] for s in result.log.samples] == [50, 100, 150, 200]
        assert all(len(s["text"]) == CFG.sample_chars for s in result.log.samples)


def test_resume_equals_uninterrupted(tmp_path):
    """Interrupt at step 75 (last checkpoint at 50), resume: every logged number and weight matches."""
    corpus = smoke_corpus()
    full = train_gpt(CFG, corpus, tmp_path / "a", progress=False)

    def interrupt(step, log):
        if step == 75:
            raise Stop

    with pytest.raises(Stop):
        train_gpt(CFG, corpus, tmp_path / "b", progress=False, on_step=interrupt)
    resumed = train_gpt(CFG, corpus, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 50
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(resumed.log.steps) == strip(full.log.steps)
    assert resumed.log.evals == full.log.evals
    assert resumed.log.samples == full.log.samples
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_refuses_other_config(tmp_path):
    cfg = replace(CFG, max_iters=50)
    train_gpt(cfg, smoke_corpus(), tmp_path, progress=False)
    with pytest.raises(LabError, match="different config.*--fresh"):
        train_gpt(replace(cfg, lr=5e-3), smoke_corpus(), tmp_path, progress=False)
    fresh = train_gpt(replace(cfg, lr=5e-3), smoke_corpus(), tmp_path, resume=False, progress=False)
    assert fresh.resumed_from is None


def test_wall_time_accumulates_across_resume(tmp_path):
    """A finished run resumed at its last step does no work but reports the original run's time."""
    cfg = replace(CFG, max_iters=50)
    first = train_gpt(cfg, smoke_corpus(), tmp_path, progress=False)
    again = train_gpt(cfg, smoke_corpus(), tmp_path, progress=False)
    assert again.resumed_from == 50 and again.log.steps == first.log.steps
    assert first.train_time_s == pytest.approx(again.train_time_s)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["times"])
    # The resumed run starts from the wall time stored at the checkpoint (which already covers the training)
    # and only adds its own (tiny) time on top.
    assert saved["train"] == pytest.approx(first.train_time_s)
    assert saved["wall"] >= saved["train"] > 0
    assert again.wall_time_s >= saved["wall"]


class TestCorruptCheckpoint:
    """A damaged checkpoint file gives one LabError naming the file and the fix (--fresh), before any step."""

    @pytest.fixture(scope="class")
    def finished(self, tmp_path_factory):
        folder = tmp_path_factory.mktemp("ck") / "run"
        train_gpt(replace(CFG, max_iters=50), smoke_corpus(), folder, progress=False)
        return folder

    @pytest.mark.parametrize(
        "name, damage",
        [
            ("ckpt.safetensors", "truncated"),
            ("steps.parquet", "truncated"),
            ("evals.parquet", "truncated"),
            ("samples.parquet", "truncated"),
            ("steps.parquet", "missing"),  # (without ckpt.safetensors there is no checkpoint: the run starts over)
        ],
    )
    def test_names_the_file_and_the_fix(self, finished, name, damage, tmp_path, monkeypatch):
        import shutil

        import lab.train.pretraining as P

        def no_step(*args):
            raise AssertionError("a training step ran before the damaged checkpoint was refused")

        folder = tmp_path / "run"
        shutil.copytree(finished, folder)
        path = folder / name
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.unlink()
        monkeypatch.setattr(P, "get_batch", no_step)
        with pytest.raises(LabError) as err:
            train_gpt(replace(CFG, max_iters=50), smoke_corpus(), folder, progress=False)
        message = str(err.value)
        state = "is truncated or corrupt (" if damage == "truncated" else "is missing: "
        assert message.startswith(f"{path} {state}") and "\n" not in message
        assert message.endswith(f"pass --fresh to start over (or delete {folder})")
        monkeypatch.undo()
        again = train_gpt(replace(CFG, max_iters=50), smoke_corpus(), folder, resume=False, progress=False)
        assert again.resumed_from is None and len(again.log.steps) == 50  # the fix named works
