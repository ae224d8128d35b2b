"""Results writer: Parquet + chart from the Parquet + provenance, atomically, and published as one set per track."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import altair as alt
import polars as pl
import pytest

from lab import io, results
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
        data = (results_dir / "t" / "x.parquet").read_bytes()
        assert m["sha256"] == {"x.parquet": hashlib.sha256(data).hexdigest()} and m["bytes"] == {"x.parquet": len(data)}
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


# ----------------------------------------------------------------------------- result sets

KW = dict(config={}, seed=None, profile="cpu", wall_time_s=0)


def _write(name: str, value: int, **kw) -> None:
    results.write_result("t", name, pl.DataFrame({"v": [value]}), **KW, **kw)


def _snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _value(results_dir, name: str) -> int:
    return pl.read_parquet(results_dir / "t" / f"{name}.parquet")["v"][0]


@pytest.fixture
def old_set(results_dir):
    """A published set of two results, a=1 and b=1, and its bytes."""
    with results.result_set("t", "cpu"):
        _write("a", 1)
        _write("b", 1)
    return _snapshot(results_dir / "t")


class TestResultSet:
    """A track's files appear together; a failed or killed run leaves the previous set whole."""

    def test_files_appear_together(self, results_dir, old_set):
        with results.result_set("t", "cpu") as stage:
            _write("a", 2)
            assert _snapshot(results_dir / "t") == old_set  # nothing visible yet
            assert stage.parent == results_dir and stage.name.startswith(".t.")
            _write("b", 2)
        assert (_value(results_dir, "a"), _value(results_dir, "b")) == (2, 2)
        assert sorted(p.name for p in results_dir.iterdir()) == ["t"]  # the stage is gone

    def test_error_keeps_the_previous_set(self, results_dir, old_set):
        with pytest.raises(RuntimeError, match="crash"):
            with results.result_set("t", "cpu"):
                _write("a", 2)
                raise RuntimeError("crash")
        assert _snapshot(results_dir / "t") == old_set
        assert sorted(p.name for p in results_dir.iterdir()) == ["t"]

    def test_a_partial_set_keeps_the_other_files(self, results_dir, old_set):
        """`lab bench` writes only the benchmark: the rest of the set, and its manifest entries, stay."""
        with results.result_set("t", "cpu"):
            _write("benchmark", 7)
        after = _snapshot(results_dir / "t")
        assert {k: after[k] for k in ("a.parquet", "b.parquet")} == {k: old_set[k] for k in ("a.parquet", "b.parquet")}
        manifest = json.loads(after["manifest.json"])
        assert sorted(manifest) == ["a", "b", "benchmark"]
        assert manifest["a"] == json.loads(old_set["manifest.json"])["a"]

    def test_a_nested_set_joins_the_outer_one(self, results_dir, old_set):
        with results.result_set("t", "cpu") as outer:
            _write("a", 3)
            with results.result_set("t", "cpu") as inner:
                assert inner == outer
                _write("b", 3)
            assert _snapshot(results_dir / "t") == old_set  # published only when the outer set ends
        assert (_value(results_dir, "a"), _value(results_dir, "b")) == (3, 3)

    def test_the_stage_can_be_read_back(self, results_dir, old_set):
        with results.result_set("t", "cpu") as stage:
            _write("a", 4)
            assert pl.read_parquet(stage / "a.parquet")["v"][0] == 4

    def test_stale_temporaries_are_cleared(self, results_dir, old_set):
        """What killed runs left (a stage, an atomic write's temp file, a half-swapped folder) goes at the next
        publication; a stage of a process still running stays."""
        dead = (results_dir / ".t.999999999.tmp", results_dir / ".t.tmp", results_dir / ".t.999999999.old")
        for folder in dead:
            folder.mkdir()
            (folder / "a.parquet").write_bytes(b"partial")
        (results_dir / "t" / ".a.parquet.x1y2.tmp").write_bytes(b"partial")
        (results_dir / "t" / ".graphs.999999999.tmp").mkdir()
        running = results_dir / f".t.{os.getppid()}.tmp"
        running.mkdir()
        with results.result_set("t", "cpu"):
            _write("a", 5)
        assert sorted(p.name for p in results_dir.iterdir()) == sorted([running.name, "t"])
        assert sorted(p.name for p in (results_dir / "t").iterdir()) == ["a.parquet", "b.parquet", "manifest.json"]

    def test_without_renameat2_the_swap_still_publishes(self, results_dir, old_set, monkeypatch):
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
        with results.result_set("t", "cpu"):
            _write("a", 6)
        assert _value(results_dir, "a") == 6 and sorted(p.name for p in results_dir.iterdir()) == ["t"]

    def test_a_kill_between_the_fallback_renames_is_repaired(self, results_dir, old_set):
        """Without renameat2 a kill between the two renames leaves no folder and the old one as .t.<pid>.old: the
        next publication puts it back first, so its other files survive."""
        (results_dir / "t").rename(results_dir / ".t.999999999.old")
        with results.result_set("t", "cpu"):
            _write("a", 7)
        assert (_value(results_dir, "a"), _value(results_dir, "b")) == (7, 1)

    def test_outside_a_set_each_file_is_written_at_once(self, results_dir, old_set):
        _write("a", 8)
        assert _value(results_dir, "a") == 8 and sorted(p.name for p in results_dir.iterdir()) == ["t"]


