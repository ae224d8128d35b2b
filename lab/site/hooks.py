"""mkdocs hooks for the lab's site (loaded by ``hooks:`` in ``mkdocs.yml``); the macros that put results on pages
are :mod:`lab.site.macros` (mkdocs-macros-plugin).

What they do, in build order:

- ``on_config``: refuse to build without the bundled JS (``site-src/assets/vendor``) and add the
  hand-written ``docs/**.md`` pages to the navigation.
- ``on_files``: check the results (:func:`lab.site.checks.check_results`: no links, readable, finite, sha256 as
  the manifest records) and publish ``results/**`` (Parquet, ``.vl.json``, ``manifest.json``) under ``results/``,
  with a CSV written beside each Parquet file (in the built site only) for readers without Parquet tools and a
  ``.vl.js`` beside each chart (its spec as a script, which the chart macro's page loads: works from file://); render
  the repo-root ``QUESTIONS.md`` as ``questions.md`` and ``docs/**`` under ``docs/``.
- ``on_page_markdown`` (after the macros have rendered the page): rewrite repo-relative links in those generated
  pages, and give the questions their anchors.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import polars as pl
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

from lab.errors import LabError
from lab.paths import REPO_ROOT, results_root
from lab.site.checks import RESULT_SUFFIXES, check_results
from lab.site.macros import GRAPH_SCRIPT_SUFFIX, SPEC_SCRIPT_SUFFIX
from lab.site.questions import read_log
from lab.site.sources import read_frame_at

VENDOR_FILES = (
    "vega.min.js",
    "vega-lite.min.js",
    "vega-embed.min.js",
    "katex/katex.min.js",
    "katex/katex.min.css",
    "katex/auto-render.min.js",
)
SKIPPED_PROFILES = ("smoke",)  # smoke results are test debris, never published
QUESTIONS_SRC = "questions.md"
QUESTIONS_FILE = REPO_ROOT / "QUESTIONS.md"
DOCS_DIR = REPO_ROOT / "docs"  # hand-written prose, published under docs/

# Repo-root files rendered as pages: site src_uri -> repo-relative path (filled by on_files).
_GENERATED: dict[str, str] = {}


# ----------------------------------------------------------------------------- repo pages


_LINK_RE = re.compile(r"(?P<pre>!?\[[^\]]*\]\()(?P<target>[^)\s]+)(?P<post>[^)]*\))")
_QUESTION_HEADING_RE = re.compile(r"^(###\s+(Q\d+)\.\s.*?)\s*$", re.MULTILINE)
_STATUS_RE = re.compile(r"^Status:\s*(\w+)\s*$", re.MULTILINE)


def repo_path_to_site(repo_path: str) -> str | None:
    """Map a repo-relative path to its site ``src_uri`` (``None`` when it is not on the site)."""
    if repo_path.startswith("site-src/"):
        return repo_path[len("site-src/") :]
    if repo_path.startswith(("results/", "docs/")):
        return repo_path
    if repo_path == "QUESTIONS.md":
        return QUESTIONS_SRC
    return None


def rewrite_repo_links(markdown: str, repo_file: str, site_src_uri: str) -> str:
    """Turn links written relative to ``repo_file`` in the repo into links relative to the site page."""

    def replace(m: re.Match[str]) -> str:
        target = m.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.I):
            return m.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(repo_file), path))
        site = repo_path_to_site(repo_path)
        if site is None:
            return m.group(0)
        rel = posixpath.relpath(site, posixpath.dirname(site_src_uri) or ".")
        return f"{m.group('pre')}{rel}{'#' + anchor if anchor else ''}{m.group('post')}"

    return _LINK_RE.sub(replace, markdown)


def render_questions(markdown: str) -> str:
    """QUESTIONS.md as a page: each ``### Qn.`` heading gets the anchor ``#qn``; status lines stand alone."""
    markdown = _QUESTION_HEADING_RE.sub(lambda m: f"{m.group(1)} {{#{m.group(2).lower()}}}", markdown)
    markdown = _STATUS_RE.sub(
        lambda m: f'\n**Status:** <span class="lab-status lab-status--{m.group(1).lower()}">{m.group(1)}</span>\n',
        markdown,
    )
    return re.sub(r"^Evidence:", "\n**Evidence:**", markdown, flags=re.MULTILINE)


def _docs_files() -> list[Path]:
    if not DOCS_DIR.is_dir():
        return []
    return sorted(p for p in DOCS_DIR.rglob("*") if p.is_file() and not p.name.startswith("."))


# ----------------------------------------------------------------------------- mkdocs events


def _as_plugin_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """mkdocs prints a PluginError as one clean line; any other exception as a traceback."""

    @wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LabError as e:
            raise PluginError(str(e)) from e

    return wrapped


@_as_plugin_error
def on_config(config: Any) -> Any:
    """Check the vendored JS and append the ``docs/`` pages to the navigation."""
    vendor = Path(config["docs_dir"]) / "assets" / "vendor"
    missing = [f for f in VENDOR_FILES if not (vendor / f).exists()]
    if missing:
        raise LabError(f"the site's bundled JS is missing ({', '.join(missing)} in {vendor}): run ./.ci/setup")
    # Plain paths: mkdocs titles each page from its first heading.
    notes = [f"docs/{p.relative_to(DOCS_DIR).as_posix()}" for p in _docs_files() if p.suffix == ".md"]
    if notes and config.get("nav") is not None:
        config["nav"] = [*config["nav"], {"Notes": notes}]
    return config


