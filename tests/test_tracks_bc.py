"""The B_attention and C_probing tracks end to end on the smoke profile, their configs and failure modes, the
capture benchmark, and their notebooks as scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch

from lab.errors import LabError
from lab.profiles import PROFILES, get_profile

ROOT = Path(__file__).resolve().parent.parent
SMOKE = get_profile("smoke")


@pytest.fixture
def own_data_dir(tmp_path, monkeypatch):
    """An empty data folder: B trains its own stand-in LoRA on smoke into it."""
    monkeypatch.setenv("LAB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


# ----------------------------------------------------------------------------- B_attention


class TestAttentionConfig:
    """Recipes and their validation."""

    @pytest.mark.parametrize("name", list(PROFILES))
    def test_every_profile_has_a_valid_recipe(self, name):
        from lab.tracks.B_attention.config import AttentionConfig, config_for

        assert isinstance(config_for(get_profile(name)), AttentionConfig)

    @pytest.mark.parametrize(
        "change, fix",
        [
            ({"induction_len": 1}, "induction_len must be >= 2"),
            ({"memory_tokens": ()}, "memory_tokens must name"),
            ({"max_bytes": 0}, "max_bytes must be > 0"),
            ({"stream_tokens": 64}, "lengths must grow"),  # not past the in-memory lengths (max 64 on smoke)
            ({"guard_tokens": 100}, "lengths must grow"),  # shorter than the streamed capture (128)
        ],
    )
    def test_bad_values_name_the_fix(self, change, fix):
        from lab.tracks.B_attention.config import RECIPES

        with pytest.raises(LabError, match=fix):
            replace(RECIPES["smoke"], **change)

    def test_the_input_is_track_a_main_adapter(self, own_data_dir, monkeypatch):
        """Off smoke, B reads Track A's adapter where A saves it, and takes it when it is there (no stand-in)."""
        from lab import paths
        from lab.tracks.B_attention import run as B
        from lab.tracks.B_attention.config import finetuned_adapter_dir

        cpu = get_profile("cpu")
        folder = finetuned_adapter_dir(cpu)
        assert folder == paths.adapter_dir("cpu", "A_finetuning", "main")
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        monkeypatch.setattr(B, "stand_in_adapter", lambda p: pytest.fail("no stand-in where Track A's adapter is"))
        assert B.resolve_adapter(cpu) == (folder, "Track A (the fine-tuning track, main run)")

    def test_smoke_uses_its_stand_in_whether_or_not_track_a_ran(self, own_data_dir, monkeypatch):
        """Smoke results do not depend on the order tracks ran in: Track A's smoke adapter is never taken."""
        from lab.tracks.B_attention import config
        from lab.tracks.B_attention import run as B

        assert SMOKE.name in config.STAND_IN_PROFILES
        stand_in = own_data_dir / "adapters" / "smoke" / "B_attention" / "smoke-lora"
        monkeypatch.setattr(B, "stand_in_adapter", lambda p: stand_in)
        before = B.resolve_adapter(SMOKE)
        folder = config.finetuned_adapter_dir(SMOKE)  # as `lab run A_finetuning --profile smoke` leaves it
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        assert B.resolve_adapter(SMOKE) == before == (stand_in, "smoke LoRA trained by the attention track")


