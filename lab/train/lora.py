"""LoRA / QLoRA fine-tuning through transformers' ``Trainer``, instrumented, checkpointed and resumable.

One function, :func:`train_lora`, fine-tunes a profile's model (SmolLM2-135M-Instruct on ``cpu``) on the
event-record task of :mod:`lab.data.records`. Because it is a plain ``Trainer`` run, the same script runs on
several GPUs with ``accelerate launch``. What it records, per optimisation step, into Parquet:

- train loss (unrounded), grad norm *before* clipping (what ``clip_grad_norm_`` returns), learning rate,
  tokens/s (non-padding tokens of the batch over the step's time), peak memory (CPU: the process's max RSS;
  CUDA: ``torch.cuda.max_memory_allocated``);
- eval loss on the held-out task examples at ``n_evals`` evenly spaced steps (and before the first step);
- Adam's first/second moments per layer, module and LoRA matrix (:class:`MomentLogger`).

The training step runs in bf16 autocast over fp32 weights by default, eval losses in fp32
(:mod:`lab.train.precision`); ``precision="fp32"`` is the all-fp32 reference path.

Checkpoints (the LoRA adapter as safetensors, optimizer, scheduler, RNG states, and our logs) are written at
25/50/75/100 % of training; a run that finds a checkpoint of the same config resumes from the latest one.
Bad hyper-parameters raise :class:`LabError` before any compute: when the :class:`FinetuneConfig` is made, or in
:func:`validate` for what needs the model and the data to check.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lab.data.records import Example, TaskData, encode_example, make_task, pad_token_id
from lab.errors import LabError
from lab.io import atomic_write_text, publish_dir
from lab.models.loading import LoadedModel, load_model
from lab.paths import shown
from lab.profiles import Profile
from lab.state import damaged
from lab.train.callbacks import CONFIG_FILE, RunLog, _trainer_classes, eval_first, resume_point
from lab.train.precision import PRECISIONS, autocast_dtype, nf4_compute_dtype, training_numerics
from lab.validation import Problems

# transformers' lr_scheduler_type names that need no lr_scheduler_kwargs (cosine_with_min_lr, warmup_stable_decay
# and reduce_lr_on_plateau need settings this config does not carry)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
ADAPTER_FILE = "adapter_model.safetensors"  # what peft's save_pretrained writes
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Defaults are the ``cpu`` profile's main run (SmolLM2-135M, 2 cores).

    Settings that can be checked without a model are checked here; :func:`validate` checks the rest (target
    modules and sequence lengths against the model, the dataset) before any compute.
    """

    lr: float = 2e-4  # peak learning rate (after warmup)
    rank: int = 8  # LoRA rank r
    alpha_per_rank: float = 2.0  # lora_alpha = alpha_per_rank * rank: the LoRA scale alpha/r is the same at every r
    dropout: float = 0.0  # LoRA dropout
    target_modules: tuple[str, ...] = ALL_LINEAR  # names of the linear layers that get adapters
    batch_size: int = 8  # examples per optimisation step (per device)
    epochs: int = 3
    max_seq_len: int = 96  # longest allowed example (prompt + answer) in tokens; longer ones are an error
    warmup_ratio: float = 0.1  # share of the steps with linear warmup
    scheduler: str = "cosine"  # transformers' lr_scheduler_type after warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    n_evals: int = 6  # eval-loss points after step 0, evenly spaced (and always at the last step)
    moments_every: int = 0  # Adam moment snapshot every n steps (0: at the eval points only)
    quant: str = "none"  # "none" or "nf4" (QLoRA: 4-bit NormalFloat base weights via bitsandbytes)
    n_train: int = 100  # generated training examples of the event-record task
    n_test: int = 30  # held-out examples (unseen names and cities)
    max_new_tokens: int = 40  # greedy answer length when scoring
    seed: int = 0  # task generation, LoRA initialisation, data order
    precision: str = "bf16"  # "bf16": autocast training step, fp32 weights and eval loss (lab.train.precision)

    def __post_init__(self) -> None:
        checks = Problems(self)
        checks.number("lr", 0, open_low=True, hint="; LoRA fine-tunes typically use 1e-4 to 1e-3")
        checks.integer("rank", hint="; try 8")
        checks.number("alpha_per_rank", 0, open_low=True, hint="; 2.0 gives lora_alpha = 2 * rank")
        checks.number("dropout", 0, 1, open_high=True)
        if not self.target_modules:
            checks.add("target_modules is empty: name the linear layers to adapt, e.g. ('q_proj', 'v_proj')")
        for name in ("batch_size", "epochs", "max_seq_len", "n_train", "max_new_tokens"):
            checks.integer(name)
        checks.integer(
            "n_test",
            hint=": the held-out examples score the run and give its eval loss "
            "(to train without evaluation, call train_lora(..., do_eval=False))",
        )
        for name in ("n_evals", "moments_every", "seed"):
            checks.integer(name, minimum=0)
        checks.number("warmup_ratio", 0, 1)
        checks.choice("scheduler", SCHEDULERS)
        checks.number("weight_decay", 0)
        checks.number(
            "max_grad_norm",
            0,
            open_low=True,
            hint=": the step log records the gradient norm that clipping measures; 1.0 is the usual value",
        )
        checks.choice("quant", ("none", "nf4"))
        checks.choice("precision", PRECISIONS, hint=': "fp32" is the slower reference path')
        checks.raise_if_any("bad fine-tuning config")


