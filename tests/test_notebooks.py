"""Notebooks: `marimo check` clean; each runs as a script on the smoke profile and writes results."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_marimo_check():
    marimo = Path(sys.executable).with_name("marimo")
    out = subprocess.run([str(marimo), "check", *map(str, NOTEBOOKS)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_pretrain_notebook_as_script(tmp_path):
    env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "pretrain.py"), "--", "--profile", "smoke"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = pl.read_parquet(tmp_path / "smoke" / "pretrain" / "summary.parquet")
    assert summary["iters"].item() == 200 and summary["final_val_loss"].item() < summary["best_val_loss"].item() + 1e-9


def test_pretrain_notebook_bad_profile(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "pretrain.py"), "--", "--profile", "huge"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode != 0 and "unknown profile 'huge'" in out.stderr


def test_every_notebook_uses_the_shared_script_helpers():
    """One way to tell script mode and fail a script run: lab.notebook, not a copy per notebook."""
    for nb in NOTEBOOKS:
        text = nb.read_text()
        assert "script_mode(mo)" in text and "mo.cli_args()" not in text, nb.name


def test_or_exit_turns_a_lab_error_into_one_line():
    import pytest

    from lab.errors import LabError
    from lab.notebook import or_exit, script_profile

    assert or_exit("t", lambda: 42) == 42
    with pytest.raises(SystemExit) as info:
        script_profile("D_bayes", {"profile": "huge"})
    assert str(info.value).startswith("D_bayes: error: unknown profile 'huge'") and "\n" not in str(info.value)

    def boom():
        raise LabError("the fix is X")

    with pytest.raises(SystemExit, match=r"^t: error: the fix is X$"):
        or_exit("t", boom)
    with pytest.raises(ValueError):  # only the errors a user can fix become one line
        or_exit("t", lambda: int("x"))


def test_or_exit_turns_an_os_error_into_one_line():
    import errno

    import pytest

    from lab.notebook import or_exit

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/results/x.parquet")

    with pytest.raises(SystemExit) as info:
        or_exit("t", full)
    line = str(info.value)
    assert line.startswith("t: error: /tmp/results/x.parquet: No space left on device: free some disk space")
    assert "nothing already written is lost" in line and "\n" not in line
