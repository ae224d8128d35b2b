"""Every chart of the built site drawn at full size inside the text column, at a 1280-px window and a 390-px phone.

For each ``.lab-chart__plot`` of every page, headless Chromium measures the chart's SVG: the size Vega drew it at
(its ``width``/``height`` attributes) against the size the page shows it at, and its edges against the content
column (Material's ``article``, padding excluded). A chart fails when it is shown below 95 % of its drawn size
(CSS shrank it), when it reaches past the column (cut off or scrolled), or when any of its text is shown smaller
than 10 px. Every bound input (``params`` with ``bind``) must lie inside the column too.

The site is built from ``results_root()`` (the committed results, or ``$LAB_RESULTS_DIR``): what a reader gets.
Needs Debian's ``chromium``; without it the test skips, unless ``LAB_REQUIRE_BROWSER=1`` (CI), where a missing
browser is a failure.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from browsing import CHROMIUM_ARGS, QuietHandler, chromium

pytestmark = pytest.mark.browser

WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
MIN_SCALE = 0.95  # a chart shown below this share of its drawn size was shrunk to fit
MIN_TEXT_PX = 10.0
SLACK_PX = 1.0  # sub-pixel rounding at the column's edges

# Per chart: its drawn size, the size shown, the column's edges, the smallest text shown, the inputs' edges.
MEASURE = """
(plot) => {
  const svg = plot.querySelector("svg");
  const col = plot.closest("article") || plot.closest(".md-content__inner") || document.body;
  const cs = getComputedStyle(col);
  const c = col.getBoundingClientRect();
  const left = c.left + parseFloat(cs.paddingLeft), right = c.right - parseFloat(cs.paddingRight);
  if (!svg) return {missing: true, left, right};
  const r = svg.getBoundingClientRect();
  const drawnW = parseFloat(svg.getAttribute("width")), drawnH = parseFloat(svg.getAttribute("height"));
  const scale = r.width / drawnW;
  let minText = Infinity, smallest = "";
  svg.querySelectorAll("text").forEach((t) => {
    if (!t.textContent.trim() || t.getAttribute("opacity") === "0") return;
    const px = parseFloat(getComputedStyle(t).fontSize) * scale;
    if (px < minText) { minText = px; smallest = t.textContent.trim().slice(0, 30); }
  });
  const inputs = Array.from(plot.querySelectorAll(".vega-bindings input, .vega-bindings select")).map((i) => {
    const b = i.getBoundingClientRect();
    return [b.left, b.right];
  });
  return {missing: false, left, right, x0: r.left, x1: r.right, shownW: r.width, shownH: r.height,
          drawnW, drawnH, scale, minText, smallest, inputs,
          label: ((plot.closest("figure") || plot).querySelector("figcaption") || plot).textContent.slice(0, 50)};
}
"""


def chart_problems(m: dict, where: str) -> list[str]:
    """What is wrong with one measured chart (empty: it fits), one line each."""
    if m["missing"]:
        return [f"{where}: no chart drawn"]
    if not (m["drawnW"] or 0) > 0 or not m["shownW"] > 0:  # NaN or zero: Vega drew nothing (a spec it refused)
        return [f"{where}: drawn at zero width"]
    out = []
    if m["scale"] < MIN_SCALE:
        out.append(f"{where}: shown at {m['scale']:.0%} of its drawn width ({m['shownW']:.0f} of {m['drawnW']:.0f} px)")
    if m["x1"] > m["right"] + SLACK_PX or m["x0"] < m["left"] - SLACK_PX:
        out.append(
            f"{where}: reaches past the column ({m['x0']:.0f}..{m['x1']:.0f} px, "
            f"column {m['left']:.0f}..{m['right']:.0f})"
        )
    if m["minText"] < MIN_TEXT_PX - 0.05:
        out.append(f"{where}: text shown at {m['minText']:.1f} px ({m['smallest']!r}); at least {MIN_TEXT_PX:.0f} px")
    for x0, x1 in m["inputs"]:
        if x1 > m["right"] + SLACK_PX or x0 < m["left"] - SLACK_PX:
            out.append(f"{where}: an input reaches past the column ({x0:.0f}..{x1:.0f} px)")
    return out


def pages(site: Path) -> list[str]:
    """Every built page with a chart, as a path relative to the site (``tracks/pretrain.html``, ...)."""
    found = []
    for html in sorted(site.rglob("*.html")):
        rel = html.relative_to(site).as_posix()
        if not rel.startswith(("assets/", "search/")) and "lab-chart__plot" in html.read_text(encoding="utf-8"):
            found.append(rel)
    return found


def measure_site(browser: object, base: str, site: Path, width: int, height: int) -> tuple[list[str], list[dict]]:
    """(problems, measurements) of every chart of every page at one window size."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    problems, rows = [], []
    for path in pages(site):
        page.goto(base + path, wait_until="load")
        plots = page.locator(".lab-chart__plot")
        for i in range(plots.count()):
            plot = plots.nth(i)
            plot.locator("svg").first.wait_for(state="attached", timeout=20_000)
        page.wait_for_timeout(300)  # container-width charts re-layout once after their first draw
        for i in range(plots.count()):
            m = plots.nth(i).evaluate(MEASURE)
            m["page"], m["index"] = path, i
            rows.append(m)
            problems += chart_problems(m, f"{path} chart {i + 1} ({m.get('label', '')!r}) at {width} px")
    context.close()
    return problems + [f"page error: {e}" for e in errors], rows


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """``folder`` served on 127.0.0.1 from a thread: yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def built_site(browser: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The site built from ``results_root()`` (committed results unless ``$LAB_RESULTS_DIR``), served locally."""
    from lab.site.build import build_site

    site = tmp_path_factory.mktemp("browser-charts") / "site"
    build_site(site_dir=site)
    with served(site) as base:
        yield base, site


