"""Character-level GPT pretraining with checkpoints that resume to the same numbers as an uninterrupted run.

Everything random is driven by seeded generators whose states are checkpointed: batch sampling, dropout
(torch's global RNG) and text samples. A checkpoint is one safetensors file holding the model, AdamW's
moments and the RNG states, written atomically; logs up to the checkpoint are written beside it as Parquet.

The training step (:class:`TrainStep`) is nanoGPT's: the forward pass under bf16 autocast (``precision="bf16"``,
the default; float32 master weights, loss and, on cpu, attention kernel) and
compiled with ``torch.compile`` when ``compile`` is set (eager, with a warning, where compiling fails), backward,
global-norm clipping, fused AdamW.
``precision="fp32", compile=False`` is the plain float32 eager step. Evaluation and text samples always run the
eager model in float32: the headline losses do not depend on the training path's number format.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save

from lab.data.corpus import Corpus
from lab.errors import LabError
from lab.io import atomic_write_bytes, parquet_bytes
from lab.models.gpt import GPT, GPTConfig
from lab.models.tokenizer import CharTokenizer
from lab.paths import shown
from lab.state import load_safetensors, read_parquet, safetensors_metadata
from lab.train.schedule import adamw, lr_at
from lab.validation import Problems

CKPT = "ckpt.safetensors"
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class PretrainConfig:
    """One character-level GPT pretraining run. Defaults are nanoGPT's CPU recipe for Shakespeare
    (``config/train_shakespeare_char.py`` with its README's CPU overrides), with rotary position embeddings and the
    training forward pass in bf16 autocast (nanoGPT's GPU setting; its CPU run is float32: ``precision="fp32"``)."""

    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide d_model
    d_model: int = 128  # residual-stream width
    block_size: int = 64  # context length in characters
    dropout: float = 0.0  # in [0, 1)
    pos_emb: str = "rope"  # "rope" (rotary, on q and k) or "learned" (nanoGPT's absolute embeddings)
    # optimisation
    batch_size: int = 12  # sequences per step
    max_iters: int = 2000  # optimisation steps
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # cosine floor at max_iters
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW, on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm
    # evaluation, checkpoints, samples
    eval_interval: int = 250  # steps between train/val loss estimates (and one at step 0)
    eval_iters: int = 50  # batches per estimate
    final_eval_iters: int = 200  # batches for the estimate at max_iters (the headline number)
    checkpoint_interval: int = 500  # steps between checkpoints (and one at max_iters); a text sample at each
    sample_chars: int = 300  # characters per text sample
    compile: bool = False  # torch.compile the training forward pass (eager where compiling fails)
    # number format of the training forward pass: "bf16" (autocast; fp32 weights, AdamW and loss) or "fp32". On
    # this 2-core CPU (avx512_bf16, no AMX), bf16 + compile is ~1.7x the fp32 eager step at the CPU recipe, and after
    # 2000 steps val loss is 1.8324 vs fp32's 1.8309 (another seed moves it by 0.011); tests/test_speed_pretrain.py.
    precision: str = "bf16"
    seed: int = 1337  # model init, batch sampling, dropout and samples

    def __post_init__(self) -> None:
        checks = Problems(self)
        for name in (
            "n_layer",
            "n_head",
            "d_model",
            "block_size",
            "batch_size",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "final_eval_iters",
            "checkpoint_interval",
        ):
            checks.integer(name)
        for name in ("warmup_iters", "sample_chars", "seed"):
            checks.integer(name, minimum=0)
        if isinstance(self.n_head, int) and self.n_head >= 1 and isinstance(self.d_model, int):
            if self.d_model % self.n_head:
                checks.add(f"n_head {self.n_head} must divide d_model {self.d_model}: change one of them")
        checks.choice("pos_emb", ("learned", "rope"))
        checks.choice("precision", PRECISIONS, hint="; fp32 is the plain float32 step")
        if not isinstance(self.compile, bool):
            checks.add(f"compile must be True or False (got {self.compile!r})")
        if checks.number("lr", 0, open_low=True, hint="; nanoGPT's character models use 1e-3"):
            checks.number("min_lr", 0, self.lr, hint=f" with lr {self.lr}; nanoGPT uses lr / 10")
        checks.number("dropout", 0, 1, open_high=True)
        checks.number("weight_decay", 0)
        checks.number("beta1", 0, 1, open_high=True)
        checks.number("beta2", 0, 1, open_high=True)
        checks.number("grad_clip", 0, open_low=True, hint="; nanoGPT uses 1.0")
        checks.raise_if_any("bad pretraining config")

    def lr_at(self, step: int) -> float:
        """nanoGPT's schedule: linear warmup, then cosine decay from ``lr`` to ``min_lr`` at ``max_iters``."""
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup_iters, total=self.max_iters)


def gpt_config(cfg: PretrainConfig, vocab_size: int) -> GPTConfig:
    """The model shape a pretraining config describes."""
    return GPTConfig(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout, cfg.pos_emb)


def get_batch(data: torch.Tensor, block: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``: x (B, T) and the next-character targets y (B, T)."""
    ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
    win = data[ix[:, None] + torch.arange(block + 1)]  # (B, T+1), one gather instead of 2B slices
    return win[:, :-1], win[:, 1:]


def training_forward(model: Callable, compile: bool) -> Callable:
    """The callable the training step runs: ``torch.compile(model)`` when ``compile`` (falling back to ``model``
    itself, with a warning, if the first call fails to compile: no C++ compiler, an unsupported platform), else
    ``model`` (a module or any function of tensors). Hook points keep working on ``model``; compile is for training
    only. (torch._dynamo's ``suppress_errors`` does the same fallback, but for every compiled function in the
    process.)"""
    if not compile:
        return model
    compiled = torch.compile(model)
    state = {"fn": None}

    def forward(*args):
        if state["fn"] is not None:
            return state["fn"](*args)
        try:
            out = compiled(*args)
        except Exception as e:  # dynamo/inductor raise many types; the eager model is always a correct fallback
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                f"training eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            state["fn"] = model
            return model(*args)
        state["fn"] = compiled
        return out

    return forward


def autocast(precision: str, device: str):
    """The context of a training forward pass in ``precision`` on ``device``."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


class TrainStep:
    """One optimisation step of ``cfg``'s recipe on ``model``: forward (in ``cfg.precision``, compiled when
    ``cfg.compile``), backward, clip to ``cfg.grad_clip``, AdamW. ``step(x, y, lr)`` returns (loss, grad norm)."""

    def __init__(self, cfg: PretrainConfig, model: GPT, opt: torch.optim.Optimizer, device: str = "cpu"):
        self.cfg, self.model, self.opt, self.device = cfg, model, opt, device
        self.forward = training_forward(model, cfg.compile)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, float]:
        for g in self.opt.param_groups:
            g["lr"] = lr
        with autocast(self.cfg.precision, self.device):
            _, loss, _ = self.forward(x.to(self.device), y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip).item()
        self.opt.step()
        return loss.item(), grad_norm


def new_training(cfg: PretrainConfig, vocab_size: int, device: str = "cpu") -> TrainStep:
    """A freshly initialised model (seeded by ``cfg.seed``) and its fused AdamW, as one :class:`TrainStep`."""
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg, vocab_size)).to(device)
    opt = adamw(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, fused=True)
    return TrainStep(cfg, model, opt, device)


