"""Data-parallel fine-tuning with accelerate: two CPU processes (gloo) against one, and who writes results.

The launches use ``accelerate launch --multi_gpu --num_processes 2``: on a CPU-only machine that is the flag that
starts torchrun's two processes (``--cpu --num_processes 2`` starts one; accelerate's CPU mode goes through
``mpirun``), and ``Trainer``'s ``use_cpu`` picks the gloo backend. Each process gets one thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from lab.profiles import get_profile
from lab.tracks.A_finetuning.config import config_for
from lab.train import dp_check

# Two processes with batch b/2 each take the same steps as one with batch b: the same examples per step (accelerate
# hands process r every 2nd batch of the same seeded sampler), the token-mean loss over both (Trainer divides each
# token-loss sum by the count gathered over the processes) and DDP's averaged gradients. Only the order of sums
# differs, and the shapes bf16 autocast rounds at. Measured on the smoke recipe: with the bf16 step, final loss
# within 2e-7 (relative), step losses within 7e-5, grad norms within 6e-4 (relative); with precision="fp32" the
# final loss is identical, step losses within 1e-6. Processes that train without syncing their gradients, each on
# its half, end 4.5e-3 away in final loss and up to 4.7e-3 in a step's loss: the tolerances are well below that.
FINAL_LOSS_RTOL = 1e-5
STEP_LOSS_ATOL = 5e-4
GRAD_NORM_RTOL = 5e-3
UNSYNCED_GAP = 4.5e-3  # |final loss| difference when the processes do not sync (what an evaluate() before train() did)


# ------------------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], tmp_path: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``python -m lab.train.dp_check ARGS`` on 2 processes of 1 thread each."""
    data = tmp_path / "data"  # the launched run's own data folder (checkpoints, adapters)
    data.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAB_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lab.train.dp_check",
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _smoke_recipe():
    return config_for(get_profile("smoke"))


# ------------------------------------------------------------------------------------------------- tests


class TestDataParallel:
    """Two processes of a plain Trainer fine-tune reproduce one process with the same global batch."""

    @pytest.fixture(scope="class")
    def runs(self, tmp_path_factory):
        tmp = tmp_path_factory.mktemp("dp")
        cfg = _smoke_recipe()
        assert cfg.batch_size % 2 == 0
        cfg_json = json.dumps(asdict(cfg))
        _launch(
            ["train", "--config", cfg_json, "--out", str(tmp / "two.json"), "--checkpoints", str(tmp / "ck2")],
            tmp,
        )
        one = dp_check.train("smoke", cfg_json, tmp / "one.json", tmp / "ck1")  # this process, alone
        return one, json.loads((tmp / "two.json").read_text())

    def test_two_processes_split_the_global_batch(self, runs):
        """The launch really ran two processes, each with half the recipe's batch."""
        one, two = runs
        assert (one["world"], two["world"]) == (1, 2)
        assert two["per_device_batch"] * 2 == one["per_device_batch"] == _smoke_recipe().batch_size
        assert one["steps"] == two["steps"] and one["total_steps"] == two["total_steps"] == len(one["steps"])

    def test_same_final_loss(self, runs):
        """The final model's mean token loss on the training set matches one process within FINAL_LOSS_RTOL."""
        one, two = runs
        assert abs(one["final_train_loss"] - one["loss"][0]) > 10 * UNSYNCED_GAP  # training moved the loss
        assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=FINAL_LOSS_RTOL)

    def test_same_steps(self, runs):
        """Every step's loss (averaged over the processes), pre-clip gradient norm and LR match one process."""
        one, two = runs
        assert two["loss"] == pytest.approx(one["loss"], abs=STEP_LOSS_ATOL)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=GRAD_NORM_RTOL)
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-12)


def test_only_rank0_writes_results(tmp_path):
    """`lab run A_finetuning` under two processes: rank 0 publishes the track's results, rank 1 writes none."""
    results = tmp_path / "results"
    _launch(["cli", str(results), "--", "run", "A_finetuning", "--profile", "smoke", "--fresh"], tmp_path)
    track = results / "rank0" / "smoke" / "A_finetuning"
    manifest = json.loads((track / "manifest.json").read_text())
    assert {"summary", "runs"} <= set(manifest) and (track / "summary.parquet").is_file()
    assert not (results / "rank1").exists(), sorted(str(p) for p in (results / "rank1").rglob("*"))