class TestAttentionTrack:
    """B_attention on smoke."""

    def test_smoke_run_writes_consistent_results(self, results_dir, own_data_dir):
        from lab.tracks.B_attention import run as B

        summary = B.run(SMOKE, progress=False)
        out = results_dir / "smoke" / "B_attention"
        for name in (
            "heads",
            "layers",
            "top_heads",
            "patterns",
            "memory",
            "guard",
            "summary",
            "finetune_heads",
            "finetune_heads_task",
            "finetune_top",
            "finetune_patterns",
            "finetune_summary",
        ):
            assert (out / f"{name}.parquet").exists(), name
        heads = pl.read_parquet(out / "heads.parquet")
        assert heads.height == summary.n_heads_total == 2 * 4
        assert summary.top_prev_score == pytest.approx(heads["prev_token"].max())
        assert summary.top_induction_score == pytest.approx(heads["induction"].max())
        assert summary.mean_sink_share == pytest.approx(heads["sink_share"].mean())
        written = pl.read_parquet(out / "summary.parquet")
        assert written.columns == list(summary.as_dict()) and written.row(0, named=True) == summary.as_dict()
        ft = pl.read_parquet(out / "finetune_summary.parquet").row(0, named=True)
        assert ft["adapter_source"].startswith("smoke LoRA")
        assert (own_data_dir / "adapters" / "smoke" / "B_attention" / "smoke-lora" / "adapter_config.json").exists()
        assert ft["task_max_js_bits"] > 0  # the trained LoRA really changes attention
        memory = pl.read_parquet(out / "memory.parquet")
        in_mem = memory.filter(pl.col("mode") == "in memory")
        assert (in_mem["captured_mib"] == in_mem["estimate_mib"]).all()
        guard = pl.read_parquet(out / "guard.parquet").row(0, named=True)
        assert guard["refused"] and "stream_to" in guard["message"] and guard["stream_readback_rows_sum_to_one"]

    def test_tuned_model_differs_and_base_is_untouched(self, own_data_dir):
        from lab.data.prompts import PATTERN_PROMPT, encode
        from lab.interp import attention as att
        from lab.models.loading import load_model
        from lab.tracks.B_attention import run as B

        folder, _source = B.resolve_adapter(SMOKE)
        base = load_model(SMOKE)
        tuned = B.load_tuned(SMOKE, folder)
        ids = encode(base, PATTERN_PROMPT)
        pb, pt = att.patterns_for(base.model, ids), att.patterns_for(tuned.model, ids)
        assert (pb - pt).abs().max() > 1e-6
        fresh = load_model(SMOKE)  # loading the tuned copy must not have changed the base weights
        torch.testing.assert_close(pb, att.patterns_for(fresh.model, ids), atol=0, rtol=0)

    def test_stand_in_adapter_is_trained_once(self, own_data_dir, monkeypatch):
        """The stand-in is trained with the library's train_lora, published whole, and reused afterwards."""
        from lab.tracks.B_attention import run as B

        folder = B.stand_in_adapter(SMOKE)
        assert (folder / "adapter_config.json").exists() and not list(folder.parent.glob(".*.tmp"))

        def no_training(*a, **k):
            raise AssertionError("an existing stand-in adapter must be reused, not retrained")

        monkeypatch.setattr(B, "train_lora", no_training)
        assert B.stand_in_adapter(SMOKE) == folder

    def test_missing_adapter_on_cpu_fails_before_loading(self, own_data_dir, monkeypatch):
        from lab.tracks.B_attention import run as B

        def no_load(*a, **k):
            raise AssertionError("the model must not be loaded before the adapter check")

        monkeypatch.setattr(B, "load_model", no_load)
        with pytest.raises(LabError, match=r"lab run A_finetuning --profile cpu"):
            B.run(get_profile("cpu"))


# ----------------------------------------------------------------------------- C_probing


class TestProbingConfig:
    """Recipes and their validation."""

    @pytest.mark.parametrize("name", list(PROFILES))
    def test_every_profile_has_a_valid_recipe(self, name):
        from lab.tracks.C_probing.config import ProbingConfig, config_for

        assert isinstance(config_for(get_profile(name)), ProbingConfig)

    @pytest.mark.parametrize(
        "change, fix",
        [
            ({"lens_prompt": 6}, "lens_prompt must index one of the 6 prompts"),
            ({"similarity_maps": 0}, "similarity_maps must be >= 1"),
            ({"architecture_tokens": 16}, "sliding window"),
            ({"bench_reps": 0}, "bench_reps >= 1"),
        ],
    )
    def test_bad_values_name_the_fix(self, change, fix):
        from lab.tracks.C_probing.config import RECIPES

        with pytest.raises(LabError, match=fix):
            replace(RECIPES["smoke"], **change)


