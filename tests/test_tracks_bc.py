"""The B_attention and C_probing tracks end to end on the smoke profile, their failure modes, and their notebooks
as scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from lab.errors import LabError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_adapter_dirs(tmp_path, monkeypatch):
    """No Track A adapter anywhere: B must train its own smoke LoRA (into a temp folder)."""
    from lab.tracks.B_attention import run as B

    monkeypatch.setenv("LAB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(B, "adapter_dir", lambda profile: tmp_path / "absent" / profile.name)
    return tmp_path


class TestAttentionTrack:
    """B_attention on smoke."""

    def test_smoke_run_writes_consistent_results(self, results_dir, own_adapter_dirs):
        from lab.tracks.B_attention import run as B

        summary = B.run("smoke", progress=False)
        out = results_dir / "smoke" / "B_attention"
        for name in ("heads", "layers", "top_heads", "patterns", "memory", "guard", "summary", "finetune_heads",
                     "finetune_heads_task", "finetune_top", "finetune_patterns", "finetune_summary"):
            assert (out / f"{name}.parquet").exists(), name
        heads = pl.read_parquet(out / "heads.parquet")
        assert heads.height == summary["n_heads_total"] == 2 * 4
        assert summary["top_prev_score"] == pytest.approx(heads["prev_token"].max())
        assert summary["top_induction_score"] == pytest.approx(heads["induction"].max())
        assert summary["mean_sink_share"] == pytest.approx(heads["sink_share"].mean())
        ft = pl.read_parquet(out / "finetune_summary.parquet").row(0, named=True)
        assert ft["adapter_source"].startswith("smoke LoRA")
        assert (own_adapter_dirs / "data" / "adapters" / "smoke" / "B_attention" / "smoke-lora" / "adapter_config.json").exists()
        assert ft["task_max_js_bits"] > 0  # the trained LoRA really changes attention
        memory = pl.read_parquet(out / "memory.parquet")
        in_mem = memory.filter(pl.col("mode") == "in memory")
        assert (in_mem["captured_mib"] == in_mem["estimate_mib"]).all()
        guard = pl.read_parquet(out / "guard.parquet").row(0, named=True)
        assert guard["refused"] and "stream_to" in guard["message"] and guard["stream_readback_rows_sum_to_one"]

    def test_tuned_model_differs_and_base_is_untouched(self, own_adapter_dirs):
        from lab.interp import attention as att
        from lab.models.loading import load_model
        from lab.profiles import get_profile
        from lab.tracks.B_attention import run as B

        p = get_profile("smoke")
        folder, _source = B.resolve_adapter(p)
        base = load_model(p)
        tuned = B.load_tuned(p, folder)
        ids = B.encode(base, B.PATTERN_PROMPT)
        pb, pt = att.patterns_for(base.model, ids), att.patterns_for(tuned.model, ids)
        assert (pb - pt).abs().max() > 1e-6
        fresh = load_model(p)  # loading the tuned copy must not have changed the base weights
        torch.testing.assert_close(pb, att.patterns_for(fresh.model, ids), atol=0, rtol=0)

    def test_missing_adapter_on_cpu_fails_before_loading(self, own_adapter_dirs, monkeypatch):
        from lab.tracks.B_attention import run as B

        def no_load(*a, **k):
            raise AssertionError("the model must not be loaded before the adapter check")
        monkeypatch.setattr(B, "load_model", no_load)
        with pytest.raises(LabError, match=r"lab run A_finetuning --profile cpu"):
            B.run("cpu")


class TestProbingTrack:
    """C_probing on smoke."""

    def test_smoke_run(self, results_dir):
        from lab.tracks.C_probing import run as C

        summary = C.run("smoke", progress=False)
        out = results_dir / "smoke" / "C_probing"
        for name in ("norms", "contributions", "contribution_tokens", "logit_lens", "lens_profile", "lens_stable",
                     "similarity", "similarity_maps", "ablation", "architectures", "summary", "benchmark"):
            assert (out / f"{name}.parquet").exists(), name
        archs = pl.read_parquet(out / "architectures.parquet")
        assert archs["family"].to_list() == ["llama", "qwen2", "gemma2", "gpt2"]
        assert summary["invariants_max_error"] < 1e-5
        assert (archs["nnsight_resid_post_max_diff"] < 1e-5).all()
        assert (archs["transformer_lens_max_diff"] < 1e-4).all()  # every name, every family
        assert (archs["transformer_lens_logits_max_diff"] < 1e-4).all()
        lens = pl.read_parquet(out / "lens_profile.parquet")
        assert lens["kl_to_final"][-1] == pytest.approx(0.0, abs=1e-9) and lens["top1_agreement"][-1] == 1.0
        bench = pl.read_parquet(out / "benchmark.parquet")
        assert bench.height == 5 and bench["tl_logits_max_abs_diff"][0] < 1e-4

    def test_benchmark_refuses_a_short_text(self):
        from lab.bench.capture import capture_benchmark
        from lab.models.loading import load_tiny_model

        with pytest.raises(LabError, match="only"):
            capture_benchmark(load_tiny_model("llama"), tokens=512, reps=1, text="too short")


@pytest.mark.parametrize("track", ["B_attention", "C_probing"])
def test_notebook_as_script(track, tmp_path):
    env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path), "LAB_DATA_DIR": str(ROOT / ".data")}
    out = subprocess.run([sys.executable, str(ROOT / "notebooks" / f"{track}.py"), "--", "--profile", "smoke"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = pl.read_parquet(tmp_path / "smoke" / track / "summary.parquet").row(0, named=True)
    assert summary["model"] == "tiny-llama"


def test_notebook_bad_profile(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "notebooks" / "B_attention.py"), "--", "--profile", "huge"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert out.returncode != 0 and "unknown profile 'huge'" in out.stderr
