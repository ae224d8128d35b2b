"""Training many wind-tunnel runs together: each run in its own process on one core, all of them at once.

:func:`train_runs` takes the runs of a track (the headline's seeds, the search candidates, the controls), loads the
cached ones, and trains the rest side by side, each in its own worker process with one intra-op thread, through the
same loop as one run (:func:`lab.train.windtunnel.fit`) but with the key-positions-only forward
(:func:`lab.models.windtunnel.key_logits`). Every run keeps exactly what it has alone: its initialisation
(``torch.manual_seed(seed)`` before ``build_model``), its batch generator (``10_000 + seed``), its schedule, its own
``clip_grad_norm_`` and its own AdamW; nothing is shared between runs but the machine. So each run equals its
one-at-a-time training up to float rounding, is cached in the same folder (``name-run_key``, unchanged: the work is
the same), and runs of any shape, step count or kind train together.

Why not ``torch.func.stack_module_state`` + ``vmap`` (or a batched ensemble module), the library way to train
same-shape models in one step: measured on this machine (2 cores, fp32), three 2-layer width-64 transformers
stacked under ``vmap`` take 48 ms per member-step against 36 ms one at a time; stacked ``bmm`` runs at 60-100
GFLOP/s where each member's own ``mm`` runs at 145-185, because the stacked activations leave the cores' caches.
What is slow here is the intra-op parallelism of small ops: one model steps in 66 ms on one thread and only 46 ms on
two, while two models on one thread each take 37 ms per member-step.

Why processes and not threads (which release the GIL inside every ATen op and measured the same): under CPython
3.11, Python threads that build code concurrently after ``torch.compile`` has run in the process (the main job
compiles pretraining before Track D) fail with "SystemError: AST constructor recursion depth mismatch". Workers
come from a ``forkserver`` (a clean process that has imported this module once, so each worker starts in
milliseconds and inherits no threads and no compiled state). A test can make one run fail through the environment
variable ``LAB_TEST_FAIL_RUN`` (the run's name), read when the runs are submitted.

A run's ``train_s`` (meta.json and the log) is the machine time it used: each step's seconds divided by the number
of runs training at that moment, so the runs' ``train_s`` add up to the wall time of training them together.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


T = TypeVar("T")


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


TEST_FAIL = "LAB_TEST_FAIL_RUN"  # a run of this name raises in its first step (tests of the failure path)
_shared: dict = {}  # in a worker: the count of runs training now and the stop flag (set by _init_worker)


def _init_worker(training, stop) -> None:
    torch.set_num_threads(1)  # one intra-op thread per run: the runs are the parallelism
    _shared.update(training=training, stop=stop)


def _train_one(folder: Path, r: RunSpec, V: int, position: int, progress: bool, fail: str | None) -> RunResult:
    """In a worker: build the run's model as train_run does, train it, publish its folder."""
    training, stop = _shared["training"], _shared["stop"]

    def check() -> None:
        if stop.is_set():
            raise _Stopped
        if fail == r.name:
            raise ValueError(f"boom ({TEST_FAIL}={r.name})")

    torch.manual_seed(r.seed)  # the run's initialisation, as train_run draws it
    model = build_model(r.spec, V, match=r.match)
    with training.get_lock():
        training.value += 1
    try:
        log, train_s = fit(
            r.name,
            model,
            V,
            r.cfg,
            r.seed,
            forward=key_logits,
            progress=progress,
            sharers=lambda: training.value,
            before_step=check,
            bar_position=position,
        )
    finally:
        with training.get_lock():
            training.value -= 1
    return save_run(folder, r.name, V, r.spec, r.cfg, r.seed, r.match, model, log, train_s)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While workers start, hide the caller's ``__main__`` from multiprocessing, which would otherwise import it again
    in the forkserver and in every worker: a plain script that calls :func:`train_runs` without an
    ``if __name__ == "__main__":`` guard would then run itself in each of them. The workers need nothing from it
    (what they run lives in this module)."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


@contextmanager
def side_job(fn: Callable[..., T], *args: Any) -> Iterator[Future[T]]:
    """Run ``fn(*args)`` in one more worker process (from the same forkserver, one intra-op thread) while the caller
    goes on, e.g. to :func:`train_runs`; yields its future and waits for it on leaving (``fn`` must be importable,
    its arguments and result picklable)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,))
    try:
        with _main_module_hidden():
            future = pool.submit(fn, *args)
        yield future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _side_by_side(V: int, todo: dict[Path, tuple[RunSpec, torch.nn.Module]], progress: bool) -> dict[Path, RunResult]:
    """Train every run in ``todo`` at once, one worker process each, one intra-op thread per run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    training, stop = ctx.Value("i", 0), ctx.Event()
    fail = os.environ.get(TEST_FAIL)  # read here: the forkserver's workers have the environment it started with
    pool = ProcessPoolExecutor(len(todo), mp_context=ctx, initializer=_init_worker, initargs=(training, stop))
    try:
        with _main_module_hidden():  # the forkserver and the workers start on the first submits
            futures = {
                pool.submit(_train_one, folder, r, V, i, progress, fail): folder
                for i, (folder, (r, _)) in enumerate(todo.items())
            }
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
        pool.shutdown(wait=True, cancel_futures=True)
