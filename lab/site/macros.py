"""The macros that put results on the site's pages, so that no number is typed by hand.

mkdocs-macros-plugin renders every page as a Jinja template (``macros:`` in ``mkdocs.yml``, ``module_name:
lab/site/macros``) and calls :func:`define_env`, which registers::

    {{ chart("pretrain/loss", "Caption") }}                  a Vega-Lite figure (spec loaded as a script: file:// too)
    {{ value("pretrain/summary", "final_val_loss", ".3f") }}  one cell of a Parquet file (or of a chart's data)
    {{ datum("pretrain/summary", "iters") }}                  the same cell as a number, for Jinja arithmetic
    {{ table("pretrain/samples", columns={"step": "Step", "text": "Generated text"}, max_rows=5) }}
    {{ provenance("pretrain/summary") }}                      config, commit, packages, hardware
    {{ claim("pretrain/summary", "final_val_loss", "<", 1.88, fmt=".3f") }}   a headline, checked
    {{ graphs("<track>", "Caption") }}                         the attribution-graph viewer over results/<track>/graphs

References and the ``row`` / ``where`` / ``sort`` / ``data`` selection are :mod:`lab.site.sources`'s; number
formats :mod:`lab.site.formatting`'s; claims :mod:`lab.site.claims`'s; a chart's caption is checked against the
chart by :mod:`lab.site.captions`. Jinja renders code blocks too: a page that shows ``{{ ... }}`` literally wraps it
in ``{% raw %}...{% endraw %}``. Any macro error stops the build (``on_error_fail``) with one line naming the page.
"""

from __future__ import annotations

import html
import json
import logging
import posixpath
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from typing import Any

from mkdocs.utils import get_relative_url

from lab.errors import LabError
from lab.paths import results_root
from lab.site import sources
from lab.site.captions import caption_problems
from lab.site.claims import claim
from lab.site.formatting import escape_markdown_cell, format_cell, human_header

log = logging.getLogger("mkdocs.plugins.lab")
GRAPH_SCRIPT_SUFFIX = ".graph.js"  # a graph as a script: window.LabGraphs["<slug>"] = {...circuit-tracer JSON...}
SPEC_SCRIPT_SUFFIX = ".vl.js"  # a chart's spec as a script: window.LabSpecs["results/<track>/<name>.vl.json"] = {...}
ERRORS: list[str] = []  # this build's macro errors, one line each (lab.site.build reports them)


