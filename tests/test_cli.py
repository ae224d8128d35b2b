"""The `lab` command: user errors are one line + non-zero exit; a smoke run writes consistent results."""

import json
import subprocess
import sys

import polars as pl
import pytest

from lab.cli import main


class TestErrors:
    """Errors a user can cause print one line and exit non-zero, before any compute."""

    @pytest.mark.parametrize(
        "argv, needle",
        [
            (["run", "pretrain", "--profile", "laptop"], "unknown profile 'laptop': choose one of smoke, cpu, gpu"),
            (["run", "nonsense"], "unknown track 'nonsense'"),
        ],
    )
    def test_one_line_error(self, argv, needle, capsys):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1

    def test_subprocess_exit_code(self):
        out = subprocess.run(
            [sys.executable, "-m", "lab.cli", "run", "pretrain", "--profile", "nope"], capture_output=True, text=True
        )
        assert out.returncode == 2 and out.stderr.startswith("lab: error: unknown profile")


def test_smoke_run_writes_consistent_results(results_dir, capsys):
    """`lab run pretrain --profile smoke` writes every result; summary agrees with the loss table."""
    assert main(["run", "pretrain", "--profile", "smoke", "--fresh"]) == 0
    folder = results_dir / "smoke" / "pretrain"
    for name in ("loss", "log", "samples", "summary", "benchmark", "ablation", "ablation_summary"):
        assert (folder / f"{name}.parquet").exists(), name
    loss = pl.read_parquet(folder / "loss.parquet")
    summary = pl.read_parquet(folder / "summary.parquet").row(0, named=True)
    final_val = loss.filter((pl.col("series") == "val (eval)") & (pl.col("step") == summary["iters"]))["loss"]
    assert summary["final_val_loss"] == final_val.item()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["summary"]["profile"] == "smoke" and manifest["loss"]["config"]["pretrain"]["max_iters"] == 200
    spec = json.loads((folder / "loss.vl.json").read_text())
    assert len(next(iter(spec["datasets"].values()))) >= loss.height  # chart carries the Parquet's rows
    assert "ratio" in capsys.readouterr().out


def test_summary_statistics_match_the_log(results_dir):
    """The summary's gradient statistics are recomputed here from the per-step log."""
    assert main(["run", "pretrain", "--profile", "smoke"]) == 0
    folder = results_dir / "smoke" / "pretrain"
    log = pl.read_parquet(folder / "log.parquet")
    s = pl.read_parquet(folder / "summary.parquet").row(0, named=True)
    norms = sorted(log["grad_norm"].to_list())
    assert s["clipped_fraction"] == sum(n > 1.0 for n in norms) / len(norms)
    tail = sorted(log["grad_norm"].to_list()[-20:])
    assert s["grad_norm_last_tenth"] == pytest.approx((tail[9] + tail[10]) / 2)


class TestBench:
    """`lab bench <name>` runs the library benchmark through the track that owns its results."""

    def test_bench_pretrain(self, results_dir, capsys):
        """The timed step count reaches the benchmark, which writes results/pretrain/benchmark.parquet."""
        assert main(["bench", "pretrain", "--profile", "smoke", "--steps", "5"]) == 0
        folder = results_dir / "smoke" / "pretrain"
        frame = pl.read_parquet(folder / "benchmark.parquet")
        assert frame["loop"][0].startswith("reference") and frame["ratio"][0] == 1.0  # the baseline against itself
        assert frame["ratio"].to_list() == pytest.approx((frame["tokens_per_s"] / frame["tokens_per_s"][0]).to_list())
        assert json.loads((folder / "manifest.json").read_text())["benchmark"]["config"] == {"steps": 5, "warmup": 3}
        assert "timed 5 steps after 3 warm-up steps" in capsys.readouterr().out

    def test_bench_finetune(self, results_dir, capsys):
        """Two rows, logging off then on; the ratio is on / off of the medians; provenance holds the short run."""
        assert main(["bench", "finetune", "--profile", "smoke"]) == 0
        folder = results_dir / "smoke" / "A_finetuning"
        frame = pl.read_parquet(folder / "benchmark.parquet")
        assert frame["ratio"].to_list() == pytest.approx([1.0, frame["median_s"][1] / frame["median_s"][0]])
        from lab.profiles import get_profile
        from lab.tracks.A_finetuning.config import config_for

        main_cfg = config_for(get_profile("smoke"))
        config = json.loads((folder / "manifest.json").read_text())["benchmark"]["config"]
        assert config["repeats"] == 2  # the short run's config is stored as its repr (as before the refactor)
        assert f"n_train={6 * main_cfg.batch_size}, " in config["finetune"] and ", epochs=1, " in config["finetune"]
        assert ", moments_every=1, " in config["finetune"]
        assert "fine-tune instrumentation overhead: 6 steps x 2 repeats" in capsys.readouterr().out
