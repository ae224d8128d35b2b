"""Shared fixtures: one thread (2-core machines), a data folder of the suite's own, tiny models per architecture,
a temp results root."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lab.models.loading import CAPTURE_ARCHS
from lab.paths import REPO_ROOT, data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------- the data folder
# The suite never writes into the developer's .data/ (smoke checkpoints, adapters, transcoders of their own runs):
# it gets a temporary data folder holding links to the read-only inputs ./.ci/setup fetched (and the converted
# SmolLM2 copy, a cache of a deterministic conversion). Subprocesses inherit it through LAB_DATA_DIR.
SHARED_INPUTS = ("smollm2", "shakespeare", "models")


def _suite_data_dir() -> Path:
    source = data_dir()
    folder = Path(tempfile.mkdtemp(prefix="lab-test-data-"))
    for name in SHARED_INPUTS:
        if (source / name).exists():
            (folder / name).symlink_to((source / name).resolve(), target_is_directory=True)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


os.environ["LAB_DATA_DIR"] = str(_suite_data_dir())


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """Point lab's results root at a temp folder for this test."""
    root = tmp_path / "results"
    monkeypatch.setenv("LAB_RESULTS_DIR", str(root))
    return root


@pytest.fixture(scope="module", params=CAPTURE_ARCHS)
def tiny_model(request):
    """A tiny random model of each architecture family the capture covers (module-scoped)."""
    from lab.models.loading import load_tiny_model

    return load_tiny_model(request.param, seed=0)


@pytest.fixture(scope="session")
def smoke_results(tmp_path_factory):
    """Every registered track run for real on the smoke profile (once per session); used as site results.

    Building the site from these means pages can only reference results that the tracks actually produce.
    """
    from lab.cli import main

    raw = tmp_path_factory.mktemp("smoke-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_RESULTS_DIR", str(raw))
        assert main(["run", "all", "--profile", "smoke", "--fresh"]) == 0
    # The speed page reads the benchmarks (no track makes them; `lab bench ...` on smoke takes minutes): the
    # committed ones, which the real site build checks against that page too.
    shutil.copytree(REPO_ROOT / "results" / "bench", raw / "smoke" / "bench")
    return raw / "smoke"
