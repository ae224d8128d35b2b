"""The speed suite's arithmetic and publishing, and the main job's timings table, against hand calculations."""

import polars as pl
import pytest

from lab import results
from lab.bench import speed, suite
from lab.errors import LabError
from lab.profiles import get_profile

PEAK = {"fp32": 100.0, "bf16": 1000.0}


def _measurement(workload="lora", base=(2.0, 4.0, 3.0, 9.0, 1.0), fast=(1.0, 0.5, 1.5, 1.0, 2.0), **kw):
    fields = dict(
        workload=workload,
        baseline="fp32 eager",
        fast="bf16",
        tokens_per_call=600,
        baseline_s=base,
        fast_s=fast,
        flops_per_token=1e6,
        fast_dtype="bf16",
        target=2.0,
    )
    return speed.Measurement(**(fields | kw))


class TestRow:
    def test_medians_speedup_and_mfu_by_hand(self):
        r = speed.row(_measurement(), PEAK)
        # medians: baseline 3.0 s, fast 1.0 s for 600 tokens
        assert r["tokens_per_s_baseline"] == pytest.approx(200.0)
        assert r["tokens_per_s"] == pytest.approx(600.0)
        assert r["speedup"] == pytest.approx(3.0) and r["meets_target"]
        # 600 tok/s x 1 MFLOP = 0.6 GFLOP/s of a 1000 GFLOP/s bf16 peak; the baseline against the fp32 peak
        assert r["mfu"] == pytest.approx(0.6 / 1000)
        assert r["mfu_baseline"] == pytest.approx(0.2 / 100)

    def test_fp32_fast_path_is_measured_against_the_fp32_peak(self):
        r = speed.row(_measurement(fast_dtype="fp32", target=4.0), PEAK)
        assert r["mfu"] == pytest.approx(0.6 / 100) and not r["meets_target"]

    def test_alternate_calls_each_path_in_turn(self):
        calls = []
        times = speed.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=5, warmup=1)
        assert calls == ["a", "b"] * 6 and all(len(t) == 5 for t in times.values())

    def test_zero_repeats_are_refused(self):
        with pytest.raises(LabError, match="repeats"):
            speed.alternate({"a": lambda: None}, repeats=0)

    def test_matmul_peak_is_a_plausible_rate(self):
        # 2 n^3 flops over the best time: a 64 x 64 product on any CPU runs between 0.01 and 10^5 GFLOP/s
        assert 0.01 < speed.matmul_gflops(__import__("torch").float32, n=64, repeats=5) < 1e5


class TestSuite:
    def test_one_workload_replaces_its_row_and_keeps_the_others(self, results_dir, monkeypatch):
        monkeypatch.setattr(speed, "peaks", lambda: PEAK)
        fake = {"lora": _measurement("lora"), "wind": _measurement("wind", fast=(3.0,) * 5)}
        monkeypatch.setattr(suite, "measure_fn", lambda w: lambda profile, repeats: fake[w])
        smoke = get_profile("smoke")
        suite.run(smoke, ["lora", "wind"])
        fake["lora"] = _measurement("lora", fast=(0.5,) * 5)
        table = suite.run(smoke, ["lora"])
        saved = pl.read_parquet(results_dir / "smoke" / "bench" / "speed.parquet")
        assert saved.equals(table)
        assert saved["workload"].to_list() == ["lora", "wind"]  # the suite's order
        assert saved.filter(pl.col("workload") == "lora")["speedup"].item() == pytest.approx(6.0)
        assert saved.filter(pl.col("workload") == "wind")["speedup"].item() == pytest.approx(1.0)

    def test_unknown_workload_is_refused_before_any_timing(self):
        with pytest.raises(LabError, match="unknown workload 'fast'.*lora"):
            suite.run(get_profile("smoke"), ["fast"])


class TestTimings:
    def test_a_track_replaces_its_own_row(self, results_dir):
        results.record_timing("pretrain", "smoke", 10.0)
        results.record_timing("A_finetuning", "smoke", 20.0)
        table = results.record_timing("pretrain", "smoke", 12.5)
        saved = pl.read_parquet(results_dir / "smoke" / "timings.parquet")
        assert saved.equals(table)
        assert dict(zip(saved["track"], saved["wall_s"], strict=True)) == {"pretrain": 12.5, "A_finetuning": 20.0}
        assert set(saved["profile"]) == {"smoke"} and saved["commit"].null_count() == 0

    def test_a_damaged_table_is_started_again(self, results_dir, capsys):
        path = results_dir / "smoke" / "timings.parquet"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not parquet")
        table = results.record_timing("pretrain", "smoke", 1.0)
        assert table["track"].to_list() == ["pretrain"] and "unreadable" in capsys.readouterr().out


class TestHeadlines:
    def test_committed_summary_is_read_from_git(self):
        import subprocess

        from lab.bench import headlines
        from lab.paths import REPO_ROOT

        first = subprocess.run(
            ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.split()[0]
        assert headlines.committed_summary(first, "results/no_such_track") is None
        with pytest.raises(LabError, match="git cannot read commit 'nonsense-commit'"):
            headlines.committed_summary("nonsense-commit", "results/pretrain")

    def test_compare_reports_each_headline_then_and_now(self, results_dir, monkeypatch):
        from lab.bench import headlines
        from lab.tracks import headlines as fields_of
        from lab.tracks.pretrain.summary import HEADLINES

        folder = results_dir / "smoke" / "pretrain"
        folder.mkdir(parents=True)
        pl.DataFrame({"final_val_loss": [2.0], "best_val_loss": [1.5], "tokens_per_s": [100.0]}).write_parquet(
            folder / "summary.parquet"
        )
        then = {"final_val_loss": 2.5, "best_val_loss": 1.5, "tokens_per_s": 50.0}
        monkeypatch.setattr(
            headlines, "committed_summary", lambda c, f: then if f == "results/smoke/pretrain" else None
        )
        frame = headlines.compare(get_profile("smoke"), "abc", fields_of())
        mine = frame.filter(pl.col("track") == "pretrain")
        assert mine["field"].to_list() == list(HEADLINES)
        assert mine["change"].to_list() == pytest.approx([-0.5, 0.0, 50.0])
        assert mine["relative_change"].to_list() == pytest.approx([-0.2, 0.0, 1.0])
        assert mine["same"].to_list() == [False, True, False]
        assert mine["before_value"].to_list() == [2.5, 1.5, 50.0] and mine["after_value"].to_list() == [2.0, 1.5, 100.0]
        assert frame.filter(pl.col("track") != "pretrain")["after"].null_count() == frame.height - 3

    def test_main_job_lists_each_tracks_time_in_track_order_and_their_sum(self, results_dir):
        from lab.bench import headlines

        results.record_timing("C_probing", "smoke", 30.0)
        results.record_timing("pretrain", "smoke", 12.0)
        results.record_timing("pretrain", "smoke", 10.0)  # the last run of a track counts
        job = headlines.main_job(get_profile("smoke"), ["pretrain", "A_finetuning", "C_probing"])
        assert job["track"].to_list() == ["pretrain", "C_probing", "all tracks"]
        assert job["wall_s"].to_list() == [10.0, 30.0, 40.0]
        assert job["minutes"].to_list() == pytest.approx([10 / 60, 0.5, 40 / 60])

    def test_main_job_without_timings_names_the_command(self, results_dir):
        from lab.bench import headlines

        with pytest.raises(LabError, match="lab run all --profile smoke"):
            headlines.main_job(get_profile("smoke"), ["pretrain"])
