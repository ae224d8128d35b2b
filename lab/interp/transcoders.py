"""Per-layer transcoders for circuit-tracer, trained here on the base model (circuit-tracer has no trainer).

A transcoder for layer ``l`` reads the MLP's input (the normalised residual stream, circuit-tracer's
``mlp.hook_in``) and predicts the MLP's output (``mlp.hook_out``) through ``d_transcoder`` sparse features:
``y_hat = TopK(W_enc x + b_enc) @ W_dec + b_dec``. We train circuit-tracer's own ``SingleLayerTranscoder``
with its ``TopK`` activation, so the modules that attribution uses are exactly the ones that were optimised.

All layers train together from one stream of activations: each step runs the frozen base model on a batch of
text (BOS + ``seq_len`` tokens; position 0 is left out, as circuit-tracer zeroes it; :mod:`lab.interp.harvest`,
in bf16) and takes one Adam step per layer on normalised MSE, by default through the TopK-sparse step of
:mod:`lab.interp.topk` (``TranscoderConfig.sparse``; ``sparse=False, precision="fp32"`` is the dense fp32
reference, ~4x slower on this CPU). Training happens in rescaled units (each layer's inputs and outputs divided by
their mean norm / sqrt(d_model), measured on the first batch), and the scales are folded into the weights
before saving (``fold_scales``), so the saved transcoders read and write raw activations. Quality is measured
on held-out text: fraction of variance unexplained (FVU), L0 (active features per token) and the share of features
that never fire.

``build(config, loaded, folder, corpus=...)`` trains and publishes the folder (``layer_{i}.safetensors`` +
``meta.json``, swapped in whole by :func:`lab.io.publish_dir`); an interrupted build resumes from its last
checkpoint, kept beside the folder in ``<folder>.building/``. ``built(config, folder)`` says whether a folder
already holds this config's build and ``load_transcoders(folder)`` reads one back as circuit-tracer's
``TranscoderSet``. The caller chooses the config, the model, the corpus and the folder.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lab.data.corpus import Corpus
from lab.errors import LabError
from lab.interp import topk
from lab.interp.harvest import bf16_layer_weights, harvest_precision, mlp_activations, mlp_modules
from lab.interp.quality import Quality
from lab.io import atomic_write_bytes, publish_dir
from lab.models.loading import LoadedModel
from lab.paths import shown
from lab.state import damaged, load_safetensors, load_torch, read_json
from lab.validation import Problems

PRECISIONS = ("bf16", "fp32")
TOP_FILE = "top_contexts.safetensors"  # each feature's strongest held-out activations and the held-out tokens


@dataclass(frozen=True)
class TranscoderConfig:
    """How one set of per-layer transcoders is trained (its ``asdict`` is the build's cache key)."""

    d_transcoder: int  # features per layer
    k: int  # TopK: active features per token
    steps: int  # optimiser steps (each layer sees steps * batch_tokens tokens, each once)
    batch_seqs: int  # sequences per step
    seq_len: int  # tokens per sequence after the BOS
    lr: float  # Adam's learning rate, decayed linearly to 0 over the last 20 % of steps
    eval_seqs: int  # held-out sequences for FVU / L0
    checkpoints: int = 4  # resumable checkpoints during the build
    seed: int = 0  # initial weights and the choice of training sequences
    # the training step (lab.interp.topk): gradients only through each token's k active features, fused Adam;
    # False: circuit-tracer's dense forward with autograd and Adam's default loop (the fp32 reference)
    sparse: bool = True
    # "bf16": the training batches' harvesting forward and the encoder matmul that chooses the k features run in
    # bf16 (the chosen activations are its scores; all after them is fp32); "fp32": both in fp32. Evaluation (FVU,
    # L0, dead share) is fp32 always.
    precision: str = "bf16"
    # circuit-tracer's skip connection (W_skip, d_model x d_model, from zero): the MLP's linear part, outside the
    # features (in attribution a linear path through the frozen MLP input)
    skip: bool = False
    # AuxK (Gao et al. 2024, as EleutherAI's sparsify computes it; lab.interp.topk.SparseTopKStep): its weight
    # (0: off; 1/32 in the paper), the training tokens without firing after which a feature counts as dead, and the
    # tokens of each batch it is computed on (None: all)
    auxk_alpha: float = 0.0
    dead_tokens: int = 50_000
    aux_tokens: int | None = None

    def __post_init__(self) -> None:
        checks = Problems(self)
        for name in ("d_transcoder", "k", "steps", "batch_seqs", "seq_len", "eval_seqs", "checkpoints"):
            checks.integer(name)
        checks.integer("seed", minimum=0)
        if isinstance(self.k, int) and isinstance(self.d_transcoder, int) and self.k > self.d_transcoder:
            checks.add(
                f"k={self.k} exceeds d_transcoder={self.d_transcoder}: TopK keeps at most every feature; "
                f"lower k or raise d_transcoder"
            )
        checks.number("lr", 0, open_low=True, hint="; Adam on transcoders typically uses 1e-3 to 1e-2")
        checks.number("auxk_alpha", 0, hint="; the AuxK paper uses 1/32, 0 turns it off")
        checks.integer("dead_tokens")
        if self.aux_tokens is not None:
            checks.integer("aux_tokens")
        if not isinstance(self.skip, bool):
            checks.add(f"skip must be True or False (got {self.skip!r})")
        if isinstance(self.auxk_alpha, (int, float)) and self.auxk_alpha > 0 and self.sparse is False:
            checks.add("auxk_alpha > 0 needs sparse=True: the dense reference step has no AuxK loss")
        if not isinstance(self.sparse, bool):
            checks.add(f"sparse must be True or False (got {self.sparse!r})")
        if checks.choice("precision", PRECISIONS) and self.sparse is False and self.precision != "fp32":
            checks.add(
                f"precision={self.precision!r} needs sparse=True: the dense step is the fp32 reference; "
                f"use precision='fp32' with sparse=False"
            )
        checks.raise_if_any("bad TranscoderConfig")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_seqs * self.seq_len


# ---------------------------------------------------------------------------------------------------- data

SOURCE_WEIGHTS = {"corpus": 0.7, "constraints": 0.1, "chat": 0.2}
TEXTS_PER_TYPE, CHATS = 1024, 1000  # generated constraint texts per type (~26k tokens) and chat examples (~75k)


def training_texts(tokenizer, corpus: Corpus) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) text per source: ``corpus`` (the profile's pretraining text), the constraint corpus's
    texts and chat-formatted instructions (the fine-tuning task's event records and probe questions with their
    answers), so that the features cover the kinds of text the attribution graphs follow. Short texts are joined
    into one stream per source. The constraint corpus's held-out prompts are in none of them."""
    from lab.data.constraints import constraint_dataset
    from lab.data.records import PROBES, chat_text, make_task

    ds = constraint_dataset(TEXTS_PER_TYPE, 0)
    task = make_task(CHATS, CHATS // 5, 0)
    chats = [chat_text(tokenizer, ex.prompt, ex.answer) for ex in task.train] + [
        chat_text(tokenizer, q, a) for q, a in PROBES
    ]
    chats_val = [chat_text(tokenizer, ex.prompt, ex.answer) for ex in task.test]
    train = {"corpus": corpus.train_text, "constraints": "\n\n".join(ds["train"]["text"]), "chat": "\n".join(chats)}
    val = {
        "corpus": corpus.val_text,
        "constraints": "\n\n".join(ds["validation"]["text"]),
        "chat": "\n".join(chats_val),
    }
    return train, val


def token_sequences(
    tokenizer, texts: dict[str, str], seq_len: int, n: int, seed: int, weights: dict[str, float] | None = None
) -> torch.Tensor:
    """``n`` sequences of BOS + ``seq_len`` tokens: a source drawn by ``weights`` (default ``SOURCE_WEIGHTS``;
    sources it does not name weigh 1), then a seeded random offset in it."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    if bos is None:
        raise LabError("the tokenizer has neither a BOS nor a PAD token: circuit-tracer needs one to prepend")
    weights = weights or SOURCE_WEIGHTS
    streams = {
        k: torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for k, t in texts.items()
    }
    short = [k for k, s in streams.items() if len(s) <= seq_len]
    if short:
        raise LabError(f"text source(s) {short} have no more than seq_len={seq_len} tokens")
    names = list(streams)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = streams[rng.choices(names, [weights.get(k, 1.0) for k in names])[0]]
        start = rng.randrange(0, len(s) - seq_len)
        rows.append(torch.cat([torch.tensor([bos]), s[start : start + seq_len]]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------- model


def new_transcoder(d_model: int, cfg: TranscoderConfig, layer: int, gen: torch.Generator):
    """A circuit-tracer ``SingleLayerTranscoder`` (TopK, float32, cpu) with unit-norm decoder rows and a tied
    encoder (``W_enc = W_dec``), the initialisation of Gao et al. (2024)."""
    from circuit_tracer.transcoder import SingleLayerTranscoder
    from circuit_tracer.transcoder.activation_functions import TopK

    tc = SingleLayerTranscoder(
        d_model,
        cfg.d_transcoder,
        TopK(cfg.k),
        layer,
        skip_connection=cfg.skip,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    w = torch.randn(cfg.d_transcoder, d_model, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        tc.W_dec.copy_(w)
        tc.W_enc.copy_(w)
    return tc


def unit_scale(a: torch.Tensor) -> float:
    """The divisor that gives ``a``'s rows a mean norm of sqrt(d): mean row norm / sqrt(d)."""
    return float(a.norm(dim=-1).mean()) / math.sqrt(a.shape[-1])


@torch.no_grad()
def fold_scales(tc, sx: float, sy: float) -> None:
    """Turn a transcoder trained on (x / sx -> y / sy) into one on raw (x -> y): the TopK choice is unchanged
    because every pre-activation is the same number, and the output is multiplied by ``sy`` (the skip connection
    maps x / sx to y / sy, so raw it is ``W_skip * sy / sx``)."""
    tc.W_enc.div_(sx)
    tc.W_dec.mul_(sy)
    tc.b_dec.mul_(sy)
    if tc.W_skip is not None:
        tc.W_skip.mul_(sy / sx)


def top_contexts(folder: Path) -> dict[str, torch.Tensor]:
    """The build's held-out record (:data:`TOP_FILE`): ``value`` / ``token`` (layers, top_n, features) of each
    feature's strongest activations and the held-out ``eval_ids`` they index (``lab.interp.quality``)."""
    fix = f"delete {shown(folder)} and build them again (`lab transcoders build --profile <profile>`)"
    return load_safetensors(Path(folder) / TOP_FILE, fix)


def load_transcoders(folder: Path):
    """``(TranscoderSet, meta)``: the transcoders built in ``folder`` as circuit-tracer's set (MLP in -> MLP out),
    float32 on cpu, and their ``meta.json``."""
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import TopK

    folder = Path(folder)
    meta_file = folder / "meta.json"
    if not meta_file.exists():
        raise LabError(
            f"no transcoders in {shown(folder)}: build them first (`lab transcoders build --profile <profile>`)"
        )
    fix = f"delete {shown(folder)} and build them again (`lab transcoders build --profile <profile>`)"
    meta = read_json(meta_file, fix)
    if not isinstance(meta, dict) or not {"n_layers", "d_model", "d_transcoder", "k", "model"} <= set(meta):
        raise damaged(meta_file, "it lacks the build's shape", fix)
    tcs = {}
    for layer in range(meta["n_layers"]):
        tc = SingleLayerTranscoder(
            meta["d_model"],
            meta["d_transcoder"],
            TopK(meta["k"]),
            layer,
            skip_connection=bool(meta.get("skip", False)),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        tc.load_state_dict(load_safetensors(folder / f"layer_{layer}.safetensors", fix))
        tcs[layer] = tc
    return TranscoderSet(
        tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan=f"lab-{meta['model']}"
    ), meta


# ---------------------------------------------------------------------------------------------------- build


def _save_checkpoint(path: Path, key: str, step: int, transcoders, optimizers, scales, elapsed: float, steps) -> None:
    state = {
        "steps": [fn.state_dict() for fn in steps if hasattr(fn, "state_dict")],  # the dead-feature clocks
        "key": key,  # the config and model it belongs to
        "step": step,
        "elapsed": elapsed,
        "scales": torch.tensor(scales),
        "transcoders": [tc.state_dict() for tc in transcoders],
        "optimizers": [opt.state_dict() for opt in optimizers],
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def eval_sequences(cfg: TranscoderConfig, tokenizer, corpus: Corpus) -> torch.Tensor:
    """The build's held-out sequences (``eval_seqs`` of BOS + ``seq_len`` tokens of the held-out texts)."""
    return token_sequences(tokenizer, training_texts(tokenizer, corpus)[1], cfg.seq_len, cfg.eval_seqs, cfg.seed + 1)


def measure(transcoders, model, eval_ids: torch.Tensor, batch_seqs: int) -> Quality:
    """``transcoders`` on ``model``'s activations of ``eval_ids`` (fp32), streamed ``batch_seqs`` at a time:
    the whole held-out set's activations would not fit in memory."""
    held_out = Quality(list(transcoders))
    seq_len = eval_ids.shape[1] - 1
    for i in range(0, eval_ids.shape[0], batch_seqs):
        held_out.add(*mlp_activations(model, eval_ids[i : i + batch_seqs]), first_token=i * seq_len)
    return held_out


def built(cfg: TranscoderConfig, folder: Path) -> dict | None:
    """The meta of the build in ``folder`` when it was made with ``cfg``, else None (missing or another config)."""
    meta_file = Path(folder) / "meta.json"
    if not meta_file.exists():
        return None
    fix = f"delete {shown(folder)} and build them again (`lab transcoders build --profile <profile>`)"
    meta = read_json(meta_file, fix)
    return meta if isinstance(meta, dict) and meta.get("config") == asdict(cfg) else None


def build(
    cfg: TranscoderConfig,
    loaded: LoadedModel,
    folder: Path,
    *,
    corpus: Corpus,
    fresh: bool = False,
    progress: bool = True,
    init_from: Path | None = None,
) -> dict:
    """Train one transcoder per layer of ``loaded``'s model on ``corpus`` (+ the constraint and chat texts) and
    publish them with their quality in ``folder``. ``init_from``: start from the transcoders built there (e.g.
    the base model's, continued on a fine-tuned model's activations) instead of a fresh initialisation.

    Returns the meta dict (also ``meta.json``): config, model, per-layer FVU / L0 / dead share, wall time.
    Already built with the same config and not ``fresh``: returns the existing meta without training. An
    interrupted build resumes from its checkpoint in ``<folder>.building/`` unless ``fresh``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(folder)
    if not fresh and (meta := built(cfg, folder)) is not None:
        return meta
    model = loaded.model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    d_model = model.config.hidden_size
    n_layers = len(mlp_modules(model))

    train_texts, val_texts = training_texts(loaded.tokenizer, corpus)
    t_data = time.perf_counter()
    train_ids = token_sequences(loaded.tokenizer, train_texts, cfg.seq_len, cfg.steps * cfg.batch_seqs, cfg.seed)
    eval_ids = eval_sequences(cfg, loaded.tokenizer, corpus)
    data_s = time.perf_counter() - t_data

    gen = torch.Generator().manual_seed(cfg.seed)
    transcoders = [new_transcoder(d_model, cfg, layer, gen) for layer in range(n_layers)]
    optimizers = topk.optimizers(transcoders, cfg.lr, sparse=cfg.sparse)
    auxk = {"auxk_alpha": cfg.auxk_alpha, "dead_tokens": cfg.dead_tokens, "aux_tokens": cfg.aux_tokens}
    steps = [topk.loss_and_grads(tc, sparse=cfg.sparse, select=cfg.precision, **auxk) for tc in transcoders]
    work = folder.with_name(folder.name + ".building")  # survives an interruption; publish_dir's temp does not
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    start, elapsed = 0, 0.0
    if fresh and ckpt.exists():
        ckpt.unlink()
    key = {"config": asdict(cfg), "model": loaded.name} | ({"init": str(init_from)} if init_from else {})
    key = json.dumps(key, sort_keys=True)
    if ckpt.exists():
        fix = f"pass --fresh to start the build over (or delete {shown(ckpt)})"
        state = load_torch(ckpt, fix)
        if not isinstance(state, dict) or state.get("key") != key:
            raise LabError(f"{shown(ckpt)} belongs to another config or model than this build: {fix}")
        for tc, sd in zip(transcoders, state["transcoders"], strict=True):
            tc.load_state_dict(sd)
        for opt, sd in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for fn, sd in zip([fn for fn in steps if hasattr(fn, "load_state_dict")], state["steps"], strict=True):
            fn.load_state_dict(sd)
        start, elapsed = int(state["step"]), float(state["elapsed"])
        scales = [tuple(r) for r in state["scales"].tolist()]
    else:
        # per-layer scales from the first batch; b_dec starts at its mean output (features learn the variation)
        ins, outs = mlp_activations(model, train_ids[: cfg.batch_seqs])
        scales = [(unit_scale(x), unit_scale(y)) for x, y in zip(ins, outs, strict=True)]
        with torch.no_grad():
            for tc, y, (_, sy) in zip(transcoders, outs, scales, strict=True):
                tc.b_dec.copy_(y.mean(0) / sy)
            if init_from is not None:  # the given transcoders, in this model's rescaled units
                for tc, start_tc, (sx, sy) in zip(transcoders, load_transcoders(init_from)[0], scales, strict=True):
                    tc.load_state_dict(start_tc.state_dict())
                    fold_scales(tc, 1 / sx, 1 / sy)

    every = max(1, cfg.steps // cfg.checkpoints)
    curve: list[dict] = []
    t0 = time.perf_counter() - elapsed
    bar = tqdm(
        range(start, cfg.steps),
        desc=f"transcoders ({n_layers} layers)",
        initial=start,
        total=cfg.steps,
        disable=not progress,
        unit="step",
    )
    harvest_s = 0.0
    with bf16_layer_weights(model, cfg.precision):  # for the training batches only; evaluation harvests in fp32
        for step in bar:
            batch = train_ids[step * cfg.batch_seqs : (step + 1) * cfg.batch_seqs]
            t_harvest = time.perf_counter()
            with harvest_precision(cfg.precision):
                ins, outs = mlp_activations(model, batch)
            harvest_s += time.perf_counter() - t_harvest
            lr = cfg.lr * min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))  # linear decay over the last 20 %
            # every layer's gradients of normalised MSE, then the Adam steps
            losses = [fn(x / sx, y / sy) for fn, x, y, (sx, sy) in zip(steps, ins, outs, scales, strict=True)]
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
            mean_fvu = sum(losses) / len(losses)
            row = {"step": step + 1, "train_fvu_mean": mean_fvu, "train_fvu_max": max(losses)}
            if cfg.sparse:  # the dead-feature clocks: the share not fired for dead_tokens tokens
                row["train_dead_mean"] = sum(float((fn.since_fired >= cfg.dead_tokens).float().mean()) for fn in steps)
                row["train_dead_mean"] /= len(steps)
            curve.append(row)
            bar.set_postfix(fvu=f"{mean_fvu:.3f}")
            if (step + 1) % every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt, key, step + 1, transcoders, optimizers, scales, time.perf_counter() - t0, steps)
    train_s = time.perf_counter() - t0

    for tc, (sx, sy) in zip(transcoders, scales, strict=True):
        fold_scales(tc, sx, sy)
    t_eval = time.perf_counter()
    held_out = measure(transcoders, model, eval_ids, cfg.batch_seqs)
    quality = held_out.rows()
    eval_s = time.perf_counter() - t_eval

    meta = {
        "model": loaded.name,
        "corpus": corpus.name,
        "config": asdict(cfg),
        "n_layers": n_layers,
        "d_model": d_model,
        "d_transcoder": cfg.d_transcoder,
        "k": cfg.k,
        "skip": cfg.skip,
        "train_tokens_per_layer": cfg.steps * cfg.tokens_per_step,
        "eval_tokens": cfg.eval_seqs * cfg.seq_len,
        "source_weights": SOURCE_WEIGHTS,
        "data_s": data_s,
        "train_s": train_s,
        "harvest_s": harvest_s,  # of train_s: harvesting the training batches (since the resume, if resumed)
        "eval_s": eval_s,
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "layers": quality,
        "curve": curve,
        "resumed_from_step": start,
        "init_from": None if init_from is None else shown(Path(init_from)),
        "threads": torch.get_num_threads(),
    }
    if any(not math.isfinite(r["fvu"]) for r in quality):
        raise LabError("transcoder training diverged (non-finite FVU): lower the learning rate (TranscoderConfig.lr)")
    with publish_dir(folder) as out:
        for layer, tc in enumerate(transcoders):
            save_file({k: v.contiguous() for k, v in tc.state_dict().items()}, str(out / f"layer_{layer}.safetensors"))
        save_file(held_out.top() | {"eval_ids": eval_ids.contiguous()}, str(out / TOP_FILE))
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(work)
    return meta
