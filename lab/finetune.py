"""LoRA / QLoRA fine-tuning through transformers' ``Trainer``, instrumented, checkpointed and resumable.

One function, :func:`train_lora`, fine-tunes a profile's model (SmolLM2-135M-Instruct on ``cpu``) on the
event-record task of :mod:`lab.finetune_data`. Because it is a plain ``Trainer`` run, the same script runs on
several GPUs with ``accelerate launch``. What it records, per optimisation step, into Parquet:

- train loss (unrounded), grad norm *before* clipping (what ``clip_grad_norm_`` returns), learning rate,
  tokens/s (non-padding tokens of the batch over the step's time), peak memory (CPU: the process's max RSS;
  CUDA: ``torch.cuda.max_memory_allocated``);
- eval loss on the held-out task examples at ``n_evals`` evenly spaced steps (and before the first step);
- Adam's first/second moments per layer, module and LoRA matrix (:class:`MomentLogger`).

Checkpoints (the LoRA adapter as safetensors, optimizer, scheduler, RNG states, and our logs) are written at
25/50/75/100 % of training; a run that finds a checkpoint of the same config resumes from the latest one.
Bad hyper-parameters raise :class:`LabError` in :func:`validate` before any compute.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl
import torch

from lab.errors import LabError
from lab.finetune_data import (Example, TaskData, chat_text, encode_example, end_token_id, make_task, pad_token_id,
                               score_answer, wilson_interval)
from lab.models import DATA_DIR, LoadedModel, load_model
from lab.profiles import Profile, get_profile
from lab.results import atomic_write_bytes, atomic_write_text

TRACK = "A_finetuning"
LOG_FILE = "lab_log.json"  # our per-step logs, written into every checkpoint folder
CONFIG_FILE = "lab_config.json"
PPL_WINDOW, PPL_WINDOWS = 128, 16  # general-text perplexity: the first 16 windows of 128 tokens
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults are the ``cpu`` profile's main run (SmolLM2-135M, 2 cores)."""

    lr: float = 2e-4
    rank: int = 8
    alpha_per_rank: float = 2.0  # lora_alpha = alpha_per_rank * rank, so the LoRA scale alpha/r is the same at every rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    batch_size: int = 8
    epochs: int = 3
    max_seq_len: int = 96  # longest allowed example (prompt + answer) in tokens; longer ones are an error
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    n_evals: int = 6  # eval-loss points after step 0, evenly spaced (and always at the last step)
    moments_every: int = 0  # Adam moment snapshot every n steps (0: at the eval points only)
    quant: str = "none"  # "none" or "nf4" (QLoRA: 4-bit NormalFloat base weights via bitsandbytes)
    n_train: int = 100
    n_test: int = 30
    max_new_tokens: int = 40
    seed: int = 0


# Per-profile defaults (overrides via dataclasses.replace).
CONFIGS: dict[str, FinetuneConfig] = {
    "smoke": FinetuneConfig(lr=2e-3, rank=4, batch_size=4, epochs=2, n_train=16, n_test=6, n_evals=4, max_seq_len=160,
                            max_new_tokens=12),
    "cpu": FinetuneConfig(),
    "gpu": FinetuneConfig(rank=16, batch_size=16, n_train=400, n_test=100, max_seq_len=160, quant="nf4"),
}


def finetune_config(profile: str | Profile | None = None) -> FinetuneConfig:
    """The default fine-tuning config of a profile."""
    return CONFIGS[get_profile(profile).name]


def final_adapter_dir(profile: str | Profile | None = None) -> Path:
    """Where the track's main run saves its final LoRA adapter (other tracks load it from here)."""
    return DATA_DIR / "adapters" / get_profile(profile).name / TRACK / "main"


# ----------------------------------------------------------------------------- validation and model set-up


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
            or type(mod).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")}


def encode_examples(tokenizer, examples: tuple[Example, ...] | list[Example]) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, ex) for ex in examples]