# ----------------------------------------------------------------------------- validation and model set-up


def _module_names(model) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")
    }


def encode_examples(tokenizer, examples: tuple[Example, ...] | list[Example]) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, ex) for ex in examples]


def validate(cfg: FinetuneConfig, model, train: list[dict], evals: list[dict]) -> None:
    """Every mistake in ``cfg`` that needs the model or the data to see (the rest :class:`FinetuneConfig` checks
    itself), as one :class:`LabError` listing all of them with fixes, before training."""
    problems = []
    known = _module_names(model)
    unknown = [m for m in cfg.target_modules if m not in known]
    if unknown:
        problems.append(f"unknown target module(s) {unknown}: this model's linear layers are {sorted(known)}")
    if not train:
        problems.append("the training dataset is empty: set n_train > 0")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_pos is not None and cfg.max_seq_len > max_pos:
        problems.append(
            f"max_seq_len {cfg.max_seq_len} is longer than the model allows ({max_pos} positions): "
            f"lower it to at most {max_pos}"
        )
    longest = max((len(e["input_ids"]) for e in train + evals), default=0)
    if longest > cfg.max_seq_len:
        problems.append(
            f"an example has {longest} tokens, more than max_seq_len {cfg.max_seq_len}: raise "
            f"max_seq_len (up to the model's {max_pos} positions) or shorten the examples"
        )
    if problems:
        raise LabError("bad fine-tuning setup: " + "; ".join(problems))


