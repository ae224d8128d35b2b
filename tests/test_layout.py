"""The layout's rules, checked on the source tree: every track folder has the same files, the library never names a
track, tracks never import each other, charts never aggregate, no module-level import cycle, no module too long."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from lab.paths import REPO_ROOT
from lab.tracks import TRACKS

LAB = REPO_ROOT / "lab"
TRACK_FILES = {"__init__.py", "config.py", "run.py", "frames.py", "charts.py", "summary.py"}
EDGE = {"lab.cli", "lab.tracks"}  # the CLI and the registry are where tracks are chosen by name
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LAB.rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The lab modules ``path`` imports (``from lab.x import y`` counts ``lab.x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lab") and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES}


def library_modules() -> dict[str, Path]:
    return {m: p for m, p in MODULES.items() if not m.startswith("lab.tracks") and m not in EDGE}


class TestTrackFolders:
    @pytest.mark.parametrize("track", list(TRACKS))
    def test_every_track_has_the_same_files(self, track):
        """Learn one track folder, read all: config, run, frames, charts, summary."""
        folder = LAB / "tracks" / track
        assert {p.name for p in folder.glob("*.py")} == TRACK_FILES

    @pytest.mark.parametrize("track", list(TRACKS))
    def test_run_takes_a_profile_and_returns_its_summary(self, track):
        """``run(profile: Profile, ...)`` returns the track's Summary dataclass."""
        from lab.results import Summary

        run = importlib.import_module(f"lab.tracks.{track}.run").run
        sig = inspect.signature(run)
        first = next(iter(sig.parameters.values()))
        assert first.name == "profile" and first.annotation in ("Profile", "lab.profiles.Profile")
        summary_module = importlib.import_module(f"lab.tracks.{track}.summary")
        classes = [
            c
            for c in vars(summary_module).values()
            if isinstance(c, type) and issubclass(c, Summary) and c is not Summary
        ]
        assert len(classes) == 1 and sig.return_annotation in (classes[0].__name__, classes[0])

    @pytest.mark.parametrize("track", list(TRACKS))
    def test_tracks_do_not_import_each_other(self, track):
        for path in (LAB / "tracks" / track).glob("*.py"):
            others = {
                m for m in imports(path) if m.startswith("lab.tracks.") and not m.startswith(f"lab.tracks.{track}")
            }
            assert not others, f"{path.relative_to(REPO_ROOT)} imports {sorted(others)}"

    @pytest.mark.parametrize("track", list(TRACKS))
    def test_results_are_written_as_one_set(self, track):
        """In run.py every ``write_result`` call (or call of a local function that makes one) lies inside a
        ``with result_set(...)`` block, so that the track's files are published together."""
        tree = ast.parse((LAB / "tracks" / track / "run.py").read_text())

        def called(node: ast.AST) -> set[str]:
            return {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

        local_writers = {
            d.name
            for f in tree.body
            if isinstance(f, ast.FunctionDef)
            for d in ast.walk(f)
            if isinstance(d, ast.FunctionDef) and d is not f and "write_result" in called(d)
        }
        writes = {"write_result"} | local_writers

        def unguarded(node: ast.AST) -> list[int]:
            """Lines of writing calls under ``node`` not inside a result_set block (local writers' bodies aside)."""
            if isinstance(node, ast.With) and any("result_set" in called(i) for i in node.items):
                return []
            if isinstance(node, ast.FunctionDef) and node.name in local_writers:
                return []
            here = [node.lineno] if isinstance(node, ast.Call) and getattr(node.func, "id", None) in writes else []
            return here + [line for child in ast.iter_child_nodes(node) for line in unguarded(child)]

        assert "write_result" in called(tree), f"{track}/run.py writes no results"
        assert not unguarded(tree), f"{track}/run.py writes results outside a result_set at lines {unguarded(tree)}"

    @pytest.mark.parametrize("track", list(TRACKS))
    def test_charts_only_encode(self, track):
        """Aggregation lives in frames.py; a chart module never groups or aggregates a frame."""
        text = (LAB / "tracks" / track / "charts.py").read_text()
        for call in (".group_by(", ".agg(", ".pivot(", ".unpivot("):
            assert call not in text, f"{track}/charts.py calls {call}: move it to frames.py"


class TestLibrary:
    def test_library_never_names_a_track(self):
        offenders = []
        for mod, path in library_modules().items():
            text = path.read_text()
            if any(m.startswith("lab.tracks") for m in imports(path)):
                offenders.append(f"{mod} imports lab.tracks")
            offenders += [f"{mod} names {t!r}" for t in TRACKS if t != "pretrain" and t in text]
        assert not offenders

    def test_no_module_level_import_cycle(self):
        graph = {m: imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
        # a package imports its own submodules only through its __init__, which these do not
        state: dict[str, int] = {}

        def visit(m: str, stack: list[str]) -> None:
            state[m] = 1
            for n in graph.get(m, ()):
                if state.get(n) == 1:
                    raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
                if n not in state:
                    visit(n, [*stack, n])
            state[m] = 2

        for m in graph:
            if m not in state:
                visit(m, [m])

    def test_no_module_is_too_long(self):
        long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
        assert not long, f"split these modules (> {MAX_LINES} lines): {long}"

    def test_hook_names_are_built_by_one_function(self):
        """Activation names come from lab.interp.names, never from hand-built f-strings."""
        offenders = [
            m
            for m, p in MODULES.items()
            if m != "lab.interp.names" and ('f"blocks.{' in p.read_text() or "f'blocks.{" in p.read_text())
        ]
        assert not offenders