def validate(cfg: FinetuneConfig, model, train: list[dict], evals: list[dict]) -> None:
    """Every mistake we can see before training, as one :class:`LabError` listing all of them with fixes."""
    problems = []
    if not cfg.lr > 0:
        problems.append(f"lr must be > 0 (got {cfg.lr}); LoRA fine-tunes typically use 1e-4 to 1e-3")
    if not (isinstance(cfg.rank, int) and cfg.rank > 0):
        problems.append(f"rank must be a positive integer (got {cfg.rank}); try 8")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        problems.append(f"batch_size and epochs must be >= 1 (got {cfg.batch_size}, {cfg.epochs})")
    if cfg.quant not in ("none", "nf4"):
        problems.append(f"quant must be 'none' or 'nf4' (got {cfg.quant!r})")
    if not cfg.target_modules:
        problems.append("target_modules is empty: name the linear layers to adapt, e.g. ('q_proj', 'v_proj')")
    known = _module_names(model)
    unknown = [m for m in cfg.target_modules if m not in known]
    if unknown:
        problems.append(f"unknown target module(s) {unknown}: this model's linear layers are {sorted(known)}")
    if not train:
        problems.append("the training dataset is empty: set n_train > 0")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos is not None and cfg.max_seq_len > max_pos:
        problems.append(f"max_seq_len {cfg.max_seq_len} is longer than the model allows ({max_pos} positions): "
                        f"lower it to at most {max_pos}")
    longest = max((len(e["input_ids"]) for e in train + evals), default=0)
    if longest > cfg.max_seq_len:
        problems.append(f"an example has {longest} tokens, more than max_seq_len {cfg.max_seq_len}: raise "
                        f"max_seq_len (up to the model's {max_pos} positions) or shorten the examples")
    if problems:
        raise LabError("bad fine-tuning setup: " + "; ".join(problems))


def quantize_nf4(loaded: LoadedModel, folder: Path | None = None) -> LoadedModel:
    """The same model with its linear layers in 4-bit NormalFloat (bitsandbytes ``Linear4bit``), compute in fp32.

    Goes through ``save_pretrained`` + ``from_pretrained(quantization_config=...)``, the standard QLoRA path.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        device_map = "auto" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map=device_map,
                                                     dtype=torch.float32)
    model.config._name_or_path = loaded.model.config._name_or_path  # not the deleted temporary folder
    # bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight for a faster kernel on its first
    # no-grad forward in eval mode (an evaluation); later training forwards then run through `gemv_4bit`, which
    # has no autograd kernel, and the LoRA gradients come out silently wrong (the loss diverges). Keep the
    # weights in the standard layout so backward dequantizes them correctly (tests/test_finetune.py checks it).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=loaded.name + " (nf4)", arch=loaded.arch)


def attach_lora(model, cfg: FinetuneConfig):
    """Wrap ``model`` in a peft LoRA adapter (B = 0 at initialisation, so the output is unchanged)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha_per_rank * cfg.rank, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    if getattr(model, "is_loaded_in_4bit", False):
        model.config.use_cache = False
        if torch.cuda.is_available():
            try:
                from unsloth import FastLanguageModel  # CUDA only (the gpu profile)

                return FastLanguageModel.get_peft_model(
                    model, r=cfg.rank, lora_alpha=cfg.alpha_per_rank * cfg.rank, lora_dropout=cfg.dropout,
                    target_modules=list(cfg.target_modules), bias="none", random_state=cfg.seed)
            except ImportError:
                pass
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
            pl.DataFrame(self.steps, schema={"step": pl.Int64, "epoch": pl.Float64, "loss": pl.Float64,
                                             "grad_norm": pl.Float64, "lr": pl.Float64, "tokens": pl.Int64,
                                             "tokens_per_s": pl.Float64, "peak_mem_mb": pl.Float64}),
            pl.DataFrame(self.evals, schema={"step": pl.Int64, "eval_loss": pl.Float64}),
            pl.DataFrame(self.moments, schema=MOMENT_SCHEMA),
        )

    def until(self, step: int) -> "RunLog":
        return RunLog([r for r in self.steps if r["step"] <= step], [r for r in self.evals if r["step"] <= step],
                      [r for r in self.moments if r["step"] <= step])


MOMENT_SCHEMA = {"step": pl.Int64, "layer": pl.Int64, "module": pl.Utf8, "matrix": pl.Utf8, "n": pl.Int64,
                 "m_abs_mean": pl.Float64, "v_sqrt_mean": pl.Float64, "update_rms": pl.Float64}


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
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        upd = m_hat / (v_hat.sqrt() + g["eps"])
        a = acc.setdefault(key, [0, 0.0, 0.0, 0.0])
        a[0] += m.numel()
        a[1] += m.abs().sum().item()
        a[2] += v.sqrt().sum().item()
        a[3] += upd.pow(2).sum().item()
    return [{"step": step, "layer": k[0], "module": k[1], "matrix": k[2], "n": n, "m_abs_mean": s_m / n,
             "v_sqrt_mean": s_v / n, "update_rms": math.sqrt(s_u / n)} for k, (n, s_m, s_v, s_u) in sorted(acc.items())]


def _trainer_classes():
    """Built lazily: importing transformers' Trainer takes seconds."""
    from transformers import Trainer, TrainerCallback

    class LabTrainer(Trainer):
        """``Trainer`` that also records each step's unrounded loss and token count."""

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
            self.pending = {"step": state.global_step, "epoch": float(state.epoch or 0.0), "loss": tr.lab_loss,
                            "tokens": tr.lab_tokens, "tokens_per_s": tr.lab_tokens / dt,
                            "peak_mem_mb": _peak_memory_mb()}

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


