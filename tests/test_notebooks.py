"""Notebooks: `marimo check` clean; every app loads with no cell error, on the committed results and on a fresh
clone's empty results; each runs as a script on the smoke profile and writes results."""

import html
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
COMMITTED = ROOT / "results"
MARIMO = Path(sys.executable).with_name("marimo")


def _load_app(notebook: Path, out: Path, results: Path) -> tuple[int, str, str]:
    """Run every cell of ``notebook`` as its app does (``marimo export html``: edit mode, no button pressed) and
    return (exit status, stderr, the page's text with HTML entities decoded). marimo exits non-zero when a cell
    raised."""
    env = {**os.environ, "LAB_RESULTS_DIR": str(results)}
    page = out / f"{notebook.stem}.html"
    done = subprocess.run(
        [str(MARIMO), "export", "html", "--no-include-code", str(notebook), "-o", str(page), "-f"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    text = html.unescape(html.unescape(page.read_text())) if page.exists() else ""
    return done.returncode, done.stderr, text


def _summary(track: str) -> dict:
    return pl.read_parquet(COMMITTED / track / "summary.parquet").row(0, named=True)


E_PARTS = ("train_time_s", "transcoder_train_s", "attribution_s_total")  # what `lab run E_circuits` spends
# What each app must show from the committed results, computed here from the Parquet files (not by lab's helpers).
SHOWN = {
    "pretrain": lambda: [f"{_summary('pretrain')['final_val_loss']:.3f}"],
    "A_finetuning": lambda: [f"{_summary('A_finetuning')['main_exact_rate'] * 100:.1f} %"],
    "B_attention": lambda: [f"{_summary('B_attention')['mean_sink_share']:.2f}"],
    "C_probing": lambda: [f"{_summary('C_probing')['lens_kl_mid']:.2f}"],
    "D_bayes": lambda: [f"{_summary('D_bayes')['mae_mean']:.4f}"],
    "E_circuits": lambda: [
        "No fine-tuned adapter for",  # the suite's data folder has no adapter: the app says what to run first
        "lab run E_circuits",
        f"about {round(sum(_summary('E_circuits')[k] for k in E_PARTS) / 60)} min",  # the committed run's time
    ],
}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_app_loads_with_no_cell_error(notebook, tmp_path):
    """On the committed results: no cell raises, and the app shows the committed headline numbers."""
    status, err, text = _load_app(notebook, tmp_path, COMMITTED)
    assert status == 0 and "failed to execute" not in err, err[-3000:]
    for needle in SHOWN[notebook.stem]():
        assert needle in text, (notebook.name, needle)
    assert "Result clipped" not in text  # no table shows more columns than fit


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_app_loads_on_a_fresh_clone(notebook, tmp_path):
    """With no results at all, every app still loads and says what is missing, without a cell error."""
    status, err, text = _load_app(notebook, tmp_path, tmp_path / "no-results")
    assert status == 0 and "failed to execute" not in err, err[-3000:]
    assert "lab run" in text  # each missing result names the command that makes it


def test_a_cell_error_fails_the_load_check(tmp_path):
    """The check above is not trivially satisfied: a notebook whose cell raises fails it."""
    broken = tmp_path / "broken.py"
    broken.write_text(
        "import marimo\n\napp = marimo.App()\n\n\n@app.cell\ndef _():\n    1 / 0\n    return\n\n\n"
        'if __name__ == "__main__":\n    app.run()\n'
    )
    status, err, _ = _load_app(broken, tmp_path, COMMITTED)
    assert status != 0 and "division by zero" in err


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
