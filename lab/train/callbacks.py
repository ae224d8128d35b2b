"""What a LoRA run records through transformers' ``Trainer`` callbacks: per-step loss, grad norm (pre-clip), LR,
tokens/s and peak memory; eval losses; Adam's moments per layer, module and LoRA matrix; checkpoints at fixed
fractions of training, a progress bar, and a test-only interrupt; the bf16 training step's autocast
(:mod:`lab.train.precision`)."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch

from lab.errors import LabError
from lab.io import atomic_write_text
from lab.paths import shown
from lab.state import check_trainer_checkpoint, damaged, read_json
from lab.train.precision import labelled_positions

LOG_FILE = "lab_log.json"  # our per-step logs, written into every checkpoint folder
CONFIG_FILE = "lab_config.json"  # the run's FinetuneConfig, beside its checkpoint-N folders


# ----------------------------------------------------------------------------- instrumentation


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class RunLog:
    """Everything a run logged; grows during training and is checkpointed with it."""

    steps: list[dict] = field(default_factory=list)  # step, loss, grad_norm, lr, tokens, tokens_per_s, peak_mem_mb
    evals: list[dict] = field(default_factory=list)  # step, eval_loss
    moments: list[dict] = field(default_factory=list)  # step, layer, module, matrix, statistics

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        return (
            pl.DataFrame(
                self.steps,
                schema={
                    "step": pl.Int64,
                    "epoch": pl.Float64,
                    "loss": pl.Float64,
                    "grad_norm": pl.Float64,
                    "lr": pl.Float64,
                    "tokens": pl.Int64,
                    "tokens_per_s": pl.Float64,
                    "peak_mem_mb": pl.Float64,
                },
            ),
            pl.DataFrame(self.evals, schema={"step": pl.Int64, "eval_loss": pl.Float64}),
            pl.DataFrame(self.moments, schema=MOMENT_SCHEMA),
        )

    def until(self, step: int) -> RunLog:
        return RunLog(
            [r for r in self.steps if r["step"] <= step],
            [r for r in self.evals if r["step"] <= step],
            [r for r in self.moments if r["step"] <= step],
        )


def latest_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N that :class:`SaveAtFractions` finished (our log is in it)."""
    done = [
        p
        for p in Path(folder).glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
        and (p / LOG_FILE).exists()
        and (p / "trainer_state.json").exists()
    ]
    return max(done, key=lambda p: int(p.name.removeprefix("checkpoint-"))) if done else None


def resume_point(output_dir: Path, cfg_json: str) -> tuple[Path | None, RunLog | None]:
    """(latest checkpoint, its log) of a run in ``output_dir`` made with the config ``cfg_json``, or (None, None).

    Another config's checkpoints, or a damaged file in the latest one (which ``Trainer`` would only read inside
    ``train()``), raise a :class:`LabError` naming the folder or file and the fix, before any compute.
    """
    output_dir = Path(output_dir)
    latest = latest_checkpoint(output_dir) if output_dir.exists() else None
    if latest is None:
        return None, None
    config_file = output_dir / CONFIG_FILE
    if not config_file.exists() or config_file.read_bytes() != cfg_json.encode():
        raise LabError(
            f"the checkpoints in {shown(output_dir)} were made with a different config: "
            f"delete that folder or pass fresh=True (--fresh) to start over"
        )
    fix = f"delete {shown(latest)} to resume from the checkpoint before it, or pass --fresh to start over"
    check_trainer_checkpoint(latest, fix)
    saved = read_json(latest / LOG_FILE, fix)
    if not (isinstance(saved, dict) and {"steps", "evals", "moments"} <= set(saved)):
        raise damaged(latest / LOG_FILE, "it lacks the steps, evals and moments logs", fix)
    return latest, RunLog(saved["steps"], saved["evals"], saved["moments"])


MOMENT_SCHEMA = {
    "step": pl.Int64,
    "layer": pl.Int64,
    "module": pl.Utf8,
    "matrix": pl.Utf8,
    "n": pl.Int64,
    "m_abs_mean": pl.Float64,
    "v_sqrt_mean": pl.Float64,
    "update_rms": pl.Float64,
}


def _lora_param_key(name: str) -> tuple[int, str, str] | None:
    """``...layers.3.self_attn.q_proj.lora_A.default.weight`` -> (3, "q_proj", "A")."""
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        matrix = "A" if "lora_A" in parts else "B"
        i = parts.index("lora_" + matrix)
        layer = next((int(p) for p in parts if p.isdigit()), -1)
        return layer, parts[i - 1], matrix
    return None