def collate(pad_id: int):
    """Right-pad a list of encoded examples to the batch's longest; labels -100 and attention 0 on padding."""

    def fn(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def schedule_steps(n_train: int, cfg: FinetuneConfig) -> tuple[int, set[int], int, set[int]]:
    """(total steps, checkpoint steps at 25/50/75/100 %, eval interval, moment-snapshot steps)."""
    total = math.ceil(n_train / cfg.batch_size) * cfg.epochs
    saves = {max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}
    eval_every = max(1, math.ceil(total / max(1, cfg.n_evals)))
    every = cfg.moments_every or eval_every
    return total, saves, eval_every, set(range(every, total + 1, every)) | {1, total}


@dataclass
class FinetuneResult:
    model: Any  # the PeftModel after training
    tokenizer: Any
    log: RunLog
    config: FinetuneConfig
    trainable_params: int
    total_params: int
    total_steps: int
    wall_time_s: float  # this process's time in train_lora (set-up, training, evaluations)
    trainer_time_s: float  # this process's time inside Trainer.train (steps, logging, evals, checkpoints)
    resumed_from: int | None
    output_dir: Path


def _latest_checkpoint(folder: Path) -> Path | None:
    cks = [p for p in folder.glob("checkpoint-*") if (p / LOG_FILE).exists() and (p / "trainer_state.json").exists()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def train_lora(
    loaded: LoadedModel,
    cfg: FinetuneConfig,
    output_dir: Path,
    *,
    data: TaskData | None = None,
    rows: tuple[list[dict], list[dict]] | None = None,
    resume: bool = True,
    instrument: bool = True,
    do_eval: bool = True,
    save: bool = True,
    progress: bool = True,
    on_step: Callable[[int, int, RunLog], None] | None = None,
    interrupt_after: int | None = None,
    desc: str = "fine-tune",
) -> FinetuneResult:
    """Fine-tune ``loaded.model`` with LoRA (QLoRA when ``cfg.quant == "nf4"``) through ``Trainer``.

    Args:
        loaded: Base model and tokenizer (not modified when ``cfg.quant == "nf4"``; otherwise LoRA layers
            are injected into it in place, so pass a fresh copy per run).
        cfg: Hyper-parameters; validated before anything runs.
        output_dir: Checkpoint folder; holds ``checkpoint-N/`` at 25/50/75/100 % of training.
        data: Task examples (default: ``make_task(cfg.n_train, cfg.n_test, cfg.seed)``).
        rows: Already encoded (train, eval) rows, each ``{"input_ids", "labels"}`` (labels -100 where no loss),
            for corpora other than the JSON task; replaces ``data``.
        resume: Continue from the latest checkpoint in ``output_dir`` if its config matches (else start over).
        instrument: Per-step logs and Adam-moment snapshots (False: the bare Trainer, for the overhead benchmark).
        do_eval: Eval loss at ``cfg.n_evals`` points and before the first step.
        save: Checkpoints at 25/50/75/100 % (False: none, for the overhead benchmark).
        progress: tqdm bar.
        on_step: Called after each logged step with (step, total steps, log so far).
        interrupt_after: Raise KeyboardInterrupt after this step (tests of resuming).
        desc: Progress-bar label.
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    t_start = time.perf_counter()
    tok = loaded.tokenizer
    if rows is not None:
        train_rows, eval_rows = list(rows[0]), list(rows[1])
    else:
        data = data if data is not None else make_task(cfg.n_train, cfg.n_test, cfg.seed)
        train_rows, eval_rows = encode_examples(tok, data.train), encode_examples(tok, data.test)
    validate(cfg, loaded.model, train_rows, eval_rows)  # before any compute
    output_dir = Path(output_dir)
    cfg_json = json.dumps(asdict(cfg), sort_keys=True)
    latest = _latest_checkpoint(output_dir) if resume and output_dir.exists() else None
    if latest is not None and (output_dir / CONFIG_FILE).read_text() != cfg_json:
        raise LabError(f"the checkpoints in {output_dir} were made with a different config: "
                       f"delete that folder or pass fresh=True (--fresh) to start over")
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one process prepares the folder
        if latest is None and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / CONFIG_FILE, cfg_json)
    PartialState().wait_for_everyone()

    quantize = cfg.quant == "nf4" and not getattr(loaded.model, "is_loaded_in_4bit", False)
    base = quantize_nf4(loaded, output_dir) if quantize else loaded
    model = attach_lora(base.model, cfg)
    total, save_at, eval_every, moments_at = schedule_steps(len(train_rows), cfg)
    log = RunLog()
    if latest is not None:
        saved = json.loads((latest / LOG_FILE).read_text())
        log = RunLog(saved["steps"], saved["evals"], saved["moments"])

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 16),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        logging_strategy="steps" if instrument else "no",
        logging_steps=1,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=eval_every,  # EvalAt adds the last step
        save_strategy="no",  # SaveAtFractions checkpoints at 25/50/75/100 %
        save_safetensors=True,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    LabTrainer, StepLogger, MomentLogger, SaveAtFractions, Progress, Interrupt, EvalAt = _trainer_classes()
    ref: dict = {}
    callbacks: list = [SaveAtFractions(log, save_at)] if save else []
    if do_eval:
        callbacks.append(EvalAt(log, {total}))
    if instrument:
        callbacks += [StepLogger(log, ref, on_step), MomentLogger(log, moments_at)]
    if progress:
        callbacks.append(Progress(desc))
    if interrupt_after is not None:
        callbacks.append(Interrupt(interrupt_after))
    trainer = LabTrainer(model=model, args=args, train_dataset=_Rows(train_rows),
                         eval_dataset=_Rows(eval_rows) if do_eval else None,
                         data_collator=collate(pad_token_id(tok)), callbacks=callbacks)
    ref["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if do_eval and latest is None:
        trainer.evaluate()  # eval loss before the first step (EvalAt records it as step 0)
    t_train = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)
    trainer_time = time.perf_counter() - t_train
    model.eval()
    return FinetuneResult(
        model=model, tokenizer=tok, log=log, config=cfg, trainable_params=trainable_parameters(model),
        total_params=sum(p.numel() for p in model.parameters()), total_steps=total,
        wall_time_s=time.perf_counter() - t_start, trainer_time_s=trainer_time,
        resumed_from=int(latest.name.split("-")[1]) if latest is not None else None, output_dir=output_dir)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding; decoding stops at the end-of-turn token."""
    end, pad = end_token_id(tokenizer), pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:]:
            row = row.tolist()
            if end in row:
                row = row[:row.index(end)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def task_success(model, tokenizer, test: tuple[Example, ...], max_new_tokens: int) -> pl.DataFrame:
    """One row per test prompt: the greedy answer and its structural scores."""
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in test], max_new_tokens)
    rows = []
    for ex, ans in zip(test, answers):
        ok, exact = score_answer(ans, ex.fields)
        rows.append({"prompt": ex.prompt, "answer": ans, "format_ok": ok, "exact": exact})
    return pl.DataFrame(rows, schema={"prompt": pl.Utf8, "answer": pl.Utf8, "format_ok": pl.Boolean,
                                      "exact": pl.Boolean})