@pytest.mark.parametrize("window", list(WIDTHS))
def test_every_chart_fits_its_column(browser: object, built_site: tuple[str, Path], window: str) -> None:
    base, site = built_site
    width, height = WIDTHS[window]
    problems, rows = measure_site(browser, base, site, width, height)
    assert len(rows) >= 40, f"only {len(rows)} charts found on {len(pages(site))} pages"
    assert problems == [], f"{len(problems)} problems at {width} px:\n" + "\n".join(problems)
    explorable = {r["page"] for r in rows if r["inputs"]}
    tracks = {r["page"] for r in rows if r["page"].startswith("tracks/")}
    assert tracks and tracks <= explorable, f"track pages with no chart to explore: {sorted(tracks - explorable)}"


# --------------------------------------------------------------------------- the measurement on known pages

VENDOR = Path(__file__).resolve().parent.parent / "site-src" / "assets" / "vendor"
_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<style>body {{ margin: 0 }} article {{ width: {column}px; padding: 0 20px; }}
.lab-chart__plot {{ width: 100%; }} .lab-chart__plot svg {{ max-width: 100%; height: auto; }}</style>
<script src="vega.min.js"></script><script src="vega-lite.min.js"></script><script src="vega-embed.min.js"></script>
</head><body><article><div class="lab-chart__plot" id="c"></div></article>
<script>vegaEmbed("#c", {spec}, {{actions: false, renderer: "svg"}})
  .then(() => document.body.dataset.done = 1);</script>
