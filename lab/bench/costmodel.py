"""A measured cost model: memory and time of LoRA fine-tuning, scoring and generation as a function of the model's
shape, sequence length, batch, LoRA rank and bit width (fp32 / bf16 / nf4), fitted on this machine and projected
to a 7B model in 4 bits on a 16 GB card.

The model (per workload w and precision p; B batch, T tokens, L layers, d width, f MLP width, V vocab):

- **weights**: every parameter x its bytes; in nf4, each decoder-layer linear weight is 4 bits plus one fp32 absmax
  per 64-value block (bitsandbytes' defaults, no double quantisation); embeddings, norms and the LM head stay in the
  compute dtype (bitsandbytes never quantises them).
- **LoRA states**: 16 bytes per LoRA parameter (fp32 master, gradient, Adam's two moments).
- **activations** (fitted): training keeps ``B·T·L·(k_d·d + k_f·f)·bytes`` plus ``k_V·B·T·V·4`` for the logits and
  the loss; a no-grad forward keeps one layer's ``B·T·(k_d·d + k_f·f)·bytes`` plus the logits; ``k_0`` is what the
  runtime adds here (scratch buffers). KV cache of generation: ``2·L·B·T·kv_heads·head_dim·bytes`` (analytic).
- **time**: ``a·FLOPs + b·L + c`` per call (``b``: per-layer dispatch cost, ``c``: per-call cost), fitted by
  non-negative least squares on relative error; generation adds ``e·weight bytes`` (a decode step reads every
  weight). FLOPs per token: forward ``2·N_mm + 2·L·T·d`` (N_mm = matmul parameters incl. the LM head; causal
  attention over T/2 keys on average) plus ``2·N_lora``; a LoRA step adds the backward's input gradients
  (``2·N_mm``), attention's backward (``4·L·T·d``) and the LoRA weight gradients (``4·N_lora``), no weight gradients
  for frozen weights.

What is fitted is the rise of peak memory during one call (a step's LoRA gradients, 4 bytes per LoRA parameter,
and nf4's one dequantised linear weight are known and subtracted first) and the seconds per call, measured by
:mod:`lab.bench.cost_measure`. :func:`projection` then adds what a GPU run holds besides (the nf4 weights with bf16
embeddings, the LoRA states, the card's CUDA context and allocator slack) for Qwen2.5-7B, with the time from FLOPs
over an assumed throughput (:class:`Card`: every GPU number there is an assumption; none was measured here). The
non-negative least squares is a few lines of numpy (drop a term that fits negative, refit) because scipy is not a
dependency of the lab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from lab.profiles import Profile

BYTES = {"fp32": 4, "bf16": 2, "nf4": 4}  # activation bytes (nf4 computes in fp32 here, as the lab's QLoRA on CPU)
NF4_BLOCK = 64  # values per absmax (bitsandbytes' 4-bit blocksize)
LORA_STATE_BYTES = 16  # fp32 param + grad + Adam m + v
WORKLOADS = ("train", "forward", "decode")


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's shape (what the costs depend on)."""

    name: str
    d_model: int
    n_layers: int
    d_ff: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    tied: bool = True  # LM head shares the input embedding
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v

    @classmethod
    def of(cls, config, name: str) -> Shape:
        """The shape of a transformers config (Llama, Qwen2, Mistral ...)."""
        return cls(
            name,
            config.hidden_size,
            config.num_hidden_layers,
            config.intermediate_size,
            config.vocab_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            bool(config.tie_word_embeddings),
            bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        d, f, kv = self.d_model, self.d_ff, self.n_kv_heads * self.head_dim
        return {
            "q_proj": (d, d),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (d, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def params(self) -> int:
        """Every parameter, counted from the shape."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        per_layer = self.layer_linear_params + 2 * d + ((d + 2 * kv) if self.qkv_bias else 0)
        return self.n_layers * per_layer + d + self.vocab * d * (1 if self.tied else 2)

    @property
    def matmul_params(self) -> int:
        """Weights one token multiplies through: every decoder linear and the LM head (not the embedding lookup)."""
        return self.n_layers * self.layer_linear_params + self.vocab * self.d_model

    def lora_params(self, rank: int) -> int:
        """LoRA parameters with rank ``rank`` on every linear layer."""
        return self.n_layers * sum(rank * (i + o) for i, o in self.linears().values())

    def llama_config(self):
        """A transformers ``LlamaConfig`` of this shape (random models to measure)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            intermediate_size=self.d_ff,
            vocab_size=self.vocab,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            tie_word_embeddings=self.tied,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=None,
            pad_token_id=0,
        )


SMOLLM2 = Shape("SmolLM2-135M", 576, 30, 1536, 49152, 9, 3)
QWEN25_7B = Shape("Qwen2.5-7B", 3584, 28, 18944, 152064, 28, 4, tied=False, qkv_bias=True)

# ----------------------------------------------------------------------------- the analytic terms


def weight_bytes(shape: Shape, precision: str, *, compute: str = "fp32") -> int:
    """Bytes of the weights; in ``nf4`` the decoder linears are 4-bit + fp32 absmax per block, the rest ``compute``."""
    if precision != "nf4":
        return shape.params * (2 if precision == "bf16" else 4)
    packed = sum(math.ceil(i * o / 2) + 4 * math.ceil(i * o / NF4_BLOCK) for i, o in shape.linears().values())
    rest = shape.params - shape.n_layers * shape.layer_linear_params
    return shape.n_layers * packed + rest * (2 if compute == "bf16" else 4)


def flops_per_token(shape: Shape, workload: str, seq: int, rank: int = 0) -> float:
    """Model FLOPs of one token (see the module docstring); ``seq`` is the context (prompt + answer for decode)."""
    attn = 2 * shape.n_layers * seq * shape.d_model  # QK^T and AV over seq/2 keys on average, 2 FLOPs per MAC
    lora = 2 * shape.lora_params(rank)
    if workload == "forward":
        return 2 * shape.matmul_params + attn + lora
    if workload == "decode":  # one new token attends to all seq keys
        return 2 * shape.matmul_params + 2 * attn + lora
    return 4 * shape.matmul_params + 3 * attn + 3 * lora  # train: forward + input grads (+ LoRA weight grads)


def kv_cache_bytes(shape: Shape, batch: int, seq: int, precision: str) -> int:
    return 2 * shape.n_layers * batch * seq * shape.n_kv_heads * shape.head_dim * BYTES[precision]


def features(row: dict) -> tuple[dict[str, float], dict[str, float], float]:
    """(time features, memory features, memory known analytically) of one measurement row."""
    s = Shape(**{k: row[k] for k in Shape.__dataclass_fields__})
    B, T, b = row["batch"], row["seq"], BYTES[row["precision"]]
    w = row["workload"]
    tokens = B * (1 if w == "decode" else T)
    timing = {"flops": flops_per_token(s, w, T, row["rank"]) * tokens, "layers": s.n_layers, "call": 1.0}
    if w == "decode":
        timing["weight_bytes"] = weight_bytes(s, row["precision"])
        return timing, {}, 0.0
    layers = s.n_layers if w == "train" else 1
    memory = {
        "act_d": B * T * layers * s.d_model * b,
        "act_ff": B * T * layers * s.d_ff * b,
        "logits": B * T * s.vocab * 4,
        "runtime": 1.0,
    }
    known = 4 * s.lora_params(row["rank"]) if w == "train" else 0.0  # LoRA gradients appear during the step
    if row["precision"] == "nf4":  # one linear weight dequantised at a time, in the compute dtype
        known += max(i * o for i, o in s.linears().values()) * b
    return timing, memory, known


# ----------------------------------------------------------------------------- fitting


def nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: refit without any term that fits negative until none does."""
    keep = np.ones(X.shape[1], bool)
    coef = np.zeros(X.shape[1])
    while keep.any():
        sol, *_ = np.linalg.lstsq(X[:, keep], y, rcond=None)
        if (sol >= 0).all():
            coef[keep] = sol
            break
        idx = np.flatnonzero(keep)
        keep[idx[np.argmin(sol)]] = False
    return coef


def _design(rows: list[dict], quantity: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    feats = [features(r) for r in rows]
    names = list((feats[0][0] if quantity == "time_s" else feats[0][1]).keys())
    X = np.array([[(f[0] if quantity == "time_s" else f[1])[n] for n in names] for f in feats], dtype=float)
    y = np.array([r[quantity] - (0.0 if quantity == "time_s" else f[2]) for r, f in zip(rows, feats, strict=True)])
    return names, X, y


def fit(measurements: pl.DataFrame) -> pl.DataFrame:
    """Coefficients per (workload, precision, quantity), fitted on the rows not held out, on relative error."""
    out = []
    train = measurements.filter(~pl.col("held_out"))
    for (w, p), group in train.group_by(["workload", "precision"], maintain_order=True):
        for quantity in ("time_s", "memory_bytes"):
            rows = [r for r in group.to_dicts() if r.get(quantity) is not None and not math.isnan(r[quantity])]
            if not rows or (quantity == "memory_bytes" and w == "decode"):
                continue
            names, X, y = _design(rows, quantity)
            scale = 1 / np.array([r[quantity] for r in rows])  # relative error: small models count as much
            coef = nnls(X * scale[:, None], y * scale)
            pred = X @ coef
            err = float(np.mean(np.abs(pred - y) / np.array([r[quantity] for r in rows])))
            out += [
                {
                    "workload": w,
                    "precision": p,
                    "quantity": quantity,
                    "term": n,
                    "coefficient": float(c),
                    "n_points": len(rows),
                    "fit_mean_rel_error": err,
                }
                for n, c in zip(names, coef, strict=True)
            ]
    return pl.DataFrame(out)


def predict(coefs: pl.DataFrame, row: dict, quantity: str) -> float:
    """The model's prediction of ``quantity`` for one measurement row."""
    timing, memory, known = features(row)
    c = coefs.filter(
        (pl.col("workload") == row["workload"])
        & (pl.col("precision") == row["precision"])
        & (pl.col("quantity") == quantity)
    )
    terms = dict(zip(c["term"], c["coefficient"], strict=True))
    f = timing if quantity == "time_s" else memory
    return sum(terms[n] * v for n, v in f.items()) + (0.0 if quantity == "time_s" else known)


def validate(measurements: pl.DataFrame, coefs: pl.DataFrame) -> pl.DataFrame:
    """Predicted against measured on the held-out rows."""
    out = []
    for r in measurements.filter(pl.col("held_out")).to_dicts():
        for quantity in ("time_s", "memory_bytes"):
            if r.get(quantity) is None or (quantity == "memory_bytes" and r["workload"] == "decode"):
                continue
            pred = predict(coefs, r, quantity)
            out.append(
                {
                    "model": r["name"],
                    "workload": r["workload"],
                    "precision": r["precision"],
                    "batch": r["batch"],
                    "seq": r["seq"],
                    "rank": r["rank"],
                    "quantity": quantity,
                    "measured": r[quantity],
                    "predicted": pred,
                    "rel_error": (pred - r[quantity]) / r[quantity],
                }
            )
    return pl.DataFrame(out)


# ----------------------------------------------------------------------------- projecting


@dataclass(frozen=True)
class Card:
    """An assumed GPU (none was measured here): every number is an assumption the projection states."""

    name: str = "16 GB GPU (T4-class: 65 TFLOP/s fp16 tensor peak, 320 GB/s)"
    memory_bytes: float = 16e9
    achieved_flops: float = 20e12  # ~30 % of the fp16 tensor peak, for 4-bit LoRA steps and prefill
    bandwidth: float = 0.7 * 320e9  # bytes/s a decode step reads weights at
    context_bytes: float = 0.5e9  # CUDA context and kernels, outside torch's allocations
    fragmentation: float = 0.10  # caching allocator's slack, share of the allocations


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str  # train, forward or decode
    batch: int
    seq: int  # train/forward: tokens per sequence; decode: prompt + answer
    rank: int = 16
    checkpointing: bool = False  # gradient checkpointing: keep each layer's input, recompute the rest
    new_tokens: int = 0  # decode: answer length


SCENARIOS = (
    Scenario("gpu recipe: QLoRA r16, batch 16 x 160 tokens", "train", 16, 160),
    Scenario("gpu recipe with gradient checkpointing", "train", 16, 160, checkpointing=True),
    Scenario("QLoRA r16, batch 4 x 160 tokens", "train", 4, 160),
    Scenario("QLoRA r16, batch 1 x 2048 tokens, checkpointing", "train", 1, 2048, checkpointing=True),
    Scenario("scoring forward, batch 16 x 160 tokens", "forward", 16, 160),
    Scenario("greedy answers, batch 16, 160 + 40 tokens", "decode", 16, 200, new_tokens=40),
)


def project(coefs: dict[str, float], scenario: Scenario, shape: Shape = QWEN25_7B, card: Card = Card()) -> dict:
    """Memory and time of ``scenario`` on ``card``: nf4 weights with bf16 compute and the activation constants
    ``coefs`` of the scenario's workload (``act_d``, ``act_ff``, ``logits``, fitted on this machine in bf16; the CPU's
    ``runtime`` term is replaced by the card's context and fragmentation)."""
    s, B, T, b = shape, scenario.batch, scenario.seq, 2
    weights = weight_bytes(s, "nf4", compute="bf16")
    dequant = max(i * o for i, o in s.linears().values()) * b
    lora = LORA_STATE_BYTES * s.lora_params(scenario.rank) if scenario.workload == "train" else 0
    per_layer = B * T * (coefs["act_d"] * s.d_model + coefs["act_ff"] * s.d_ff) * b
    kv = 0
    if scenario.workload == "train":
        layers = B * T * s.n_layers * s.d_model * b + per_layer if scenario.checkpointing else s.n_layers * per_layer
        logits = coefs["logits"] * B * T * s.vocab * 4
    elif scenario.workload == "forward":
        layers, logits = per_layer, coefs["logits"] * B * T * s.vocab * 4
    else:  # generation keeps logits of the last position only
        kv = kv_cache_bytes(s, B, T, "bf16")
        layers = B * (coefs["act_d"] * s.d_model + coefs["act_ff"] * s.d_ff) * b
        logits = coefs["logits"] * B * s.vocab * 4
    allocated = weights + dequant + lora + layers + logits + kv
    total = allocated * (1 + card.fragmentation) + card.context_bytes
    if scenario.workload == "decode":
        # a step reads every weight once (the embedding table too: an upper bound) or is bound by its FLOPs
        step = max(flops_per_token(s, "decode", T, 0) * B / card.achieved_flops, weights / card.bandwidth)
        tokens_per_s, flops = B / step, float(flops_per_token(s, "decode", T, 0))
        call_s = step * scenario.new_tokens
    else:
        flops = float(flops_per_token(s, scenario.workload, T, scenario.rank))
        if scenario.checkpointing:  # the forward runs again during the backward
            flops += flops_per_token(s, "forward", T, scenario.rank)
        call_s = flops * B * T / card.achieved_flops
        tokens_per_s = B * T / call_s
    return {
        "scenario": scenario.name,
        "workload": scenario.workload,
        "batch": B,
        "seq": T,
        "rank": scenario.rank,
        "weights_gb": weights / 1e9,
        "dequant_gb": dequant / 1e9,
        "lora_states_gb": lora / 1e9,
        "activations_gb": layers / 1e9,
        "logits_gb": logits / 1e9,
        "kv_cache_gb": kv / 1e9,
        "overhead_gb": (total - allocated) / 1e9,
        "total_gb": total / 1e9,
        "fits": total <= card.memory_bytes,
        "flops_per_token": flops,
        "tokens_per_s": tokens_per_s,
        "call_s": call_s,
        "card": card.name,
    }


def projection(coefs: pl.DataFrame, card: Card = Card()) -> pl.DataFrame:
    """Every scenario of :data:`SCENARIOS` for Qwen2.5-7B in 4 bits on ``card``, with this machine's bf16 activation
    constants: the LoRA step's for training, the no-grad forward's for scoring and generation."""
    memory = coefs.filter((pl.col("precision") == "bf16") & (pl.col("quantity") == "memory_bytes"))
    by_workload = {
        w: dict(zip(g["term"], g["coefficient"], strict=True))
        for (w,), g in memory.group_by(["workload"], maintain_order=True)
    }
    return pl.DataFrame(
        [project(by_workload["train" if sc.workload == "train" else "forward"], sc, card=card) for sc in SCENARIOS]
    )


def run(profile: Profile, measurements: pl.DataFrame | None = None, card: Card = Card()) -> dict[str, pl.DataFrame]:
    """Measure (unless ``measurements`` are given), fit, validate on the held-out rows and project: the four frames
    ``cost_measurements``, ``cost_fit``, ``cost_validation``, ``cost_projection``. Writes nothing.

    On ``cpu`` the measurements take about 8 minutes in three parts, one per precision
    (``lab.bench.cost_measure.measure(profile, precisions=("fp32",))`` ...); concatenate them
    (``pl.concat(parts, how="diagonal_relaxed")``) and pass them here to fit without measuring again.
    """
    from lab.bench.cost_measure import measure

    m = measure(profile) if measurements is None else measurements
    coefs = fit(m)
    return {
        "cost_measurements": m,
        "cost_fit": coefs,
        "cost_validation": validate(m, coefs),
        "cost_projection": projection(coefs, card),
    }
