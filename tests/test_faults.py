"""Fault injection: the `lab` command run in a subprocess on a scratch copy of the repository, with bad input and
corrupted state. Every case must end with a non-zero exit, exactly one `lab: error:` line on stderr and no
traceback, and leave every results file it did not corrupt byte-identical. Killing a run at the moment its result
set is swapped in leaves the old set or the new one, never a mix.

The table of these cases is docs/notes/reliability.md; a test checks that the two agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from lab.paths import REPO_ROOT, data_dir

COPIED = ("lab", "results", "docs", "site-src", "QUESTIONS.md", "mkdocs.yml")
VENDOR = REPO_ROOT / "site-src" / "assets" / "vendor"
SMOKE_STATE = ("pretrain", "A_finetuning", "D_bayes")  # tracks run once on smoke: the state corruptions start from


# ----------------------------------------------------------------------------------------------- the scratch repo


@dataclass
class Scratch:
    """A copy of the repository's sources and committed results, with a data folder of its own."""

    root: Path
    data: Path
    saved: dict[Path, bytes | str | Path | None] = field(default_factory=dict)  # what corrupt() replaced
    backups: Path | None = None  # where replaced folders wait to be put back

    @property
    def results(self) -> Path:
        return self.root / "results"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LAB_RESULTS_DIR"}
        env.update(PYTHONPATH=str(self.root), LAB_DATA_DIR=str(self.data), HF_HUB_OFFLINE="1")
        return env | extra

    def lab(self, *args: str, code: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``lab <args>`` in the scratch repo; ``code`` runs first in the same process (a fault to inject)."""
        prog = f"{code}\nimport sys\nfrom lab.cli import main\nsys.exit(main({list(args)!r}))"
        return subprocess.run(
            [sys.executable, "-c", prog],
            cwd=self.root,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=600,
        )

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file under results/ (a symlink by its target)."""
        out = {}
        for p in sorted(self.results.rglob("*")):
            rel = p.relative_to(self.results).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def corrupt(self, path: Path, data: bytes | None = None, *, link: str | None = None) -> Path:
        """Replace ``path`` with ``data`` (or a symlink to ``link``, or nothing when both are None); remembered
        so that :meth:`restore` puts the original back."""
        if path not in self.saved:
            if path.is_symlink():
                self.saved[path] = os.readlink(path)
            elif path.is_dir():  # a folder is moved aside whole
                backup = Path(tempfile.mkdtemp(dir=self.backups)) / path.name
                shutil.move(path, backup)
                self.saved[path] = backup
            else:
                self.saved[path] = path.read_bytes() if path.exists() else None
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if link is not None:
            path.symlink_to(link)
        elif data is not None:
            path.write_bytes(data)
        return path

    def truncate(self, path: Path) -> Path:
        """Keep the first half of a file's bytes."""
        data = path.read_bytes()
        return self.corrupt(path, data[: len(data) // 2])

    def restore(self) -> None:
        for path, original in reversed(list(self.saved.items())):  # inner paths first
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            if isinstance(original, str):
                path.symlink_to(original)
            elif isinstance(original, Path):
                shutil.move(original, path)
            elif original is not None:
                path.write_bytes(original)
        self.saved.clear()

    def checkpoints(self, track: str) -> Path:
        return self.data / "checkpoints" / "smoke" / track


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "vendor", "smoke"))
    else:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    root = tmp_path_factory.mktemp("repo")
    for name in COPIED:
        _copy(REPO_ROOT / name, root / name)
    if VENDOR.is_dir():
        (root / "site-src" / "assets" / "vendor").symlink_to(VENDOR, target_is_directory=True)
    data = tmp_path_factory.mktemp("data")
    for name in ("smollm2", "shakespeare", "models"):
        if (data_dir() / name).exists():
            (data / name).symlink_to((data_dir() / name).resolve(), target_is_directory=True)
    s = Scratch(root, data, backups=tmp_path_factory.mktemp("backups"))
    for track in SMOKE_STATE:
        out = s.lab("run", track, "--profile", "smoke")
        assert out.returncode == 0, out.stderr[-3000:]
    return s


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single `lab: error:` line of a failed command (asserting there is exactly one and no traceback)."""
    assert out.returncode != 0, f"exit 0:\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("lab: error:")]
    assert len(lines) == 1, out.stderr[-4000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One fault: ``setup`` corrupts the scratch repo (its changes are undone afterwards), then ``args`` run."""

    id: str
    args: tuple[str, ...]
    expect: str  # a regular expression the error line must match: what is wrong and the fix
    setup: Callable[[Scratch], object] | None = None
    code: str = ""  # Python run in the subprocess before the CLI (a fault it injects)
    env: dict[str, str] = field(default_factory=dict)


SMOKE = ("--profile", "smoke")
NO_CUDA = "import torch\ntorch.cuda.is_available = lambda: False"
# Every write of a results or checkpoint file fails as on a full disk (at its fsync, as a real one can).
DISK_FULL = """
import errno, os
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full
"""


def lora_checkpoint(s: Scratch, name: str) -> Path:
    """``name`` inside the earliest LoRA checkpoint of Track A's main run, after the later ones are removed (so a
    rerun resumes from it)."""
    runs = s.checkpoints("A_finetuning")
    run = next(p.parent.parent for p in sorted(runs.rglob("checkpoint-*/adapter_model.safetensors")))
    steps = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for later in steps[1:]:
        s.corrupt(later)
    for cached in run.glob("lab_eval*.json"):
        s.corrupt(cached)
    return steps[0] / name


def valid_other_parquet(s: Scratch, path: Path) -> None:
    s.corrupt(path, b"")
    pl.DataFrame({"x": [1, 2, 3]}).write_parquet(path)


def fake_smollm2(s: Scratch, gguf: bytes) -> None:
    """A data folder whose SmolLM2 GGUF is ``gguf`` and which has no converted copy."""
    s.corrupt(s.data / "models")
    s.corrupt(s.data / "smollm2")
    (s.data / "smollm2").mkdir()
    (s.data / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(gguf)


def truncated_model_copy(s: Scratch) -> None:
    """A converted-model cache whose JSON files are whole and whose weights are cut short."""
    from lab.models.loading import load_tiny_model

    s.corrupt(s.data / "models")
    folder = s.data / "models" / "SmolLM2-135M-Instruct"
    lm = load_tiny_model("llama")
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def bad_question(s: Scratch, evidence: str) -> None:
    q = s.root / "QUESTIONS.md"
    text = q.read_text() + f"\n### Q999. A question with bad evidence?\nStatus: ANSWERED\nEvidence: [x]({evidence})\n"
    s.corrupt(q, text.encode())


CASES: list[Case] = [
    # -- the command line
    Case("unknown-track", ("run", "nonsense"), r"unknown track 'nonsense'"),
    Case("unknown-profile", ("run", "pretrain", "--profile", "laptop"), r"unknown profile 'laptop'"),
    Case("unknown-profile-all", ("run", "all", "--profile", "nope"), r"unknown profile 'nope'"),
    Case("unknown-flag", ("run", "pretrain", "--frsh"), r"unrecognized arguments: --frsh"),
    Case("bench-steps-zero", ("bench", "pretrain", *SMOKE, "--steps", "0"), r"steps"),
    Case("bench-steps-negative", ("bench", "pretrain", *SMOKE, "--steps", "-5"), r"steps"),
    Case("serve-port-out-of-range", ("site", "serve", "--port", "99999"), r"port"),
    Case("gpu-without-cuda", ("run", "pretrain", "--profile", "gpu"), r"CUDA.*--profile cpu", code=NO_CUDA),
    Case("gpu-bench-without-cuda", ("bench", "pretrain", "--profile", "gpu"), r"CUDA.*--profile cpu", code=NO_CUDA),
    Case("gpu-transcoders-without-cuda", ("transcoders", "build", "--profile", "gpu"), r"CUDA", code=NO_CUDA),
    # -- publication: the site build and the questions log check what they publish
    Case(
        "garbage-parquet",
        ("site", "build"),
        r"loss\.parquet",
        lambda s: s.corrupt(s.results / "pretrain" / "loss.parquet", b"garbage"),
    ),
    Case(
        "truncated-chart",
        ("site", "build"),
        r"loss\.vl\.json",
        lambda s: s.truncate(s.results / "pretrain" / "loss.vl.json"),
    ),
    Case(
        "nan-in-chart",
        ("site", "build"),
        r"log\.vl\.json",
        lambda s: s.corrupt(
            s.results / "pretrain" / "log.vl.json",
            re.sub(
                rb'"loss": [0-9.e-]+', b'"loss": NaN', (s.results / "pretrain" / "log.vl.json").read_bytes(), count=1
            ),
        ),
    ),
    Case(
        "truncated-summary",
        ("site", "build"),
        r"summary\.parquet",
        lambda s: s.truncate(s.results / "pretrain" / "summary.parquet"),
    ),
    Case(
        "truncated-manifest",
        ("site", "build"),
        r"manifest\.json",
        lambda s: s.truncate(s.results / "pretrain" / "manifest.json"),
    ),
    Case(
        "replaced-parquet",
        ("site", "build"),
        r"samples\.parquet",
        lambda s: valid_other_parquet(s, s.results / "pretrain" / "samples.parquet"),
    ),
    Case(
        "unlisted-result",
        ("site", "build"),
        r"extra\.parquet",
        lambda s: valid_other_parquet(s, s.results / "pretrain" / "extra.parquet"),
    ),
    Case(
        "symlink-in-results",
        ("site", "build"),
        r"passwd",
        lambda s: s.corrupt(s.results / "pretrain" / "passwd.parquet", link="/etc/passwd"),
    ),
    Case(
        "vendor-js-missing",
        ("site", "build"),
        r"\./\.ci/setup",
        lambda s: s.corrupt(s.root / "site-src" / "assets" / "vendor"),
    ),
    Case(
        "garbage-evidence",
        ("questions",),
        r"loss\.parquet",
        lambda s: s.corrupt(s.results / "pretrain" / "loss.parquet", b"garbage"),
    ),
    Case(
        "evidence-outside-repo",
        ("questions",),
        r"etc/passwd",
        lambda s: bad_question(s, "../../../../../../etc/passwd"),
    ),
    Case(
        "questions-not-utf8",
        ("questions",),
        r"QUESTIONS\.md.*UTF-8",
        lambda s: s.corrupt(s.root / "QUESTIONS.md", (s.root / "QUESTIONS.md").read_bytes() + b"\n\xff\xfe bad\n"),
    ),
    Case(
        "questions-not-utf8-site",
        ("site", "build"),
        r"QUESTIONS\.md.*UTF-8",
        lambda s: s.corrupt(s.root / "QUESTIONS.md", (s.root / "QUESTIONS.md").read_bytes() + b"\n\xff\xfe bad\n"),
    ),
    # -- corrupt state: checkpoints, caches, models
    Case(
        "truncated-pretrain-checkpoint",
        ("run", "pretrain", *SMOKE),
        r"ckpt\.safetensors.*--fresh",
        lambda s: s.truncate(s.checkpoints("pretrain") / "ckpt.safetensors"),
    ),
    Case(
        "truncated-pretrain-log",
        ("run", "pretrain", *SMOKE),
        r"steps\.parquet.*--fresh",
        lambda s: s.truncate(s.checkpoints("pretrain") / "steps.parquet"),
    ),
    Case(
        "truncated-lora-adapter",
        ("run", "A_finetuning", *SMOKE),
        r"adapter_model\.safetensors.*--fresh",
        lambda s: s.truncate(lora_checkpoint(s, "adapter_model.safetensors")),
    ),
    Case(
        "truncated-lora-optimizer",
        ("run", "A_finetuning", *SMOKE),
        r"optimizer\.pt.*--fresh",
        lambda s: s.truncate(lora_checkpoint(s, "optimizer.pt")),
    ),
    Case(
        "truncated-lora-log",
        ("run", "A_finetuning", *SMOKE),
        r"lab_log\.json.*--fresh",
        lambda s: s.truncate(lora_checkpoint(s, "lab_log.json")),
    ),
    Case(
        "truncated-windtunnel-run",
        ("run", "D_bayes", *SMOKE),
        r"model\.safetensors.*(delete|--fresh)",
        lambda s: s.truncate(next(s.checkpoints("D_bayes").rglob("model.safetensors"))),
    ),
    Case(
        "truncated-gguf",
        ("run", "C_probing", "--profile", "cpu"),
        r"gguf.*\./\.ci/setup",
        lambda s: fake_smollm2(s, (data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()[:4096]),
    ),
    Case(
        "missing-gguf",
        ("run", "C_probing", "--profile", "cpu"),
        r"\./\.ci/setup",
        lambda s: (s.corrupt(s.data / "models"), s.corrupt(s.data / "smollm2")),
    ),
    Case(
        "truncated-model-copy",
        ("run", "C_probing", "--profile", "cpu"),
        r"model\.safetensors",
        truncated_model_copy,
    ),
    # -- the operating system says no
    Case(
        "results-root-is-a-file",
        ("run", "pretrain", *SMOKE),
        r"not-a-folder",
        lambda s: s.corrupt(s.root / "not-a-folder", b"a file"),
        env={"LAB_RESULTS_DIR": "not-a-folder"},
    ),
    Case("disk-full", ("run", "pretrain", *SMOKE), r"No space left", code=DISK_FULL),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_ends_in_one_line(scratch: Scratch, case: Case) -> None:
    """A non-zero exit, one `lab: error:` line naming the problem and its fix, no traceback, nothing else lost."""
    before = scratch.snapshot()
    try:
        if case.setup is not None:
            case.setup(scratch)
        corrupted = {p.relative_to(scratch.results).as_posix() for p in scratch.saved if scratch.results in p.parents}
        line = one_error_line(scratch.lab(*case.args, code=case.code, env=case.env))
        assert re.search(case.expect, line), line
        after = scratch.snapshot()
        kept = {k: v for k, v in before.items() if k not in corrupted}
        assert {k: after.get(k) for k in kept} == kept, "a results file the case did not corrupt changed"
    finally:
        scratch.restore()


def test_truncated_manifest_is_rewritten_by_the_next_run(scratch: Scratch) -> None:
    """A truncated manifest blocks nothing: the next run of the track publishes a whole set with a new one."""
    folder = scratch.results / "smoke" / "pretrain"
    scratch.truncate(folder / "manifest.json")
    try:
        out = scratch.lab("run", "pretrain", *SMOKE)
        assert out.returncode == 0, out.stderr[-3000:]
        assert whole_set(folder)
    finally:
        scratch.saved.clear()  # the run wrote a new, whole set: nothing to put back


def whole_set(folder: Path) -> bool:
    """Every file in ``folder`` is listed in its manifest with the sha256 recorded there (one run's set)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {f: entry["sha256"][f] for entry in manifest.values() for f in entry["files"]}
    present = {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    return present == set(listed) and all(
        hashlib.sha256((folder / f).read_bytes()).hexdigest() == digest for f, digest in listed.items()
    )


# Kill the process just before, or just after, the new result set replaces the old (the exchange itself is one
# renameat2 call: there is no moment in between to kill it at).
KILL_AT_SWAP = """
import os, signal, lab.results
_swap = lab.results.swap_in
def swap_in(stage, live, **kw):
    if live.name == "pretrain" and live.parent.name == "smoke":
        if {when!r} == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        _swap(stage, live, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    return _swap(stage, live, **kw)
lab.results.swap_in = swap_in
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_at_the_swap_leaves_one_whole_set(scratch: Scratch, when: str) -> None:
    """kill -9 around the swap of a fresh pretrain set: the folder then holds the old set (killed before) or the
    new one (after), each whole; the next run publishes normally and clears what the killed run left."""
    folder = scratch.results / "smoke" / "pretrain"
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = scratch.lab("run", "pretrain", *SMOKE, "--fresh", code=KILL_AT_SWAP.format(when=when))
    assert out.returncode == -9, out.stderr[-3000:]
    now = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert whole_set(folder)
    assert (now == old) == (when == "before")
    again = scratch.lab("run", "pretrain", *SMOKE)
    assert again.returncode == 0 and whole_set(folder), again.stderr[-3000:]
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".pretrain")]


def test_reliability_page_lists_every_case() -> None:
    """docs/notes/reliability.md's table names every case this module checks, and no other."""
    page = (REPO_ROOT / "docs" / "notes" / "reliability.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", page, re.M))
    assert listed == {c.id for c in CASES} | {"kill-before-swap", "kill-after-swap", "truncated-results-manifest"}