def rate_with_ci(flags: pl.Series) -> dict[str, float]:
    """Rate of True and its Wilson 95 % interval."""
    k, n = int(flags.sum()), flags.len()
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else 0.0, "lo": lo, "hi": hi, "k": k, "n": n}


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = PPL_WINDOW, n_windows: int = PPL_WINDOWS,
               batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over the first ``n_windows`` non-overlapping ``window``-token spans."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: window * n_windows]
    n = len(ids) // window
    if n == 0:
        raise LabError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    x = torch.tensor(ids[: n * window], device=device).view(n, window)  # (N, W)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size]
        logits = model(input_ids=xb).logits[:, :-1].float()  # (B, W-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += xb[:, 1:].numel()
    return math.exp(total / count)


def probe_retention(model, tokenizer, probes: tuple[tuple[str, str], ...], max_new_tokens: int = 32) -> pl.DataFrame:
    """Greedy answer to each probe and whether it is identical to the base model's (correct) answer."""
    answers = greedy_answers(model, tokenizer, [p for p, _ in probes], max_new_tokens)
    return pl.DataFrame({"prompt": [p for p, _ in probes], "expected": [a for _, a in probes], "answer": answers,
                         "retained": [a.strip() == e for a, (_, e) in zip(answers, probes)]})


def general_text(profile: Profile, chars: int = 40_000) -> tuple[str, str]:
    """(name, text) for the forgetting perplexity: held-out Shakespeare works (cpu/gpu) or the smoke text."""
    from lab.corpus import load_corpus

    corpus = load_corpus(profile)
    return f"{corpus.name} held-out: {', '.join(corpus.val_works)}", corpus.val_text[:chars]


def save_adapter(model, folder: Path) -> Path:
    """``save_pretrained`` of the LoRA adapter (adapter_model.safetensors + adapter_config.json), atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_adapter(loaded: LoadedModel, folder: Path):
    """Base model + a saved adapter, via ``PeftModel.from_pretrained``, in eval mode."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").exists():
        raise LabError(f"no LoRA adapter in {folder}: run `lab run {TRACK}` first (it saves the main adapter there)")
    model = PeftModel.from_pretrained(loaded.model, str(folder))
    model.eval()
    return model


def fresh_base(profile: str | Profile | None, arch: str | None = None) -> LoadedModel:
    """A new copy of a profile's base model (LoRA injection modifies modules in place)."""
    return load_model(profile, arch=arch)