@torch.no_grad()
def estimate_loss(model: GPT, data: torch.Tensor, cfg: PretrainConfig, iters: int, seed: int) -> float:
    """Mean loss over ``iters`` batches drawn with a fixed seed (the same batches at every evaluation)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [model(*get_batch(data, cfg.block_size, cfg.batch_size, gen))[1].item() for _ in range(iters)]
    model.train(was_training)
    return sum(losses) / len(losses)


def sample_text(model: GPT, tok: CharTokenizer, n_chars: int, seed: int, prompt: str = "\n") -> str:
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(tok.encode(prompt)[None, :], n_chars, generator=gen)[0, len(prompt) :]
    model.train(was_training)
    return tok.decode(out)


@dataclass
class TrainLog:
    """Everything logged so far; grows during training (callbacks read it live)."""

    steps: list[dict] = field(default_factory=list)  # step, loss, lr, grad_norm, tokens_per_s
    evals: list[dict] = field(default_factory=list)  # step, split, loss
    samples: list[dict] = field(default_factory=list)  # step, text

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        return (
            pl.DataFrame(
                self.steps,
                schema={
                    "step": pl.Int64,
                    "loss": pl.Float64,
                    "lr": pl.Float64,
                    "grad_norm": pl.Float64,
                    "tokens_per_s": pl.Float64,
                },
            ),
            pl.DataFrame(self.evals, schema={"step": pl.Int64, "split": pl.Utf8, "loss": pl.Float64}),
            pl.DataFrame(self.samples, schema={"step": pl.Int64, "text": pl.Utf8}),
        )


@dataclass
class TrainResult:
    model: GPT
    tokenizer: CharTokenizer
    log: TrainLog
    wall_time_s: float  # summed over interrupted and resumed segments, up to the last checkpoint before each stop
    train_time_s: float  # time in optimisation steps only (excludes evaluation and sampling)
    resumed_from: int | None


def _save_checkpoint(
    folder: Path,
    step: int,
    model: GPT,
    opt: torch.optim.Optimizer,
    batch_gen: torch.Generator,
    cfg: PretrainConfig,
    tok: CharTokenizer,
    log: TrainLog,
    times: dict[str, float],
) -> None:
    steps, evals, samples = log.frames()
    for name, frame in (("steps", steps), ("evals", evals), ("samples", samples)):
        atomic_write_bytes(folder / f"{name}.parquet", parquet_bytes(frame))
    tensors = {
        f"model.{k}": v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied to wte.weight
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.batch"] = batch_gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "config": json.dumps(asdict(cfg)), "vocab": tok.to_json(), "times": json.dumps(times)}
    atomic_write_bytes(folder / CKPT, save(tensors, metadata=meta))
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    atomic_write_bytes(
        folder / f"model_step{step}.safetensors", save(weights, metadata={"step": str(step), "vocab": tok.to_json()})
    )


def _load_checkpoint(
    folder: Path, cfg: PretrainConfig, model: GPT, opt: torch.optim.Optimizer, batch_gen: torch.Generator
) -> tuple[int, TrainLog, dict[str, float]]:
    fix = f"pass --fresh to start over (or delete {shown(folder)})"
    meta = safetensors_metadata(folder / CKPT, fix, required=("step", "config"))
    saved = json.loads(meta["config"])
    if saved != json.loads(json.dumps(asdict(cfg))):
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
        raise LabError(
            f"the checkpoint in {shown(folder)} was made with a different config {diff}: "
            f"delete that folder or pass --fresh to start over"
        )
    step = int(meta["step"])
    t = load_safetensors(folder / CKPT, fix)
    state = {k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.")}
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    osd = opt.state_dict()
    osd["state"] = {}
    for k, v in t.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            osd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(osd)
    batch_gen.set_state(t["rng.batch"])
    torch.set_rng_state(t["rng.torch"])
    log = TrainLog()
    for name, rows in (("steps", log.steps), ("evals", log.evals), ("samples", log.samples)):
        frame = read_parquet(folder / f"{name}.parquet", fix)
        rows.extend(
            frame.filter(pl.col("step") < step).to_dicts()
            if name == "steps"
            else frame.filter(pl.col("step") <= step).to_dicts()
        )
    return step, log, json.loads(meta.get("times", '{"wall": 0.0, "train": 0.0}'))


def train_gpt(
    cfg: PretrainConfig,
    corpus: Corpus,
    ckpt_dir: Path,
    *,
    resume: bool = True,
    on_step: Callable[[int, TrainLog], None] | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train a character-level GPT on ``corpus``; checkpoint into ``ckpt_dir``; resume from it if present.

    Args:
        cfg: Hyper-parameters.
        corpus: Train/validation text.
        ckpt_dir: Checkpoint folder (created).
        resume: Continue from ``ckpt_dir`` if it holds a checkpoint (else start over, deleting it).
        on_step: Called after every optimisation step with (completed steps, log so far); may raise to stop.
        progress: Show a tqdm progress bar.
        device: Torch device.
    """
    t_start = time.perf_counter()
    tok = CharTokenizer.from_text(corpus.train_text + corpus.val_text)
    train_data, val_data = tok.encode(corpus.train_text), tok.encode(corpus.val_text)
    if len(val_data) <= cfg.block_size + 1:
        raise LabError(f"validation text has {len(val_data)} characters; it needs more than block_size+1")
    ckpt_dir = Path(ckpt_dir)
    if not resume and ckpt_dir.exists():
        import shutil

        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    step = new_training(cfg, tok.vocab_size, device)
    model, opt = step.model, step.opt
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    start, log, resumed_from = 0, TrainLog(), None
    prior = {"wall": 0.0, "train": 0.0}  # time spent up to the checkpoint by earlier, interrupted runs
    if resume and (ckpt_dir / CKPT).exists():
        start, log, prior = _load_checkpoint(ckpt_dir, cfg, model, opt, batch_gen)
        resumed_from = start

    def evaluate(step: int, iters: int) -> None:
        for split, data in (("train", train_data), ("val", val_data)):
            log.evals.append(
                {"step": step, "split": split, "loss": estimate_loss(model, data, cfg, iters, cfg.seed + 1)}
            )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=start, desc="pretrain", unit="step")
    train_time = 0.0
    model.train()
    for it in range(start, cfg.max_iters):
        if it % cfg.eval_interval == 0 and not any(e["step"] == it for e in log.evals):
            evaluate(it, cfg.eval_iters)
        t0 = time.perf_counter()
        lr = cfg.lr_at(it)
        loss_v, grad_norm = step(*get_batch(train_data, cfg.block_size, cfg.batch_size, batch_gen), lr)
        dt = time.perf_counter() - t0
        train_time += dt
        log.steps.append(
            {
                "step": it,
                "loss": loss_v,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": cfg.batch_size * cfg.block_size / dt,
            }
        )
        done = it + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}")
        if done % cfg.checkpoint_interval == 0 or done == cfg.max_iters:
            log.samples.append({"step": done, "text": sample_text(model, tok, cfg.sample_chars, cfg.seed + done)})
            if done == cfg.max_iters:
                evaluate(done, cfg.final_eval_iters)
            times = {"wall": prior["wall"] + time.perf_counter() - t_start, "train": prior["train"] + train_time}
            _save_checkpoint(ckpt_dir, done, model, opt, batch_gen, cfg, tok, log, times)
        if on_step is not None:
            on_step(done, log)
    if bar is not None:
        bar.close()
    return TrainResult(
        model, tok, log, prior["wall"] + time.perf_counter() - t_start, prior["train"] + train_time, resumed_from
    )