class PageMacros:
    """The macros for the page ``page()`` names: ``(src_uri, url)``, e.g. ``("tracks/x.md", "tracks/x.html")``."""

    def __init__(self, page: Callable[[], tuple[str, str]]) -> None:
        self.page = page

    def functions(self) -> dict[str, Callable[..., Any]]:
        """Every macro by name, each reporting its errors with the page."""
        macros = {
            "chart": self.chart,
            "value": self.value,
            "datum": self.datum,
            "table": self.table,
            "provenance": self.provenance,
            "claim": claim,
            "graphs": self.graphs,
        }
        return {name: self._reported(name, fn) for name, fn in macros.items()}

    def _reported(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (LabError, TypeError) as e:
                call = f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
                page = f"page {self.page()[0]}"
                message = f"{page}: {e}" if str(e).startswith(f"{name}(") else f"{page}: {call}: {e}"
            ERRORS.append(message)
            log.error(message)
            # The plugin %-formats its report around the message: escape "%" so that the report can be made.
            raise LabError(message.replace("%", "%%"))

        return run

    def _link_from_url(self, ref: str, suffix: str) -> str:
        return get_relative_url(sources.site_path(ref, suffix), self.page()[1])

    def _link_from_src(self, ref: str, suffix: str) -> str:
        return posixpath.relpath(sources.site_path(ref, suffix), posixpath.dirname(self.page()[0]) or ".")

    def chart(self, ref: str, caption: str = "") -> str:
        """A ``<figure class="lab-chart">`` drawn by ``assets/lab-charts.js`` from the spec that a ``<script>`` loads
        beside it (``results/.../<name>.vl.js``, written by the hooks: a script works from file://, a fetch does not),
        its caption checked against the chart, and links to the data behind it."""
        spec = sources.read_spec(ref)
        if problems := caption_problems(spec, caption):
            raise LabError(f"the caption of chart {ref!r} does not match the chart: {'; '.join(problems)}")
        profile, track, name = sources.result_ref(ref)
        links = [("chart spec", ".vl.json")]
        try:
            sources.result_file(ref, ".parquet")
            links = [(f"{name}.parquet", ".parquet"), ("CSV", ".csv"), *links]
        except LabError:
            pass
        data = " · ".join(f'<a href="{html.escape(self._link_from_url(ref, s))}">{t}</a>' for t, s in links)
        return (
            '<figure class="lab-chart">\n'
            f'<div class="lab-chart__plot" data-spec="{sources.site_path(ref, ".vl.json")}" role="img" '
            f'aria-label="{html.escape(caption)}"></div>\n'
            f'<script src="{html.escape(self._link_from_url(ref, SPEC_SCRIPT_SUFFIX))}"></script>\n'
            f"<figcaption>{html.escape(caption)} Data: {data}. Made by <code>lab run {track} --profile {profile}"
            f"</code> (notebook <code>notebooks/{track}.py</code>).</figcaption>\n"
            "</figure>\n"
        )

    def graphs(self, track: str, caption: str = "") -> str:
        """The attribution-graph viewer (``assets/graphs/lab-graphs.js``) over every circuit-tracer graph in
        ``results/<track>/graphs/`` (``<prompt>-stage-<i>.json``; stage 0 is the base model), each loaded as the
        script the hooks write beside it (``GRAPH_SCRIPT_SUFFIX``), with a picker."""
        folder = results_root("cpu") / track / "graphs"
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not files:
            raise LabError(f"{folder} holds no graphs: run `lab run {track}` to produce them")
        entries = []
        for f in files:
            prompt, _, stage = f.stem.rpartition("-stage-")
            when = "base model" if stage == "0" else f"fine-tune checkpoint {stage}"
            src = get_relative_url(f"results/{track}/graphs/{f.stem}{GRAPH_SCRIPT_SUFFIX}", self.page()[1])
            name = f"seed prompt {int(prompt[5:]) + 1}" if prompt.removeprefix("seed-").isdigit() else prompt
            entries.append({"label": f"{name} · {when}", "key": f.stem, "src": src})
        data = html.escape(json.dumps(entries), quote=True)
        return (
            '<figure class="lab-chart">\n'
            f'<div class="lab-graph" data-graphs="{data}" role="img" aria-label="{html.escape(caption)}"></div>\n'
            f"<figcaption>{html.escape(caption)} Data: circuit-tracer JSON in <code>results/{track}/graphs/</code>. "
            f"Made by <code>lab run {track} --profile cpu</code>.</figcaption>\n"
            "</figure>\n"
        )

    @staticmethod
    def datum(
        ref: str,
        column: str,
        row: int = -1,
        where: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
        data: str = "parquet",
    ) -> Any:
        """One cell as it is stored (a number stays a number): for Jinja arithmetic and claim targets."""
        return sources.cell(ref, column, row=row, where=where, sort=sort, data=data)

    def value(
        self,
        ref: str,
        column: str,
        fmt: str | None = None,
        row: int = -1,
        where: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
        data: str = "parquet",
    ) -> str:
        """One cell, formatted: row ``row`` (default the last, after ``where`` and ``sort``) of ``column``."""
        return format_cell(self.datum(ref, column, row=row, where=where, sort=sort, data=data), fmt)

    def table(
        self,
        ref: str,
        columns: Sequence[str] | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        formats: Mapping[str, str] | None = None,
        max_rows: int | None = None,
        where: Mapping[str, Any] | None = None,
        sort: str | Sequence[str] | None = None,
    ) -> str:
        """A Markdown table of some columns of a result, with human headers (``columns`` as a mapping, or
        ``headers``), numbers to meaningful digits (``formats`` per column overrides), and a link to the full data
        (the Parquet and its CSV)."""
        headers = {**(columns if isinstance(columns, Mapping) else {}), **(headers or {})}
        frame = sources.select(ref, list(columns or []), where=where, sort=sort)
        names = list(columns) if columns else frame.columns
        if unknown := [c for c in [*headers, *(formats or {})] if c not in names]:
            raise LabError(f"headers/formats name column(s) {unknown} that the table does not show ({names})")
        total = frame.height
        frame = frame.select(names).head(max_rows) if max_rows is not None else frame.select(names)
        formats = formats or {}
        lines = [
            "| " + " | ".join(escape_markdown_cell(headers.get(c, human_header(c))) for c in names) + " |",
            "| " + " | ".join("---:" if frame[c].dtype.is_numeric() else "---" for c in names) + " |",
        ]
        for row in frame.iter_rows():
            cells = [escape_markdown_cell(format_cell(v, formats.get(c))) for c, v in zip(names, row, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
        _profile, _track, name = sources.result_ref(ref)
        shown = f"The first {frame.height} of {total} rows. " if frame.height < total else ""
        data = (
            f"{shown}Full data: [{name}.parquet]({self._link_from_src(ref, '.parquet')}) · "
            f"[{name}.csv]({self._link_from_src(ref, '.csv')})"
        )
        return "\n\n" + "\n".join(lines) + "\n\n" + data + "\n{: .lab-table__data }\n\n"

    @staticmethod
    def provenance(ref: str) -> str:
        """A collapsed admonition with the commit, profile, seed, wall time, packages and hardware of a result."""
        rec = sources.read_provenance(ref)
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
        indented = "".join(f"    {line}\n" if line else "\n" for line in body)
        return f'\n\n??? info "Provenance of `{ref}`"\n{indented}\n'


def define_env(env: Any) -> None:
    """mkdocs-macros-plugin's entry point: register the macros for the page being rendered."""
    ERRORS.clear()
    for name, fn in PageMacros(lambda: (env.page.file.src_uri, env.page.url)).functions().items():
        env.macro(fn, name)


def render(markdown: str, src_uri: str = "index.md", url: str | None = None) -> str:
    """Render ``markdown`` with the site's macros outside a build (tests, previews), as the plugin would for the page
    ``src_uri`` (published at ``url``, by default ``src_uri`` with ``.html``)."""
    import jinja2

    url = url if url is not None else src_uri.removesuffix(".md") + ".html"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals.update(PageMacros(lambda: (src_uri, url)).functions())
    return env.from_string(markdown).render()


# mkdocs-macros-plugin loads this file by path as a second module object (named "lab/site/macros"). Hand it the
# one importable `lab.site.macros`'s entry point, so that ERRORS is shared with lab.site.build.
if __name__ != "lab.site.macros":
    import lab.site.macros as _canonical

    define_env = _canonical.define_env
