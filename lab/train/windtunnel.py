"""Training on the bijection wind tunnel: fresh sequences every step, the entropy MAE logged as it falls.

A finished run is cached (safetensors weights + Parquet log + JSON metadata) under a folder named after a hash
of everything that determines it (task, model, training config, seed), published whole with
:func:`lab.io.publish_dir`, so re-running the track re-uses it and only the analyses run again; ``fresh=True``
retrains.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lab.data.windtunnel import Batch, posterior_metrics, sample_batch, summarize, value_log_probs
from lab.errors import LabError
from lab.io import parquet_bytes, publish_dir
from lab.models.windtunnel import ModelSpec, build_model, n_params
from lab.paths import shown
from lab.state import damaged, load_safetensors, read_json, read_parquet
from lab.train.pretraining import autocast, training_forward
from lab.train.schedule import adamw, lr_at
from lab.validation import Problems

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one wind-tunnel run (AdamW, linear warmup then cosine decay, gradient clipping)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-3
    min_lr_frac: float = field(default=0.1, metadata={"help": "final LR as a fraction of lr"})
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_sequences: int = 2048
    eval_seed: int = 20_251_227  # one fixed evaluation set shared by every run, seed and model
    # the training forward pass: "bf16" autocast (fp32 weights, AdamW, loss and evaluation) or "fp32"; compiled with
    # torch.compile when `compile` (eager where compiling fails). On this 2-core CPU bf16 + compile steps a 2-layer
    # width-64 model ~2.1x faster than fp32 eager and a 6-layer width-128 one ~1.9x (one thread each; compiling
    # alone is slower at width 128); the first step pays ~20-35 s of compiling.
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        checks = Problems(self)
        for name in ("steps", "batch_size", "eval_every", "eval_sequences"):
            checks.integer(name)
        checks.integer("warmup", minimum=0)
        checks.integer("eval_seed", minimum=0)
        checks.number("lr", 0, open_low=True)
        checks.number("min_lr_frac", 0, 1)
        checks.number("weight_decay", 0)
        checks.number("beta2", 0, 1, open_high=True)
        checks.number("grad_clip", 0, open_low=True)
        if self.precision not in PRECISIONS:
            checks.add(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not isinstance(self.compile, bool):
            checks.add(f"compile must be True or False (got {self.compile!r})")
        checks.raise_if_any("bad wind-tunnel training config")

    def lr_at(self, step: int) -> float:
        """Linear warmup reaching ``lr`` on the last warmup step, then cosine decay to ``lr * min_lr_frac``."""
        return lr_at(
            step, lr=self.lr, min_lr=self.lr * self.min_lr_frac, warmup=self.warmup, total=self.steps, ramp=self.warmup
        )


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, 2V) logits from any wind-tunnel model (``lab.models.gpt.GPT`` returns a tuple)."""
    out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


def eval_batch(V: int, cfg: TrainConfig) -> Batch:
    """The fixed evaluation sequences (same for every run with the same V and eval seed)."""
    return sample_batch(V, cfg.eval_sequences, torch.Generator().manual_seed(cfg.eval_seed))


@torch.no_grad()
def evaluate(model: nn.Module, batch: Batch, chunk: int = 1024) -> dict[str, float]:
    """Entropy MAE (headline), KL to the posterior, the authors' MAE variant and mass on eliminated values."""
    was = model.training
    model.eval()
    logp = torch.cat(
        [
            value_log_probs(logits_of(model, batch.tokens[i : i + chunk]), batch.V)
            for i in range(0, batch.tokens.shape[0], chunk)
        ]
    )
    model.train(was)
    return summarize(posterior_metrics(logp, batch.values, batch.V))


@dataclass
class RunResult:
    """A trained model with its log (one row per evaluation) and how long training took."""

    name: str
    model: nn.Module
    log: pl.DataFrame
    n_params: int
    train_time_s: float
    cached: bool
    folder: Path


