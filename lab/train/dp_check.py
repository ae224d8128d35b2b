"""Data-parallel fine-tuning on an existing engine: what ``accelerate launch`` starts on every process.

:func:`~lab.train.lora.train_lora` is a plain ``Trainer`` run, so accelerate (torchrun underneath, gloo on CPUs,
NCCL on GPUs) runs it on N processes with nothing of our own: each process takes every N-th batch of the same
seeded sampler (accelerate's ``BatchSamplerShard``), DDP averages the gradients, and ``Trainer`` divides each
process's token-loss sum by the token count gathered over all processes (``average_tokens_across_devices``), so N
processes with ``batch_size / N`` examples each take the same steps as one process with ``batch_size``. This module
only adds the two things a check of that needs:

- ``train``: one fine-tuning run with the *global* batch of a config split over the processes, then the final
  model's mean token loss over the whole training set (computed the same way for any process count) and the
  per-step log, averaged over the processes (``Trainer`` scales each process's loss by N for DDP's mean, so
  rank 0's own step loss is not the global one). Only the main process writes ``--out``.
- ``cli``: the ``lab`` command, with each process's results root in its own ``rank<R>/`` folder below the given
  one, so a test can see that only rank 0 wrote results (the tracks guard their writes with the ``RANK``
  variable).

Both first make accelerate's process state with ``cpu=True`` when there is no CUDA: a bare ``PartialState()`` on a
CPU-only torchrun process is a single, non-distributed state, in which every process calls itself the main one.

On one CPU machine ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's multi-CPU mode
goes through ``mpirun``); ``--multi_gpu`` is the flag that starts torchrun's N processes, and ``Trainer``'s
``use_cpu`` then picks gloo::

    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m lab.train.dp_check train \
        --config '{"batch_size": 4, ...}' --out dp.json --checkpoints ck/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lab.errors import LabError


def process_state():
    """accelerate's shared process state, distributed over the launched processes on CPUs too."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def per_device(cfg, world: int):
    """``cfg`` with its (global) ``batch_size`` split evenly over ``world`` processes."""
    if cfg.batch_size % world:
        raise LabError(
            f"batch_size {cfg.batch_size} does not split over {world} processes: choose a multiple of {world}"
        )
    return replace(cfg, batch_size=cfg.batch_size // world)


@torch.no_grad()
def mean_token_loss(model, rows: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token loss over every labelled token of ``rows`` (the same number for any process count)."""
    from lab.train.lora import collate

    model.eval()
    total, count = 0.0, 0
    pad = collate(pad_id)
    for i in range(0, len(rows), batch_size):
        batch = pad(rows[i : i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total, count = total + float(loss), count + int((labels != -100).sum())
    return total / count


def train(profile_name: str, cfg_json: str, out: Path, output_dir: Path) -> dict | None:
    """One data-parallel run of the config ``cfg_json`` (global batch); the main process writes ``out``."""
    from accelerate.utils import gather_object

    from lab.data.records import make_task, pad_token_id
    from lab.io import atomic_write_text
    from lab.models.loading import load_model
    from lab.profiles import activate, get_profile
    from lab.train.lora import FinetuneConfig, encode_examples, train_lora

    state = process_state()
    profile = activate(get_profile(profile_name))
    cfg = FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()})
    loaded = load_model(profile)
    res = train_lora(loaded, per_device(cfg, state.num_processes), output_dir, resume=False, progress=False, desc="dp")
    steps, evals, _ = res.log.frames()
    per_rank = gather_object([steps["loss"].to_list()])  # one list per process
    data = make_task(cfg.n_train, cfg.n_test, cfg.seed)
    train_rows = encode_examples(res.tokenizer, data.train)
    result = {
        "world": state.num_processes,
        "config": asdict(cfg),
        "per_device_batch": cfg.batch_size // state.num_processes,
        "steps": steps["step"].to_list(),
        "loss": [sum(col) / len(col) for col in zip(*per_rank, strict=True)],
        "grad_norm": steps["grad_norm"].to_list(),
        "lr": steps["lr"].to_list(),
        "eval_loss": evals["eval_loss"].to_list(),
        "final_train_loss": mean_token_loss(res.model, train_rows, pad_token_id(res.tokenizer)),
        "total_steps": res.total_steps,
    }
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_text(Path(out), json.dumps(result))
        return result
    return None


def cli(results_base: Path, argv: list[str]) -> int:
    """The ``lab`` command with this process's results root at ``results_base/rank<R>``."""
    rank = int(os.environ.get("RANK", "0"))
    os.environ["LAB_RESULTS_DIR"] = str(Path(results_base) / f"rank{rank}")
    process_state()
    from lab.cli import main

    return main(argv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.train.dp_check", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one data-parallel fine-tuning run; the main process writes --out")
    t.add_argument("--profile", default="smoke")
    t.add_argument("--config", required=True, help="FinetuneConfig fields as JSON (batch_size is the global batch)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--checkpoints", type=Path, required=True, help="the run's checkpoint folder")
    c = sub.add_parser("cli", help="the lab command, each process's results under RESULTS/rank<R>/")
    c.add_argument("results", type=Path)
    c.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "cli":
        return cli(args.results, [a for a in args.argv if a != "--"])
    train(args.profile, args.config, args.out, args.checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