def moment_stats(model, optimizer, step: int) -> list[dict]:
    """Adam's moments per (layer, module, LoRA matrix): mean |m|, mean sqrt(v), and the RMS of the update
    direction m̂ / (sqrt(v̂) + eps) (bias-corrected; what Adam multiplies by the learning rate)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    hyper = {id(p): g for g in opt.param_groups for p in g["params"]}
    acc: dict[tuple[int, str, str], list[float]] = {}
    for name, p in model.named_parameters():
        key = _lora_param_key(name)
        state = opt.state.get(p)
        if key is None or not state or "exp_avg" not in state:
            continue
        g = hyper[id(p)]
        b1, b2 = g["betas"]
        t = float(state["step"])
        m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        upd = m_hat / (v_hat.sqrt() + g["eps"])
        a = acc.setdefault(key, [0, 0.0, 0.0, 0.0])
        a[0] += m.numel()
        a[1] += m.abs().sum().item()
        a[2] += v.sqrt().sum().item()
        a[3] += upd.pow(2).sum().item()
    return [
        {
            "step": step,
            "layer": k[0],
            "module": k[1],
            "matrix": k[2],
            "n": n,
            "m_abs_mean": s_m / n,
            "v_sqrt_mean": s_v / n,
            "update_rms": math.sqrt(s_u / n),
        }
        for k, (n, s_m, s_v, s_u) in sorted(acc.items())
    ]


def _trainer_classes():
    """Built lazily: importing transformers' Trainer takes seconds."""
    from transformers import Trainer, TrainerCallback

    class LabTrainer(Trainer):
        """``Trainer`` that also records each step's unrounded loss and token count. With ``lab_autocast`` set (the
        bf16 path, :mod:`lab.train.precision`) training forwards and backwards run under autocast (evaluations in
        fp32) and every loss is computed from the logits of the labelled positions only."""

        lab_autocast: torch.dtype | None = None

        def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
            if self.lab_autocast is not None and self.model.training:
                return torch.autocast(self.args.device.type, dtype=self.lab_autocast, cache_enabled=cache_enabled)
            return super().autocast_smart_context_manager(cache_enabled)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.lab_autocast is not None and "labels" in inputs:
                inputs = labelled_positions(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.lab_tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.lab_loss = float(loss)
            return loss

    class StepLogger(TrainerCallback):
        """Per-step train loss, grad norm (pre-clip), LR, tokens/s and peak memory; eval loss when evaluated."""

        def __init__(self, log: RunLog, trainer_ref: dict, on_step: Callable | None = None):
            self.log, self.ref, self.on_step = log, trainer_ref, on_step
            self.t0 = 0.0
            self.pending: dict | None = None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t0
            tr = self.ref["trainer"]
            self.pending = {
                "step": state.global_step,
                "epoch": float(state.epoch or 0.0),
                "loss": tr.lab_loss,
                "tokens": tr.lab_tokens,
                "tokens_per_s": tr.lab_tokens / dt,
                "peak_mem_mb": _peak_memory_mb(),
            }

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "grad_norm" in logs and self.pending is not None and self.pending["step"] == state.global_step:
                row = {**self.pending, "grad_norm": float(logs["grad_norm"]), "lr": float(logs["learning_rate"])}
                self.log.steps.append(row)
                self.pending = None
                if self.on_step is not None:
                    self.on_step(state.global_step, state.max_steps, self.log)

    class MomentLogger(TrainerCallback):
        """Snapshots of Adam's moments (after the optimizer step) at the given steps."""

        def __init__(self, log: RunLog, at_steps: set[int]):
            self.log, self.at = log, at_steps

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step in self.at and optimizer is not None:
                self.log.moments.extend(moment_stats(model, optimizer, state.global_step))

    class SaveAtFractions(TrainerCallback):
        """Checkpoint at the given steps (25/50/75/100 % of training), with our logs inside each checkpoint."""

        def __init__(self, log: RunLog, at_steps: set[int]):
            self.log, self.at = log, at_steps

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in self.at:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            data = {"steps": self.log.steps, "evals": self.log.evals, "moments": self.log.moments}
            atomic_write_text(folder / LOG_FILE, json.dumps(data))

    class Progress(TrainerCallback):
        """A tqdm bar with the latest loss (replaces Trainer's, which prints every log dict)."""

        def __init__(self, desc: str):
            self.desc, self.bar = desc, None

        def on_train_begin(self, args, state, control, **kw):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    class Interrupt(TrainerCallback):
        """Raise KeyboardInterrupt at the end of step ``step``, before that step is logged or saved (tests)."""

        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.step:
                raise KeyboardInterrupt(f"interrupted after step {self.step}")

    class EvalAt(TrainerCallback):
        """Evaluate at the given steps besides ``eval_steps`` (the last step), and record every eval loss."""

        def __init__(self, log: RunLog, at_steps: set[int]):
            self.log, self.at = log, at_steps

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in self.at:
                control.should_evaluate = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:
                self.log.evals.append({"step": state.global_step, "eval_loss": float(logs["eval_loss"])})

    return LabTrainer, StepLogger, MomentLogger, SaveAtFractions, Progress, Interrupt, EvalAt


def eval_first(ref: dict):
    """A callback that evaluates once when training begins, after ``Trainer`` has prepared (DDP-wrapped) the model.

    Not ``trainer.evaluate()`` before ``train()``: that prepares the model for inference only and marks it
    prepared, so ``train()`` would not wrap it in DDP and under ``accelerate launch`` every process would train
    alone on its shard of the data.
    """
    from transformers import TrainerCallback

    class EvalFirst(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ref["trainer"].evaluate()

    return EvalFirst()
