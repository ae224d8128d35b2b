"""Results writer: Parquet + chart from the Parquet + provenance, atomically."""

import json

import altair as alt
import polars as pl
import pytest

from lab import results
from lab.errors import LabError


def _chart(df):
    return alt.Chart(df).mark_line().encode(x="step:Q", y="loss:Q")


class TestWriteResult:
    """write_result writes Parquet, a chart built from it, and provenance."""

    def test_round_trip_and_chart_from_parquet(self, results_dir):
        df = pl.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.5, 2.25]})
        pq = results.write_result(
            "t", "curve", df, config={"a": 1}, seed=3, profile="cpu", wall_time_s=1.5, chart=_chart
        )
        assert pq == results_dir / "t" / "curve.parquet"
        assert pl.read_parquet(pq).equals(df)
        spec = json.loads((results_dir / "t" / "curve.vl.json").read_text())
        assert "vega-lite" in spec["$schema"]
        (values,) = spec["datasets"].values()
        assert values == df.to_dicts()

    def test_chart_sees_only_what_parquet_holds(self, results_dir):
        df = pl.DataFrame({"step": [0, 1], "loss": [1.0, 2.0]}).with_columns(pl.col("loss").cast(pl.Float32))
        seen = {}

        def chart(read_back):
            seen["df"] = read_back
            return _chart(read_back)

        results.write_result("t", "c", df, config={}, seed=None, profile="cpu", wall_time_s=0, chart=chart)
        assert seen["df"] is not df and seen["df"].equals(df)

    def test_chart_with_nan_is_refused(self, results_dir):
        df = pl.DataFrame({"step": [0, 1], "loss": [1.0, float("nan")]})
        with pytest.raises(LabError, match="NaN"):
            results.write_result("t", "n", df, config={}, seed=None, profile="cpu", wall_time_s=0, chart=_chart)
        assert not (results_dir / "t" / "n.vl.json").exists()

    def test_provenance(self, results_dir):
        results.write_result(
            "t", "x", pl.DataFrame({"v": [1]}), config={"lr": 0.1}, seed=7, profile="cpu", wall_time_s=2.0
        )
        m = json.loads((results_dir / "t" / "manifest.json").read_text())["x"]
        assert m["config"] == {"lr": 0.1} and m["seed"] == 7 and m["profile"] == "cpu"
        assert m["wall_time_s"] == 2.0 and m["files"] == ["x.parquet"]
        assert {"torch", "polars", "python"} <= set(m["packages"]) and "cpu_count" in m["hardware"]
        assert m["git_commit"]

    def test_profile_folders(self, results_dir):
        assert results.results_root("cpu") == results_dir
        assert results.results_root("smoke") == results_dir / "smoke"

    def test_rejects_non_polars(self, results_dir):
        with pytest.raises(LabError, match="polars DataFrame"):
            results.write_result("t", "x", {"v": [1]}, config={}, seed=None, profile="cpu", wall_time_s=0)

    def test_missing_result_names_command(self, results_dir):
        with pytest.raises(LabError, match="lab run pretrain --profile cpu"):
            results.read_result("pretrain", "summary")


class TestAtomicWrite:
    """An interrupted write never leaves a truncated file and keeps the previous content."""

    def test_interrupted_write_keeps_old_file(self, tmp_path, monkeypatch):
        target = tmp_path / "r.parquet"
        results.atomic_write_bytes(target, b"old")

        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(results.os, "replace", boom)
        with pytest.raises(KeyboardInterrupt):
            results.atomic_write_bytes(target, b"new content")
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # temp file cleaned up

    def test_failed_chart_keeps_previous_chart(self, results_dir):
        df = pl.DataFrame({"step": [0], "loss": [1.0]})
        results.write_result("t", "c", df, config={}, seed=None, profile="cpu", wall_time_s=0, chart=_chart)
        before = (results_dir / "t" / "c.vl.json").read_text()

        def bad(_):
            raise RuntimeError("chart failed")

        with pytest.raises(RuntimeError):
            results.write_result("t", "c", df, config={}, seed=None, profile="cpu", wall_time_s=0, chart=bad)
        assert (results_dir / "t" / "c.vl.json").read_text() == before