class TestProbingTrack:
    """C_probing on smoke."""

    def test_smoke_run(self, results_dir):
        from lab.tracks.C_probing import run as C

        summary = C.run(SMOKE, progress=False)
        out = results_dir / "smoke" / "C_probing"
        for name in (
            "norms",
            "contributions",
            "contribution_tokens",
            "logit_lens",
            "lens_profile",
            "lens_stable",
            "similarity",
            "similarity_maps",
            "ablation",
            "architectures",
            "summary",
            "benchmark",
        ):
            assert (out / f"{name}.parquet").exists(), name
        archs = pl.read_parquet(out / "architectures.parquet")
        assert archs["family"].to_list() == ["llama", "qwen2", "gemma2", "gpt2"]
        assert summary.invariants_max_error < 1e-5
        assert (archs["nnsight_resid_post_max_diff"] < 1e-5).all()
        assert (archs["transformer_lens_max_diff"] < 1e-4).all()  # every name, every family
        assert (archs["transformer_lens_logits_max_diff"] < 1e-4).all()
        lens = pl.read_parquet(out / "lens_profile.parquet")
        assert lens["kl_to_final"][-1] == pytest.approx(0.0, abs=1e-9) and lens["top1_agreement"][-1] == 1.0
        written = pl.read_parquet(out / "summary.parquet")
        assert written.columns == list(summary.as_dict()) and written.row(0, named=True) == summary.as_dict()
        bench = pl.read_parquet(out / "benchmark.parquet")
        assert bench.height == 5 and bench["tl_logits_max_abs_diff"][0] < 1e-4
        config = json.loads((out / "manifest.json").read_text())["benchmark"]["config"]
        assert (config["tokens"], config["reps"], config["model"]) == (32, 3, "tiny-llama")
        assert config["names"] == 5 * 2 + 1  # every residual name of both layers, and the final norm's output

    def test_benchmark_refuses_a_short_text(self):
        from lab.bench.capture import capture_benchmark
        from lab.models.loading import load_tiny_model

        with pytest.raises(LabError, match="only"):
            capture_benchmark(load_tiny_model("llama"), tokens=512, reps=1, text="too short")

    def test_library_benchmark_writes_nothing(self, results_dir, capsys):
        """lab.bench.capture.run returns and prints its ratios; only the track's benchmark() writes them."""
        from lab.bench import capture as capture_bench
        from lab.models.loading import load_tiny_model

        frame, checks = capture_bench.run(load_tiny_model("llama"), tokens=16, reps=1, warmup=0)
        assert not results_dir.exists()
        lab_row = frame.filter(pl.col("method") == "lab capture (all residual names)").row(0, named=True)
        assert lab_row["ratio_to_lab_capture"] == 1.0
        assert frame["tl_logits_max_abs_diff"][0] == checks["tl_logits_max_abs_diff"] < 1e-4
        assert "x1.00 of lab capture" in capsys.readouterr().out

    def test_cli_bench_capture_writes_the_benchmark(self, results_dir):
        from lab.cli import main

        assert main(["bench", "capture", "--profile", "smoke"]) == 0
        assert pl.read_parquet(results_dir / "smoke" / "C_probing" / "benchmark.parquet").height == 5


# ----------------------------------------------------------------------------- notebooks


@pytest.mark.parametrize("track", ["B_attention", "C_probing"])
def test_notebook_as_script(track, tmp_path):
    env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / f"{track}.py"), "--", "--profile", "smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = pl.read_parquet(tmp_path / "smoke" / track / "summary.parquet").row(0, named=True)
    assert summary["model"] == "tiny-llama"


def test_notebook_bad_profile(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "B_attention.py"), "--", "--profile", "huge"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert out.returncode != 0 and "unknown profile 'huge'" in out.stderr
