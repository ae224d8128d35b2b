"""The `lab` command: user errors are one line + non-zero exit; a smoke run writes consistent results."""

import errno
import json
import os
import re
import subprocess
import sys

import polars as pl
import pytest

from lab.cli import main, os_error_line


def _outcome(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``lab <argv>``, whether argparse exits or ``main`` returns."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def _no_compute(*args, **kwargs):
    raise AssertionError("compute started before the refusal")


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

    @pytest.mark.parametrize(
        "argv, line",
        [
            (["bench", "pretrain", "--steps", "0"], "argument --steps: must be an integer >= 1 (got '0')"),
            (["bench", "pretrain", "--steps", "-5"], "argument --steps: must be an integer >= 1 (got '-5')"),
            (["bench", "finetune", "--steps", "2.5"], "argument --steps: must be an integer >= 1 (got '2.5')"),
            (["site", "serve", "--port", "99999"], "argument --port: must be a port number in 1..65535 (got '99999')"),
            (["site", "serve", "--port", "0"], "argument --port: must be a port number in 1..65535 (got '0')"),
            (["run", "pretrain", "--frob"], "unrecognized arguments: --frob"),
            (["bench", "capture", "--steps", "3"], "`lab bench capture` takes no --steps (only finetune does)"),
        ],
    )
    def test_impossible_arguments_are_refused_in_one_line(self, argv, line, capsys, monkeypatch):
        """argparse's types (and the benchmark's signature) refuse them: exit 2, one ``lab: error:`` line."""
        monkeypatch.setattr("lab.tracks.C_probing.run.benchmark", _no_compute)  # takes no steps, as the real one
        status, err = _outcome(argv, capsys)
        assert status == 2 and err.startswith("lab: error: ") and line in err and err.count("\n") == 1

    @pytest.mark.parametrize(
        "argv", [["run", "pretrain", "--profile", "gpu"], ["bench", "pretrain", "--profile", "gpu"]]
    )
    def test_gpu_profile_without_cuda_is_refused_before_compute(self, argv, capsys, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr("lab.tracks.pretrain.run.run", _no_compute)
        monkeypatch.setattr("lab.tracks.pretrain.run.benchmark", _no_compute)
        status, err = _outcome(argv, capsys)
        assert status == 2 and err == (
            "lab: error: profile 'gpu' runs on a CUDA GPU and this machine has none "
            "(torch.cuda.is_available() is False): use --profile cpu\n"
        )

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
    timings = pl.read_parquet(results_dir / "smoke" / "timings.parquet")  # the main job's time per track
    assert timings["track"].to_list() == ["pretrain"] and timings["wall_s"].item() >= summary["train_time_s"]


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


class TestRunReport:
    """`lab run` says what it reused or trained, prints the headline numbers readably, and where results went."""

    @staticmethod
    def _run(capsys, *flags) -> str:
        assert main(["run", "pretrain", "--profile", "smoke", *flags]) == 0
        return capsys.readouterr().out

    def test_a_finished_run_says_so_and_keeps_the_measured_time(self, results_dir, capsys):
        first = self._run(capsys, "--fresh")
        assert "retrained from scratch (--fresh)" in first
        timing = pl.read_parquet(results_dir / "smoke" / "timings.parquet")
        second = self._run(capsys)
        summary = pl.read_parquet(results_dir / "smoke" / "pretrain" / "summary.parquet").row(0, named=True)
        # the track's own record: training resumed at its last step, so no step was taken
        assert summary["resumed_from"] == summary["iters"]
        assert "already complete: nothing was retrained" in second
        assert "`lab run pretrain --profile smoke --fresh` retrains from scratch" in second
        # the time of the run that trained stays: a run that reused everything is not the track's time
        assert pl.read_parquet(results_dir / "smoke" / "timings.parquet").equals(timing)

    def test_a_partly_finished_run_says_what_it_trained(self, results_dir, capsys):
        import shutil

        from lab import paths

        self._run(capsys)
        shutil.rmtree(paths.checkpoint_dir("smoke", "pretrain-learned"))  # the ablation's run, as if interrupted
        out = self._run(capsys)
        assert "resumed: reused the work saved in" in out and "trained what was missing" in out
        assert "already complete" not in out

    def test_headlines_and_results_folder(self, results_dir, capsys):
        from lab.tracks.pretrain.summary import HEADLINES

        out = self._run(capsys)
        folder = results_dir / "smoke" / "pretrain"
        summary = pl.read_parquet(folder / "summary.parquet").row(0, named=True)
        report = out[out.index("== pretrain done in ") :].splitlines()
        assert len(report) < 12 and max(map(len, report)) < 160  # a few readable lines, not 600 characters
        assert "final_val_loss=" not in out
        rows = {parts[0]: parts[1] for x in report if len(parts := re.split(r"\s{2,}", x.strip())) >= 2}
        for field in HEADLINES:  # each headline number printed to a few significant digits, under its label
            printed = rows[field.replace("_per_s", "/s").replace("_", " ")]
            assert float(printed.replace(",", "")) == pytest.approx(summary[field], rel=5e-3), (field, printed)
        written = sorted(p.stem for p in folder.glob("*.parquet"))
        assert f"results: {folder}/ — {len(written)} .parquet, " in out
        assert ", ".join(written) in out  # every result the run wrote, by name

    def test_a_track_without_checkpoints_says_it_recomputed(self):
        from lab.cli import _what_happened

        reused, line = _what_happened("C_probing", "smoke", False, ([], {}), ([], {}))
        assert not reused and line == "C_probing keeps no checkpoints: everything was computed again"


class TestList:
    """`lab list`: each track's results (present or not), the commit that wrote them, when, the measured time."""

    def test_results_commit_and_measured_time(self, results_dir, capsys):
        assert main(["run", "pretrain", "--profile", "smoke", "--fresh"]) == 0
        capsys.readouterr()
        assert main(["list", "--profile", "smoke"]) == 0
        out = capsys.readouterr().out
        manifest = json.loads((results_dir / "smoke" / "pretrain" / "manifest.json").read_text())
        row = next(x for x in out.splitlines() if x.strip().startswith("pretrain "))
        commit = manifest["summary"]["git_commit"]
        assert f"{len(manifest)} results" in row and commit[:7] in row
        assert manifest["summary"]["written_at"][:10] in row
        wall = pl.read_parquet(results_dir / "smoke" / "timings.parquet")["wall_s"].item()
        assert f"{wall:.1f} s" in row or f"{wall:.0f} s" in row
        for track in ("A_finetuning", "B_attention", "C_probing", "D_bayes", "E_circuits"):
            other = next(x for x in out.splitlines() if x.strip().startswith(track + " "))
            assert "none yet" in other and "not measured" in other
        assert "`lab run A_finetuning --profile smoke`" in out
        assert "profile smoke" in out and "smoke  tiny random models" in out

    def test_no_timings_table(self, results_dir, capsys):
        assert main(["run", "pretrain", "--profile", "smoke", "--fresh"]) == 0
        (results_dir / "smoke" / "timings.parquet").unlink()
        capsys.readouterr()
        assert main(["list", "--profile", "smoke"]) == 0
        row = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("pretrain "))
        assert "results" in row and row.rstrip().endswith("not measured")


class TestBench:
    """`lab bench <name>` runs the library benchmark through the track that owns its results."""

    def test_bench_pretrain(self, results_dir, capsys):
        """The track's loop benchmark (run by `lab run pretrain`) writes results/pretrain/benchmark.parquet."""
        from lab.profiles import get_profile
        from lab.tracks.pretrain.run import benchmark

        benchmark(get_profile("smoke"), steps=5)
        folder = results_dir / "smoke" / "pretrain"
        frame = pl.read_parquet(folder / "benchmark.parquet")
        assert frame["loop"][0].startswith("reference") and frame["ratio"][0] == 1.0  # the baseline against itself
        assert frame["ratio"].to_list() == pytest.approx((frame["tokens_per_s"] / frame["tokens_per_s"][0]).to_list())
        assert json.loads((folder / "manifest.json").read_text())["benchmark"]["config"] == {"steps": 5, "warmup": 3}
        out = capsys.readouterr().out
        assert "5 steps" in out and "3 warm-up steps" in out

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


class TestOSErrors:
    """Everyday OS errors (disk full, permission denied, read-only, port taken) end in one line and exit 2, and the
    files already written are untouched; programming errors still raise."""

    @staticmethod
    def _snapshot(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    @pytest.fixture
    def written(self, results_dir, capsys):
        """A first benchmark's results, to check that a failing second run loses none of them."""
        assert main(["bench", "finetune", "--profile", "smoke", "--steps", "1"]) == 0
        capsys.readouterr()
        folder = results_dir / "smoke" / "A_finetuning"
        return folder, self._snapshot(folder)

    def test_disk_full_while_writing(self, written, capsys, monkeypatch):
        folder, before = written

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)  # where a full disk shows up in lab.io's atomic writes
        status, err = _outcome(["bench", "finetune", "--profile", "smoke", "--steps", "1"], capsys)
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
        # the line names the file being written (lab.io adds the path that write/fsync errors lack)
        assert re.match(r"lab: error: /\S+: No space left on device: free some disk space and run the same", err)
        assert "nothing already written is lost (every write is atomic)" in err
        assert self._snapshot(folder) == before  # no file changed, no temp file left

    def test_permission_denied_names_the_path(self, written, capsys, monkeypatch):
        import tempfile

        folder, before = written

        def denied(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        status, err = _outcome(["bench", "finetune", "--profile", "smoke", "--steps", "1"], capsys)
        assert status == 2 and err.count("\n") == 1
        assert err.startswith("lab: error: /") and ": Permission denied: check that path's permissions" in err
        assert self._snapshot(folder) == before

    @pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
    def test_unwritable_results_folder(self, written, capsys):
        folder, before = written
        folder.chmod(0o555)
        try:
            status, err = _outcome(["bench", "finetune", "--profile", "smoke", "--steps", "1"], capsys)
        finally:
            folder.chmod(0o755)
        assert status == 2 and err.count("\n") == 1 and "Permission denied" in err
        assert self._snapshot(folder) == before

    @pytest.mark.parametrize(
        "error, line",
        [
            (
                OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x.parquet"),
                "/mnt/ro/x.parquet: Read-only file system: that file system is read-only: point LAB_RESULTS_DIR",
            ),
            (OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), "Address already in use: that port is taken"),
            (OSError("plain message"), "plain message"),
        ],
    )
    def test_os_error_line(self, error, line):
        assert os_error_line(error).startswith(line) and "\n" not in os_error_line(error)

    def test_programming_errors_are_not_hidden(self, monkeypatch):
        def bug(*args, **kwargs):
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr("lab.tracks.pretrain.run.run", bug)
        with pytest.raises(ZeroDivisionError):
            main(["run", "pretrain", "--profile", "smoke"])