def csv_text(path: Path) -> str:
    """A published Parquet file as CSV (nested values as JSON text), for readers without Parquet tools."""
    frame = read_frame_at(path)
    nested = [c for c, dtype in frame.schema.items() if dtype.is_nested()]
    frame = frame.with_columns(
        pl.col(c).map_elements(lambda v: json.dumps(v.to_list() if isinstance(v, pl.Series) else v), pl.String)
        for c in nested
    )
    return frame.write_csv()


def spec_script(src: str, path: Path) -> str:
    """The chart at site path ``src`` as a script that registers its spec in ``window.LabSpecs`` (a page can load a
    script from disk; it cannot fetch JSON there)."""
    key = json.dumps(src)
    return (
        f"window.LabSpecs = window.LabSpecs || {{}};\nwindow.LabSpecs[{key}] = {path.read_text()};\n"
        f"if (window.labChartLoaded) window.labChartLoaded({key});\n"
    )


def graph_script(path: Path) -> str:
    """A circuit-tracer graph JSON as a script that registers it for ``assets/graphs/lab-graphs.js``."""
    key = json.dumps(path.stem)
    return f"window.LabGraphs = window.LabGraphs || {{}};\nwindow.LabGraphs[{key}] = {path.read_text()};\n"


def published_results(base: Path) -> list[Path]:
    """The result files the site publishes: regular files with a result suffix under ``base``, less hidden entries
    (writers' temporaries and stages), links and the skipped profiles."""
    if not base.is_dir():
        return []
    found = []
    for path in sorted(base.rglob("*")):
        parts = path.relative_to(base).parts
        if parts[0] in SKIPPED_PROFILES or any(p.startswith(".") for p in parts) or path.is_symlink():
            continue
        if path.is_file() and path.name.endswith(RESULT_SUFFIXES):
            found.append(path)
    return found


@_as_plugin_error
def on_files(files: Files, config: Any) -> Files:
    """Add results, QUESTIONS.md and docs/ to the site."""
    _GENERATED.clear()

    def add(file: File) -> None:
        if files.get_file_from_path(file.src_uri) is not None:
            raise LabError(f"{file.src_uri} exists both in site-src/ and as a generated page: remove one")
        files.append(file)

    base = results_root("cpu")
    if problems := check_results(base, skip=SKIPPED_PROFILES):
        raise LabError("; ".join(problems))
    for path in published_results(base):
        src = f"results/{path.relative_to(base).as_posix()}"
        add(File.generated(config, src, abs_src_path=str(path)))
        if path.suffix == ".parquet":
            add(File.generated(config, src.removesuffix(".parquet") + ".csv", content=csv_text(path)))
        elif path.name.endswith(".vl.json"):
            add(
                File.generated(
                    config, src.removesuffix(".vl.json") + SPEC_SCRIPT_SUFFIX, content=spec_script(src, path)
                )
            )

    for path in sorted(base.glob("*/graphs/*.json")):  # attribution graphs, as scripts for the graph viewer
        src = f"results/{path.relative_to(base).as_posix()}"
        add(File.generated(config, src.removesuffix(".json") + GRAPH_SCRIPT_SUFFIX, content=graph_script(path)))

    if QUESTIONS_FILE.exists():
        add(File.generated(config, QUESTIONS_SRC, content=read_log(QUESTIONS_FILE)))
        _GENERATED[QUESTIONS_SRC] = "QUESTIONS.md"
    for path in _docs_files():
        src = f"docs/{path.relative_to(DOCS_DIR).as_posix()}"
        add(File.generated(config, src, abs_src_path=str(path)))
        if path.suffix == ".md":
            _GENERATED[src] = src
    return files


@event_priority(-50)  # after mkdocs-macros-plugin: `{#q1}` anchors would read as Jinja comments
@_as_plugin_error
def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite repo links in generated pages (the macros have already been expanded)."""
    src = page.file.src_uri
    if src in _GENERATED:
        markdown = rewrite_repo_links(markdown, _GENERATED[src], src)
        if src == QUESTIONS_SRC:
            markdown = render_questions(markdown)
    return markdown


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """Rebuild on changes to the results, the questions log and docs/ as well."""
    for path in (results_root("cpu"), QUESTIONS_FILE, DOCS_DIR):
        if path.exists():
            server.watch(str(path))
    return server


# mkdocs loads this file by path as a second module object (named "lab/site/hooks.py"). Route its events to
# the one importable `lab.site.hooks`, so that state (`_GENERATED`) and settings (`DOCS_DIR`, patched by tests)
# are shared.
if __name__ != "lab.site.hooks":
    import lab.site.hooks as _canonical

    on_config = _canonical.on_config
    on_files = _canonical.on_files
    on_page_markdown = _canonical.on_page_markdown
    on_serve = _canonical.on_serve
