"""Measurements for the cost model (:mod:`lab.bench.costmodel`): peak memory and seconds per call of a LoRA step,
a no-grad forward and a greedy decode step, on random Llama models of several shapes and on SmolLM2-135M, in fp32,
bf16 (bf16 weights; LoRA in fp32 under autocast for training) and nf4 (the lab's QLoRA path, fp32 compute).

Models are the HF model + peft directly (not ``train_lora``), so what is timed is the model's work, not the
instrumentation. Peak memory on a CPU is the rise of the process's resident peak (``VmHWM``, reset through
``/proc/self/clear_refs``) during one call, with glibc's mmap threshold pinned at 128 KiB for that call so that freed
tensors leave the process and the rise is the call's own; timed calls run with the threshold at 32 MiB (glibc's
default grows to that). ``tracemalloc`` does not see torch's allocations and torch keeps no CPU allocation counters.
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import polars as pl
import torch

from lab.bench.costmodel import SMOLLM2, Shape, flops_per_token, weight_bytes
from lab.errors import LabError
from lab.profiles import Profile


class _Peak:
    """Rise of the process's resident peak during a block, with freed tensors returned to the OS (Linux)."""

    def __enter__(self) -> _Peak:
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: every tensor over 128 KiB is its own mapping
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = _status("VmHWM") - self.start
        self.libc.mallopt(-3, 32 * 2**20)  # timed calls reuse the heap below 32 MiB, as glibc's default grows to


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model(shape: Shape, precision: str):
    """A model of ``shape`` in ``precision``: SmolLM2's real weights for its shape, random weights otherwise."""
    from transformers import AutoModelForCausalLM

    from lab.models.loading import LoadedModel, load_smollm2
    from lab.train.lora import quantize_nf4

    torch.manual_seed(0)
    model = load_smollm2().model if shape == SMOLLM2 else AutoModelForCausalLM.from_config(shape.llama_config())
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if precision == "nf4":
        with tempfile.TemporaryDirectory() as tmp:
            model = quantize_nf4(LoadedModel(model, None, shape.name, "llama"), tmp).model
    return model.eval()


def _decode_seconds(model, x: torch.Tensor, new: int, repeats: int) -> float:
    """Seconds per greedy decode step after the prompts ``x`` (KV cache on): ``new`` + 1 tokens minus 1 token."""

    def generate(n: int) -> None:
        model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    longer, one = _seconds(lambda: generate(new + 1), repeats), _seconds(lambda: generate(1), repeats)
    return max((longer - one) / new, 1e-9)