def run_key(V: int, spec: ModelSpec, cfg: TrainConfig, seed: int, match: int | None) -> str:
    """A short hash of everything that determines a run."""
    blob = json.dumps({"V": V, "spec": asdict(spec), "cfg": asdict(cfg), "seed": seed, "match": match}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_folder(
    ckpt_root: Path, name: str, V: int, spec: ModelSpec, cfg: TrainConfig, seed: int, match: int | None
) -> Path:
    """Where a run is cached: ``<ckpt_root>/<name>-<run_key>``."""
    return ckpt_root / f"{name}-{run_key(V, spec, cfg, seed, match)}"


def load_cached(
    name: str, folder: Path, model: nn.Module, on_eval: Callable[[dict], None] | None = None
) -> RunResult | None:
    """The finished run cached in ``folder``, its weights loaded into ``model``; None when there is none."""
    if not (folder / "meta.json").exists():
        return None
    fix = f"delete {shown(folder)} (the run is trained again) or pass --fresh"
    meta = read_json(folder / "meta.json", fix)
    if not isinstance(meta, dict) or "train_time_s" not in meta:
        raise damaged(folder / "meta.json", "it lacks train_time_s", fix)
    weights = load_safetensors(folder / "model.safetensors", fix)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is stored once, as the embedding
        raise LabError(f"{shown(folder)} does not fit this model ({missing + unexpected}): {fix}")
    log = read_parquet(folder / "log.parquet", fix)
    if on_eval is not None:
        for row in log.iter_rows(named=True):
            on_eval(row)
    return RunResult(name, model.eval(), log, n_params(model), meta["train_time_s"], True, folder)


def full_forward_keys(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The baseline's training forward: every position, then the key positions' logits (B, V-1, 2V)."""
    return logits_of(model, tokens)[:, 0::2]


def fit(
    name: str,
    model: nn.Module,
    V: int,
    cfg: TrainConfig,
    seed: int,
    *,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = full_forward_keys,
    device: str = "cpu",
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    sharers: Callable[[], int] | None = None,
    before_step: Callable[[], None] | None = None,
    bar_position: int = 0,
) -> tuple[pl.DataFrame, float]:
    """Train ``model`` in place on its own fresh batches (generator seeded ``10_000 + seed``) with its own AdamW,
    schedule and gradient clipping; returns (the log, seconds of training).

    Args:
        forward: ``forward(model, tokens)`` -> logits at the key positions (B, V-1, 2V).
        sharers: How many runs are training on this machine right now; each step's seconds are divided by it, so the
            ``train_s`` of runs trained together add up to the time they took together. None: 1.
        before_step: Called before every step (the ensemble stops its members through it).
        bar_position: The tqdm bar's line, for runs training side by side.
    """
    ev = eval_batch(V, cfg)
    if device != "cpu":
        ev = Batch(V, *(t.to(device) for t in (ev.tokens, ev.keys, ev.values, ev.targets)))
        model.to(device)
    gen = torch.Generator().manual_seed(10_000 + seed)
    step_forward = training_forward(partial(forward, model), cfg.compile)
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    rows: list[dict] = []
    losses: list[float] = []
    train_s = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=name, unit="step", leave=False, position=bar_position)

    def log_eval(step: int, grad_norm: float) -> None:
        row = {
            "step": step,
            "sequences": step * cfg.batch_size,
            "train_s": train_s,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "lr": cfg.lr_at(max(step - 1, 0)),
            "grad_norm": grad_norm,
            **evaluate(model, ev),
        }
        rows.append(row)
        losses.clear()
        if bar is not None:
            bar.set_postfix(mae=f"{row['mae_bits']:.4f}")
        if on_eval is not None:
            on_eval(row)

    grad_norm = float("nan")
    model.train()
    log_eval(0, grad_norm)
    for step in range(cfg.steps):
        if before_step is not None:
            before_step()
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        b = sample_batch(V, cfg.batch_size, gen)
        with autocast(cfg.precision, device):
            logits = step_forward(b.tokens.to(device))  # (B, V-1, 2V): predictions at key positions
        loss = F.cross_entropy(logits.float().reshape(-1, 2 * V), b.targets.to(device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        train_s += (time.perf_counter() - t0) / (1 if sharers is None else max(1, sharers()))
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log_eval(step + 1, grad_norm)
    if bar is not None:
        bar.close()
    model.eval().cpu()
    return pl.DataFrame(rows), train_s


def save_run(
    folder: Path,
    name: str,
    V: int,
    spec: ModelSpec,
    cfg: TrainConfig,
    seed: int,
    match: int | None,
    model: nn.Module,
    log: pl.DataFrame,
    train_s: float,
) -> RunResult:
    """Publish a finished run (weights, log, metadata) as ``folder``, whole or not at all."""
    meta = {
        "name": name,
        "V": V,
        "spec": asdict(spec),
        "cfg": asdict(cfg),
        "seed": seed,
        "match": match,
        "train_time_s": train_s,
        "n_params": n_params(model),
    }
    with publish_dir(folder) as work:  # the folder appears complete or not at all
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
            str(work / "model.safetensors"),
        )
        (work / "log.parquet").write_bytes(parquet_bytes(log))
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
    return RunResult(name, model, log, n_params(model), train_s, False, folder)


def train_run(
    name: str,
    V: int,
    spec: ModelSpec,
    cfg: TrainConfig,
    seed: int,
    ckpt_root: Path,
    *,
    match: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    device: str = "cpu",
) -> RunResult:
    """Train (or load the cached result of) one model on fresh wind-tunnel batches, one model at a time with the
    model's full forward (the baseline of ``lab.train.ensemble.train_runs``, and the notebook's path).

    Args:
        name: Label of the run (e.g. ``"transformer-s0"``); also the cache folder's prefix.
        V: Values per bijection (20 in the paper).
        spec: Model kind and size.
        cfg: Optimisation settings.
        seed: Seeds the initialisation and the training batches (the evaluation set is fixed by ``cfg``).
        ckpt_root: Folder holding the cache of finished runs.
        match: Parameter count the controls (MLP, LSTM) are sized to when ``spec.d_hidden`` is 0.
        fresh: Retrain even when a cached run exists.
        progress: Show a tqdm bar.
        on_eval: Called with each log row as it is produced (live charts).
        device: Where to train ("cpu" or "cuda"); the returned model is always on the CPU.
    """
    folder = run_folder(ckpt_root, name, V, spec, cfg, seed, match)
    torch.manual_seed(seed)
    model = build_model(spec, V, match=match)
    if not fresh and (cached := load_cached(name, folder, model, on_eval)) is not None:
        return cached
    log, train_s = fit(name, model, V, cfg, seed, device=device, progress=progress, on_eval=on_eval)
    return save_run(folder, name, V, spec, cfg, seed, match, model, log, train_s)
