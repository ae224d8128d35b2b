"""Training many wind-tunnel runs together: each run on its own core, all of them at once.

:func:`train_runs` takes the runs of a track (the headline's seeds, the search candidates, the controls), loads the
cached ones, and trains the rest side by side, each in its own thread with one intra-op thread, through the same
loop as one run (:func:`lab.train.windtunnel.fit`) but with the key-positions-only forward
(:func:`lab.models.windtunnel.key_logits`). Every run keeps exactly what it has alone: its initialisation
(``torch.manual_seed(seed)`` before ``build_model``, done in the calling thread, in order), its batch generator
(``10_000 + seed``), its schedule, its own ``clip_grad_norm_`` and its own AdamW; nothing is shared between runs but
the machine. So each run equals its one-at-a-time training up to float rounding, is cached in the same folder
(``name-run_key``, unchanged: the work is the same), and runs of any shape, step count or kind train together.

Why not ``torch.func.stack_module_state`` + ``vmap`` (or a batched ensemble module), the library way to train
same-shape models in one step: measured on this machine (2 cores, fp32), three 2-layer width-64 transformers
stacked under ``vmap`` take 48 ms per member-step against 36 ms one at a time; stacked ``bmm`` runs at 60-100
GFLOP/s where each member's own ``mm`` runs at 145-185, because the stacked activations leave the cores' caches.
What is slow here is the intra-op parallelism of small ops: one model steps in 66 ms on one thread and only 46 ms on
two, while two models on one thread each take 37 ms per member-step. Threads release the GIL inside every ATen op
and the autograd engine runs a CPU backward on the calling thread, so plain threads give that; one intra-op thread
per run also makes each run bit-reproducible whatever else trains beside it.

A run's ``train_s`` (meta.json and the log) is the machine time it used: each step's seconds divided by the number
of runs training at that moment, so the runs' ``train_s`` add up to the wall time of training them together.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.models.windtunnel import ModelSpec, build_model, key_logits
from lab.train.windtunnel import RunResult, TrainConfig, fit, load_cached, run_folder, save_run, train_run


@dataclass(frozen=True)
class RunSpec:
    """One run of :func:`train_runs` (the arguments of :func:`lab.train.windtunnel.train_run` that differ)."""

    name: str  # label and cache-folder prefix, e.g. "transformer-s0"
    spec: ModelSpec
    cfg: TrainConfig
    seed: int
    match: int | None = None  # parameter count the controls are sized to when spec.d_hidden is 0


class _Stopped(Exception):
    """A run told to stop because another run failed or the caller was interrupted."""


def train_runs(
    V: int,
    runs: list[RunSpec],
    ckpt_root: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    device: str = "cpu",
    fast: bool = True,
) -> list[RunResult]:
    """Train (or load) every run; results in the order of ``runs``.

    Args:
        V: Values per bijection.
        runs: The runs; two with the same name and settings are trained once.
        ckpt_root: Folder holding the cache of finished runs.
        fresh: Retrain even where a finished run is cached.
        progress: One tqdm bar per run in training.
        device: "cpu": the uncached runs train side by side; "cuda": one after another (the GPU is one device).
        fast: False: today's path, one :func:`~lab.train.windtunnel.train_run` after another with the full forward
            (the baseline of ``lab bench wind``).
    """
    if not fast:
        return [
            train_run(
                r.name,
                V,
                r.spec,
                r.cfg,
                r.seed,
                ckpt_root,
                match=r.match,
                fresh=fresh,
                progress=progress,
                device=device,
            )
            for r in runs
        ]
    done: dict[Path, RunResult] = {}
    todo: dict[Path, tuple[RunSpec, torch.nn.Module]] = {}
    for r in runs:
        folder = run_folder(ckpt_root, r.name, V, r.spec, r.cfg, r.seed, r.match)
        if folder in done or folder in todo:
            continue
        torch.manual_seed(r.seed)  # the run's initialisation, as train_run draws it
        model = build_model(r.spec, V, match=r.match)
        cached = None if fresh else load_cached(r.name, folder, model)
        if cached is not None:
            done[folder] = cached
        else:
            todo[folder] = (r, model)
    if device != "cpu" or len(todo) <= 1:
        for folder, (r, model) in todo.items():
            log, train_s = fit(r.name, model, V, r.cfg, r.seed, forward=key_logits, device=device, progress=progress)
            done[folder] = save_run(folder, r.name, V, r.spec, r.cfg, r.seed, r.match, model, log, train_s)
    else:
        done.update(_side_by_side(V, todo, progress))
    return [done[run_folder(ckpt_root, r.name, V, r.spec, r.cfg, r.seed, r.match)] for r in runs]


def _side_by_side(V: int, todo: dict[Path, tuple[RunSpec, torch.nn.Module]], progress: bool) -> dict[Path, RunResult]:
    """Train every run in ``todo`` at once, one thread each, one intra-op thread per run."""
    threads = torch.get_num_threads()
    stop = threading.Event()
    count = threading.Lock()
    saving = threading.Lock()  # publish one folder at a time
    training = [0]  # runs in their training loop now

    def sharers() -> int:
        return training[0]

    def check() -> None:
        if stop.is_set():
            raise _Stopped

    def one(folder: Path, r: RunSpec, model: torch.nn.Module, position: int) -> RunResult:
        torch.set_num_threads(1)  # this thread's own; the caller's count is restored below
        with count:
            training[0] += 1
        try:
            log, train_s = fit(
                r.name,
                model,
                V,
                r.cfg,
                r.seed,
                forward=key_logits,
                progress=progress,
                sharers=sharers,
                before_step=check,
                bar_position=position,
            )
        finally:
            with count:
                training[0] -= 1
        with saving:
            return save_run(folder, r.name, V, r.spec, r.cfg, r.seed, r.match, model, log, train_s)

    pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="windtunnel-run")
    try:
        futures = {pool.submit(one, folder, r, model, i): folder for i, (folder, (r, model)) in enumerate(todo.items())}
        wait(futures, return_when=FIRST_EXCEPTION)
        stop.set()  # a no-op when every run finished; else the others stop at their next step
        wait(futures)
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return {folder: f.result() for f, folder in futures.items()}
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)