def _train_step(model, opt, x: torch.Tensor, autocast):
    """One LoRA step on the batch ``x`` (next-token loss on every position)."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()

    return step


def measure_shape(shape: Shape, precision: str, grid: Grid) -> list[dict]:
    """Every point of ``grid`` on one model: forward and decode first, then a LoRA step per rank."""
    from peft import LoraConfig, get_peft_model

    from lab.train.lora import ALL_LINEAR

    model, gen = _model(shape, precision), torch.Generator().manual_seed(0)
    auto = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    held = shape.name in grid.held_out_shapes
    base = {**asdict(shape), "precision": precision, "threads": torch.get_num_threads()}
    base["weight_bytes"] = weight_bytes(shape, precision)
    rows = []

    def ids(b: int, t: int) -> torch.Tensor:
        return torch.randint(3, shape.vocab, (b, t), generator=gen)

    def row(workload: str, b: int, t: int, rank: int, seconds: float, peak: float | None) -> None:
        last = (b, t) == grid.points_for(shape)[-1] and shape.name in grid.held_out_last
        tokens = b * (1 if workload == "decode" else t)
        rows.append(
            {
                **base,
                "workload": workload,
                "batch": b,
                "seq": t,
                "rank": rank,
                "tokens": tokens,  # per call
                "flops": flops_per_token(shape, workload, t, rank) * tokens,  # model FLOPs per call
                "time_s": seconds,
                "memory_bytes": peak,
                "held_out": held or last,
            }
        )

    with torch.no_grad():
        for b, t in grid.points_for(shape):
            x = ids(b, t)
            model(input_ids=x, use_cache=False)
            with _Peak() as peak:
                model(input_ids=x, use_cache=False)
            row("forward", b, t, 0, _seconds(lambda x=x: model(input_ids=x, use_cache=False), grid.repeats), peak.bytes)
        for b, prompt, new in grid.decode:
            per_token = _decode_seconds(model, ids(b, prompt), new, grid.repeats)
            row("decode", b, prompt + new // 2, 0, per_token, None)
    for rank in grid.ranks_for(shape):
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM")
        peft = get_peft_model(model, lcfg)
        peft.train()
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-5)
        for b, t in grid.points_for(shape) if rank == grid.ranks[0] else grid.rank_points:
            step = _train_step(peft, opt, ids(b, t), auto)
            step()  # Adam's states exist before the measured step
            with _Peak() as peak:
                step()
            row("train", b, t, rank, _seconds(step, grid.repeats), peak.bytes)
        model = peft.unload()
    return rows


@dataclass(frozen=True)
class Grid:
    """What to measure: shapes, (batch, tokens) points, LoRA ranks, decode settings; which rows are held out."""

    shapes: tuple[Shape, ...]
    points: tuple[tuple[int, int], ...]  # (batch, seq) of every forward and train measurement
    held_out_shapes: tuple[str, ...]  # shapes the fit never sees
    held_out_last: tuple[str, ...] = ()  # shapes whose largest point is held out
    ranks: tuple[int, ...] = (8,)  # the first is every point's; the others only at rank_points
    rank_shapes: tuple[str, ...] = ()
    rank_points: tuple[tuple[int, int], ...] = ((4, 64),)
    decode: tuple[tuple[int, int, int], ...] = ((1, 32, 8), (4, 32, 8))  # (batch, prompt, new tokens)
    nf4_shapes: tuple[str, ...] = ()
    big: dict | None = None  # shape name -> its own points (the 135M model gets fewer)
    repeats: int = 3

    def points_for(self, shape: Shape) -> tuple[tuple[int, int], ...]:
        return (self.big or {}).get(shape.name, self.points)

    def ranks_for(self, shape: Shape) -> tuple[int, ...]:
        return self.ranks if shape.name in self.rank_shapes else self.ranks[:1]


def _shape(name: str, d: int, layers: int, ff: int, vocab: int, heads: int, kv: int) -> Shape:
    return Shape(name, d, layers, ff, vocab, heads, kv)


RANDOM = (
    _shape("tiny-a", 128, 2, 384, 2048, 4, 2),
    _shape("tiny-b", 256, 4, 768, 8192, 4, 2),
    _shape("small-c", 256, 8, 1024, 16384, 4, 2),
    _shape("small-d", 384, 6, 1024, 32768, 6, 2),
    _shape("small-e", 512, 8, 1408, 16384, 8, 4),
    _shape("deep-f", 192, 12, 512, 4096, 3, 1),
    _shape("wide-g", 256, 4, 1408, 8192, 4, 2),  # MLP 5.5x wide (Qwen2.5-7B: 5.3x), so d and f terms separate
    _shape("narrow-h", 384, 4, 512, 4096, 6, 2),  # MLP 1.3x wide
)
GRIDS = {
    "smoke": Grid(
        shapes=(_shape("tiny-s", 64, 2, 192, 512, 2, 1), _shape("tiny-t", 128, 3, 256, 1024, 4, 2), RANDOM[0]),
        points=((1, 16), (2, 32), (4, 32)),
        held_out_shapes=("tiny-a",),
        nf4_shapes=("tiny-s", "tiny-a"),
        decode=((1, 8, 4),),
        repeats=1,
    ),
    "cpu": Grid(
        shapes=(*RANDOM, SMOLLM2),
        points=((1, 32), (2, 64), (4, 64), (4, 128), (8, 128)),
        held_out_shapes=("small-e",),
        held_out_last=(SMOLLM2.name,),
        ranks=(8, 2, 32, 128),
        rank_shapes=("tiny-b", "small-d"),
        nf4_shapes=("tiny-b", "small-d", "small-e", "wide-g", "narrow-h", SMOLLM2.name),
        big={SMOLLM2.name: ((1, 64), (2, 64), (2, 128), (8, 128))},
    ),
}


def measure(profile: Profile, precisions: tuple[str, ...] = ("fp32", "bf16", "nf4")) -> pl.DataFrame:
    """``cost_measurements``: every point of the profile's grid in each of ``precisions`` (one locked chunk each)."""
    if profile.name not in GRIDS:
        raise LabError(
            f"the cost model measures on this machine's CPU ({', '.join(GRIDS)} profiles), not on {profile.name!r}: "
            f"its projection (lab.bench.costmodel.projection) is the answer for a GPU"
        )
    grid = GRIDS[profile.name]
    rows = []
    for p in precisions:
        for shape in grid.shapes:
            if p != "nf4" or shape.name in grid.nf4_shapes:
                rows += measure_shape(shape, p, grid)
    frame = pl.DataFrame(rows)
    return frame.with_columns(
        params=pl.struct(list(Shape.__dataclass_fields__)).map_elements(
            lambda s: Shape(**s).params, return_dtype=pl.Int64
        )
    )
