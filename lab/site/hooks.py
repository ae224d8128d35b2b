"""mkdocs hooks for the lab's site (loaded by ``hooks:`` in ``mkdocs.yml``).

What they do, in build order:

- ``on_config``: refuse to build without the bundled JS (``site-src/assets/vendor``) and add the
  hand-written ``docs/**.md`` pages to the navigation.
- ``on_files``: check the results (:func:`lab.site.checks.check_results`: no links, readable, finite, sha256 as
  the manifest records) and publish ``results/**`` (Parquet, ``.vl.json``, ``manifest.json``) under ``results/``,
  render the repo-root ``QUESTIONS.md`` as ``questions.md`` and ``docs/**`` under ``docs/``.
- ``on_page_markdown``: rewrite repo-relative links in those generated pages and expand the macros
  that put results on pages, so that no number is ever typed by hand::

      {{ chart("pretrain/loss", "Caption") }}               a Vega-Lite figure fetched from results/
      {{ value("pretrain/summary", "final_val_loss", ".3f") }}  one cell of a Parquet file
      {{ table("pretrain/samples", columns=["step", "text"], max_rows=5) }}
      {{ provenance("pretrain/summary") }}                  config, commit, packages, hardware

A result reference is ``"<track>/<name>"`` (cpu profile) or ``"<profile>/<track>/<name>"``, relative to
:func:`lab.results.results_root` (so ``LAB_RESULTS_DIR`` works). Macros inside code spans, fenced
code blocks and HTML comments are left alone. A missing result stops the build with the command that makes it.
"""

from __future__ import annotations

import ast
import html
import json
import posixpath
import re
from collections.abc import Callable
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

import polars as pl
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

from lab.errors import LabError
from lab.paths import REPO_ROOT, results_root
from lab.results import read_manifest
from lab.site.checks import RESULT_SUFFIXES, check_result_file, check_results
from lab.site.questions import read_log

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


# ----------------------------------------------------------------------------- results


def _result_ref(ref: str) -> tuple[str, str, str]:
    """``"pretrain/loss"`` -> ``("cpu", "pretrain", "loss")``; ``"gpu/A/x"`` -> ``("gpu", "A", "x")``."""
    parts = ref.strip("/").split("/")
    if len(parts) == 2:
        return "cpu", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise LabError(f"result reference {ref!r} should be 'track/name' or 'profile/track/name'")


def _result_file(ref: str, suffix: str) -> Path:
    profile, track, name = _result_ref(ref)
    path = results_root(profile) / track / f"{name}{suffix}"
    if not path.exists():
        raise LabError(
            f"{path} is missing (needed by the site): run `lab run {track} --profile {profile}` "
            f"(or `python notebooks/{track}.py -- --profile {profile}`) to produce it"
        )
    return path


def _site_path(ref: str, suffix: str) -> str:
    """Site path of a result file, e.g. ``results/pretrain/loss.vl.json``."""
    profile, track, name = _result_ref(ref)
    prefix = "results" if profile == "cpu" else f"results/{profile}"
    return f"{prefix}/{track}/{name}{suffix}"


@lru_cache(maxsize=64)
def _read_parquet(path: Path, mtime: float) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception:  # a damaged file: say which and how to fix it, not polars' traceback
        raise LabError(check_result_file(path) or f"{path} is not readable Parquet") from None


def read_frame(ref: str) -> pl.DataFrame:
    """The Parquet frame behind a result reference."""
    path = _result_file(ref, ".parquet")
    return _read_parquet(path, path.stat().st_mtime)


def read_provenance(ref: str) -> dict[str, Any]:
    """The manifest entry of a result reference."""
    profile, track, name = _result_ref(ref)
    path = results_root(profile) / track / "manifest.json"
    manifest = read_manifest(path) if path.exists() else {}
    if name not in manifest:
        raise LabError(f"{path} has no entry for {name!r}: run `lab run {track} --profile {profile}` to produce it")
    return manifest[name]