</body></html>"""


def _measure_spec(browser: object, tmp_path: Path, spec: dict, column: int = 600) -> list[str]:
    import json

    for name in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"):
        shutil.copy(VENDOR / name, tmp_path / name)
    (tmp_path / "index.html").write_text(_PAGE.format(column=column, spec=json.dumps(spec)))
    with served(tmp_path) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(base + "index.html")
        page.wait_for_function("document.body.dataset.done === '1'", timeout=20_000)
        page.wait_for_timeout(200)
        m = page.locator(".lab-chart__plot").evaluate(MEASURE)
        page.close()
    return chart_problems(m, "test page")


_BARS = {"values": [{"k": "a", "v": 1}, {"k": "b", "v": 2}]}


def test_a_chart_wider_than_its_column_is_caught(browser: object, tmp_path: Path) -> None:
    """A 1000-px chart in a 600-px column: CSS shrinks it to about 60 %, which the measurement reports."""
    spec = {
        "data": _BARS,
        "mark": "bar",
        "encoding": {"x": {"field": "k"}, "y": {"field": "v", "type": "quantitative"}},
        "width": 1000,
        "height": 100,
    }
    problems = _measure_spec(browser, tmp_path, spec)
    assert any("of its drawn width" in p for p in problems), problems


def test_small_text_is_caught(browser: object, tmp_path: Path) -> None:
    spec = {
        "data": _BARS,
        "mark": "bar",
        "encoding": {"x": {"field": "k"}, "y": {"field": "v", "type": "quantitative"}},
        "width": 200,
        "height": 100,
        "config": {"axis": {"labelFontSize": 7}},
    }
    problems = _measure_spec(browser, tmp_path, spec)
    assert any("text shown at 7.0 px" in p for p in problems), problems


def test_a_container_width_chart_passes(browser: object, tmp_path: Path) -> None:
    """The house style (``lab.plots``): container width, 10-px text, fits exactly."""
    import altair as alt
    import polars as pl

    from lab.plots import style

    chart = alt.Chart(pl.DataFrame({"k": ["a", "b"], "v": [1, 2]})).mark_bar().encode(x="k:N", y="v:Q")
    assert _measure_spec(browser, tmp_path, style(chart).to_dict()) == []


# --------------------------------------------------------------------------- the attribution-graph viewer

GRAPHS = Path(__file__).resolve().parent.parent / "results" / "E_circuits" / "graphs"
VIEWER = Path(__file__).resolve().parent.parent / "site-src" / "assets" / "graphs"


@pytest.mark.parametrize("column", [688, 358])
def test_the_graph_viewer_draws_a_committed_graph_inside_the_column(
    browser: object, tmp_path: Path, column: int
) -> None:
    """``assets/graphs/lab-graphs.js`` on a page listing two committed circuit-tracer graphs, each registered by a
    script (as from disk): the first is drawn with every node, inside the column, text at least 10 px; the
    picker switches to the second."""
    import json

    files = sorted(GRAPHS.glob("*.json"))[:2]
    if len(files) < 2:
        pytest.skip("fewer than two committed attribution graphs")
    for name in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"):
        shutil.copy(VENDOR / name, tmp_path / name)
    shutil.copy(VIEWER / "lab-graphs.js", tmp_path / "lab-graphs.js")
    listed = []
    for f in files:
        key = f.stem
        (tmp_path / f"{key}.js").write_text(
            f"window.LabGraphs = window.LabGraphs || {{}};\nwindow.LabGraphs[{json.dumps(key)}] = {f.read_text()};\n"
        )
        listed.append({"label": key, "key": key, "src": f"{key}.js"})
    (tmp_path / "index.html").write_text(
        f"""<!doctype html><html><head><meta charset="utf-8">
<style>body {{ margin: 0 }} article {{ width: {column}px; padding: 0 20px; }} .lab-graph__plot {{ width: 100%; }}
.lab-graph__plot svg {{ max-width: 100%; height: auto; }}</style>
<script src="vega.min.js"></script><script src="vega-lite.min.js"></script><script src="vega-embed.min.js"></script>
</head><body><article><div class="lab-graph" data-graphs='{json.dumps(listed)}'></div></article>
<script src="lab-graphs.js"></script></body></html>"""
    )
    with served(tmp_path) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "index.html")
        plot = page.locator(".lab-graph__plot")
        plot.locator("svg").wait_for(state="attached", timeout=20_000)
        page.wait_for_timeout(300)
        m = plot.evaluate(MEASURE)
        assert chart_problems(m, "graph viewer") == []
        drawn = plot.locator("svg g.mark-symbol.role-mark path").count()
        nodes = len(json.loads(files[0].read_text())["nodes"])
        assert drawn == nodes, (drawn, nodes)
        page.locator(".lab-graph select").select_option("1")
        page.wait_for_timeout(800)
        second = len(json.loads(files[1].read_text())["nodes"])
        assert plot.locator("svg g.mark-symbol.role-mark path").count() == second
        page.close()
    assert errors == []