def quantize_nf4(
    loaded: LoadedModel, folder: Path | None = None, compute_dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """The same model with its linear layers in 4-bit NormalFloat (bitsandbytes ``Linear4bit``), computing in
    ``compute_dtype``.

    Goes through ``save_pretrained`` + ``from_pretrained(quantization_config=...)``, the standard QLoRA path.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        device_map = "auto" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=q, device_map=device_map, dtype=torch.float32
        )
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

    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha_per_rank * cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_loaded_in_4bit", False):
        model.config.use_cache = False
        if torch.cuda.is_available():
            try:
                from unsloth import FastLanguageModel  # CUDA only (the gpu profile)

                return FastLanguageModel.get_peft_model(
                    model,
                    r=cfg.rank,
                    lora_alpha=cfg.alpha_per_rank * cfg.rank,
                    lora_dropout=cfg.dropout,
                    target_modules=list(cfg.target_modules),
                    bias="none",
                    random_state=cfg.seed,
                )
            except ImportError:
                pass
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


def schedule_steps(n_train: int, cfg: FinetuneConfig, world: int = 1) -> tuple[int, set[int], int, set[int]]:
    """(total steps, checkpoint steps at 25/50/75/100 %, eval interval, moment-snapshot steps) with ``world``
    processes each taking every ``world``-th batch of ``cfg.batch_size`` examples (accelerate's sharding)."""
    total = math.ceil(math.ceil(n_train / cfg.batch_size) / world) * cfg.epochs
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
    if do_eval and not eval_rows:
        raise LabError("no held-out rows to evaluate on: pass some, or train_lora(..., do_eval=False)")
    output_dir = Path(output_dir)
    cfg_json = json.dumps(asdict(cfg), sort_keys=True)
    latest, saved_log = resume_point(output_dir, cfg_json) if resume else (None, None)
    from accelerate import PartialState

    # cpu=True: on a CPU-only torchrun process a bare PartialState() is non-distributed (every rank "main")
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:  # under `accelerate launch`, one process prepares the folder
        if latest is None and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / CONFIG_FILE, cfg_json)
    state.wait_for_everyone()

    quantize = cfg.quant == "nf4" and not getattr(loaded.model, "is_loaded_in_4bit", False)
    base = quantize_nf4(loaded, output_dir, nf4_compute_dtype(cfg.precision)) if quantize else loaded
    model = attach_lora(base.model, cfg)
    total, save_at, eval_every, moments_at = schedule_steps(len(train_rows), cfg, state.num_processes)
    log = saved_log if saved_log is not None else RunLog()

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
        prediction_loss_only=cfg.precision == "bf16",  # evaluations keep the loss only, not every logit
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
    if do_eval and latest is None:  # eval loss before the first step (EvalAt records it as step 0)
        callbacks.append(eval_first(ref))
    trainer = LabTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,  # a list is a map-style dataset
        eval_dataset=eval_rows if do_eval else None,
        data_collator=collate(pad_token_id(tok)),
        callbacks=callbacks,
    )
    ref["trainer"] = trainer
    trainer.lab_autocast = autocast_dtype(cfg.precision)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    with training_numerics(model, cfg.precision):
        t_train = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)
        trainer_time = time.perf_counter() - t_train
    model.eval()
    return FinetuneResult(
        model=model,
        tokenizer=tok,
        log=log,
        config=cfg,
        trainable_params=trainable_parameters(model),
        total_params=sum(p.numel() for p in model.parameters()),
        total_steps=total,
        wall_time_s=time.perf_counter() - t_start,
        trainer_time_s=trainer_time,
        resumed_from=int(latest.name.split("-")[1]) if latest is not None else None,
        output_dir=output_dir,
    )


def save_adapter(model, folder: Path) -> Path:
    """``save_pretrained`` of the LoRA adapter (adapter_model.safetensors + adapter_config.json), atomically."""
    folder = Path(folder)
    with publish_dir(folder) as work:
        model.save_pretrained(work, safe_serialization=True)
    return folder


def load_adapter(loaded: LoadedModel, folder: Path):
    """Base model + a saved adapter, via ``PeftModel.from_pretrained``, in eval mode."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").exists():
        raise LabError(
            f"no LoRA adapter in {folder} (its adapter_config.json is missing): train and save one "
            f"there first (with save_adapter; `lab run <track>` does it for the track that owns the folder)"
        )
    try:
        model = PeftModel.from_pretrained(loaded.model, str(folder))
    except (SafetensorError, json.JSONDecodeError) as e:
        fix = f"delete {shown(folder)} and train it again (`lab run <track>` for the track that owns the folder)"
        bad = "adapter_config.json" if isinstance(e, json.JSONDecodeError) else ADAPTER_FILE
        raise damaged(Path(folder) / bad, e, fix) from None
    model.eval()
    return model


def fresh_base(profile: Profile, arch: str | None = None) -> LoadedModel:
    """A new copy of a profile's base model (LoRA injection modifies modules in place)."""
    return load_model(profile, arch=arch)