# ----------------------------------------------------------------------------- formatting


def format_cell(value: Any, fmt: str | None = None) -> str:
    """Format one value: ``fmt`` if given, else ints plainly and floats to 4 significant digits."""
    if value is None:
        return "—"
    if fmt:
        return format(value, fmt)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


_MD_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|$~^])")


def escape_markdown_cell(text: str) -> str:
    """Make arbitrary text safe inside a Markdown table cell (pipes, newlines, HTML, math, emphasis)."""
    text = html.escape(text, quote=False)
    # Numeric character references, not backslashes: "\\(" would open arithmatex math.
    text = _MD_SPECIALS.sub(lambda m: f"&#{ord(m.group(1))};", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return text.replace("\n", "<br>")


# ----------------------------------------------------------------------------- macros


def macro_chart(page_url: str, ref: str, caption: str = "") -> str:
    """A ``<figure class="lab-chart">`` whose plot div names the spec URL relative to the page."""
    _result_file(ref, ".vl.json")
    spec_url = get_relative_url(_site_path(ref, ".vl.json"), page_url)
    profile, track, _name = _result_ref(ref)
    data = ""
    try:
        _result_file(ref, ".parquet")
        data_url = get_relative_url(_site_path(ref, ".parquet"), page_url)
        data = f' Data: <a href="{html.escape(data_url)}">{html.escape(posixpath.basename(data_url))}</a>.'
    except LabError:
        pass
    return (
        '<figure class="lab-chart">\n'
        f'<div class="lab-chart__plot" data-spec="{html.escape(spec_url)}" '
        f'role="img" aria-label="{html.escape(caption)}"></div>\n'
        f"<figcaption>{html.escape(caption)}{data} Made by <code>lab run {track} --profile {profile}</code> "
        f"(notebook <code>notebooks/{track}.py</code>).</figcaption>\n"
        "</figure>\n"
    )


def macro_value(ref: str, column: str, fmt: str | None = None, row: int = -1) -> str:
    """One cell of a result's Parquet: the last row (or ``row``) of ``column``, formatted."""
    frame = read_frame(ref)
    if column not in frame.columns:
        raise LabError(f"result {ref!r} has no column {column!r} (columns: {', '.join(frame.columns)})")
    if frame.height == 0:
        raise LabError(f"result {ref!r} is empty: re-run `lab run {_result_ref(ref)[1]}`")
    value = frame[column][row]
    if value is None:
        raise LabError(f"result {ref!r} column {column!r} row {row} is null")
    try:
        return format_cell(value, fmt)
    except (ValueError, TypeError) as e:
        raise LabError(f"value({ref!r}, {column!r}): format {fmt!r} does not fit {value!r}: {e}") from e


def macro_table(
    ref: str,
    columns: list[str] | None = None,
    max_rows: int | None = None,
    formats: dict[str, str] | None = None,
) -> str:
    """A Markdown table of a result's Parquet (optionally some columns / the first ``max_rows`` rows)."""
    frame = read_frame(ref)
    columns = list(columns) if columns else frame.columns
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise LabError(f"result {ref!r} has no column(s) {missing} (columns: {', '.join(frame.columns)})")
    frame = frame.select(columns)
    if max_rows is not None:
        frame = frame.head(max_rows)
    formats = formats or {}
    lines = [
        "| " + " | ".join(escape_markdown_cell(c) for c in columns) + " |",
        "| " + " | ".join("---:" if frame[c].dtype.is_numeric() else "---" for c in columns) + " |",
    ]
    for row in frame.iter_rows():
        cells = [escape_markdown_cell(format_cell(v, formats.get(c))) for c, v in zip(columns, row, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n\n" + "\n".join(lines) + "\n\n"


def macro_provenance(ref: str) -> str:
    """A collapsed admonition with the commit, profile, seed, wall time, packages and hardware of a result."""
    rec = read_provenance(ref)
    packages = ", ".join(f"{k} {v}" for k, v in (rec.get("packages") or {}).items())
    hardware = ", ".join(f"{k}: {v}" for k, v in (rec.get("hardware") or {}).items())
    wall = rec.get("wall_time_s")
    items = [
        ("git commit", f"`{rec.get('git_commit', 'unknown')}`"),
        ("profile", f"`{rec.get('profile')}`"),
        ("seed", f"`{rec.get('seed')}`"),
        ("wall time", f"{wall:,.1f} s" if isinstance(wall, (int, float)) else "unknown"),
        ("written at", str(rec.get("written_at", "unknown"))),
        ("packages", packages or "unknown"),
        ("hardware", hardware or "unknown"),
    ]
    body = [f"- **{k}:** {v}" for k, v in items]
    config = json.dumps(rec.get("config", {}), indent=1, sort_keys=True)
    body += ["", "```json", *config.splitlines(), "```"]
    return (
        f'\n\n??? info "Provenance of `{ref}`"\n' + "".join(f"    {line}\n" if line else "\n" for line in body) + "\n"
    )


MACROS = {"chart": macro_chart, "value": macro_value, "table": macro_table, "provenance": macro_provenance}

# A code fence / code span / HTML comment (left alone) or a macro call ``{{ name(args) }}``.
_MACRO_RE = re.compile(
    r"(?P<code>^(?P<fence>[ \t]*(?:`{3,}|~{3,})).*?^(?P=fence)[ \t]*$|`[^`\n]+`|<!--.*?-->)"
    r"|\{\{\s*(?P<name>[A-Za-z_]\w*)\s*\((?P<args>.*?)\)\s*\}\}",
    re.DOTALL | re.MULTILINE,
)


def _parse_args(name: str, args: str) -> tuple[list[Any], dict[str, Any]]:
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        assert isinstance(call, ast.Call)
        return [ast.literal_eval(a) for a in call.args], {
            k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg
        }
    except (SyntaxError, ValueError, AssertionError) as e:
        raise LabError(f"macro {name}({args}): arguments must be Python literals ({e})") from e


def expand_macros(markdown: str, page_url: str) -> str:
    """Expand every ``{{ chart|value|table|provenance(...) }}`` in ``markdown`` for the page at ``page_url``."""

    def replace(m: re.Match[str]) -> str:
        if m.group("code"):
            return m.group("code")
        name = m.group("name")
        if name not in MACROS:
            raise LabError(f"unknown macro {{{{ {name}(...) }}}}: use one of {', '.join(MACROS)}")
        args, kwargs = _parse_args(name, m.group("args"))
        if name == "chart":
            args = [page_url, *args]
        try:
            return MACROS[name](*args, **kwargs)
        except TypeError as e:
            raise LabError(f"macro {name}({m.group('args')}): {e}") from e

    return _MACRO_RE.sub(replace, markdown)


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
        add(File.generated(config, f"results/{path.relative_to(base).as_posix()}", abs_src_path=str(path)))

    if QUESTIONS_FILE.exists():
        add(File.generated(config, QUESTIONS_SRC, content=read_log(QUESTIONS_FILE)))
        _GENERATED[QUESTIONS_SRC] = "QUESTIONS.md"
    for path in _docs_files():
        src = f"docs/{path.relative_to(DOCS_DIR).as_posix()}"
        add(File.generated(config, src, abs_src_path=str(path)))
        if path.suffix == ".md":
            _GENERATED[src] = src
    return files


@_as_plugin_error
def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite repo links in generated pages, then expand result macros."""
    src = page.file.src_uri
    if src in _GENERATED:
        markdown = rewrite_repo_links(markdown, _GENERATED[src], src)
        if src == QUESTIONS_SRC:
            markdown = render_questions(markdown)
    return expand_macros(markdown, page.url)


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