class TestWriteFailures:
    """Disk full or a folder that cannot be written: one LabError naming the folder and the fix, old set kept."""

    def test_disk_full_while_staging(self, results_dir, old_set, monkeypatch):
        def full(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(results, "atomic_write_bytes", full)
        expected = (
            r"could not write .*t/a.parquet \(No space left on device\): free disk space or make .*t writable, then "
            r"run the command again; the previous results in .*t are unchanged"
        )
        with pytest.raises(LabError, match=expected):
            with results.result_set("t", "cpu"):
                _write("a", 2)
        assert _snapshot(results_dir / "t") == old_set
        assert sorted(p.name for p in results_dir.iterdir()) == ["t"]

    def test_disk_full_at_the_swap(self, results_dir, old_set, monkeypatch):
        def full(current, stage):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage / "b.parquet"))

        monkeypatch.setattr(results, "_complete_set", full)
        with pytest.raises(LabError, match="No space left on device"):
            with results.result_set("t", "cpu"):
                _write("a", 2)
        assert _snapshot(results_dir / "t") == old_set
        assert sorted(p.name for p in results_dir.iterdir()) == ["t"]

    def test_disk_full_outside_a_set(self, results_dir, old_set, monkeypatch):
        def full(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(results, "atomic_write_bytes", full)
        with pytest.raises(LabError, match="free disk space.*previous file is unchanged"):
            _write("a", 2)
        assert _snapshot(results_dir / "t") == old_set

    def test_folder_not_writable(self, results_dir, old_set, monkeypatch):
        """(Simulated: the tests may run as root, whom permissions do not stop.)"""
        real = os.access
        monkeypatch.setattr(results.os, "access", lambda p, mode: real(p, mode) and str(p) != str(results_dir / "t"))
        with pytest.raises(LabError, match=r"t is not writable: make it writable \(chmod u\+w"):
            with results.result_set("t", "cpu"):
                _write("a", 2)
        assert _snapshot(results_dir / "t") == old_set


class TestManifest:
    """A damaged manifest names its fix when read, and does not block the next run."""

    def test_truncated_manifest_names_the_fix(self, results_dir, old_set):
        path = results_dir / "t" / "manifest.json"
        path.write_bytes(old_set["manifest.json"][:40])
        with pytest.raises(LabError, match=r"manifest.json is not valid JSON .*rerun `lab run t`"):
            results.read_manifest(path)

    def test_not_a_manifest(self, results_dir, old_set):
        path = results_dir / "t" / "manifest.json"
        path.write_text('{"a": 1}')
        with pytest.raises(LabError, match="is not a lab manifest"):
            results.read_manifest(path)

    def test_next_run_rewrites_a_truncated_manifest(self, results_dir, old_set):
        (results_dir / "t" / "manifest.json").write_bytes(old_set["manifest.json"][:40])
        with results.result_set("t", "cpu"):
            _write("a", 2)
        assert sorted(results.read_manifest(results_dir / "t" / "manifest.json")) == ["a"]  # b is now unlisted

    def test_rerun_command_names_the_profile(self, tmp_path):
        assert results.rerun_command(tmp_path / "results" / "pretrain") == "lab run pretrain"
        assert results.rerun_command(tmp_path / "smoke" / "B_attention") == "lab run B_attention --profile smoke"


KILLED = """
import os, signal, sys
import polars as pl
from lab import io, results

point = sys.argv[1]
def kill(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "staging":
    real = results.update_manifest
    def update(folder, name, record):
        real(folder, name, record)
        if name == "b":
            kill()
    results.update_manifest = update
elif point == "swapped":  # after the exchange, before the old set is removed
    io.discard = kill
elif point == "merging":
    results.copy_missing = kill
with results.result_set("t", "cpu"):
    for name in ("a", "b", "c"):
        results.write_result("t", name, pl.DataFrame({"v": [2]}), config={}, seed=None, profile="cpu", wall_time_s=0)
"""


class TestKill:
    """kill -9 anywhere in a publication leaves the old set or the new one, never a mix; the next run tidies up."""

    @pytest.mark.parametrize("point, published", [("staging", False), ("merging", False), ("swapped", True)])
    def test_kill_leaves_old_or_new(self, results_dir, old_set, point, published):
        script = textwrap.dedent(KILLED)
        env = {**os.environ, "LAB_RESULTS_DIR": str(results_dir)}
        out = subprocess.run([sys.executable, "-c", script, point], env=env, capture_output=True, timeout=120)
        assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
        now = _snapshot(results_dir / "t")
        if published:
            assert {_value(results_dir, n) for n in ("a", "b", "c")} == {2}
            assert sorted(json.loads(now["manifest.json"])) == ["a", "b", "c"]
        else:
            assert now == old_set
        assert [p.name for p in results_dir.iterdir() if p.name != "t"]  # its temporary is left...
        with results.result_set("t", "cpu"):
            _write("d", 1)
        assert sorted(p.name for p in results_dir.iterdir()) == ["t"]  # ...and cleared by the next publication
