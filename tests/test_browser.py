"""The built site in headless Chromium: pages render, charts draw, math typesets, nothing leaves localhost; and the
same site opened from disk (file://).

Needs Debian's ``chromium`` (``./.ci/test`` installs it). Without it the test skips, unless
``LAB_REQUIRE_BROWSER=1`` (CI), where a missing browser is a failure.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from browsing import CHROMIUM_ARGS, QuietHandler, chromium

pytestmark = pytest.mark.browser

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def site_url(tmp_path_factory: pytest.TempPathFactory, smoke_results: Path) -> Iterator[tuple[str, Path]]:
    """Build the site on the smoke run's results and serve it on 127.0.0.1 from a thread."""
    chromium()
    from lab.site.build import build_site

    results = smoke_results
    site = tmp_path_factory.mktemp("browser") / "site"
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_RESULTS_DIR", str(results))
        mp.setenv("LAB_SITE_URL", base)  # Material's instant navigation needs the site's own URL
        build_site(site_dir=site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, site
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(site_url: tuple[str, Path]) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _pages(site: Path) -> list[str]:
    """Every built page, as a URL path (``"index.html"``, ``"tracks/pretrain.html"``, ...)."""
    out = []
    for html in sorted(site.rglob("*.html")):
        rel = html.relative_to(site).as_posix()
        if not rel.startswith("assets/") and rel != "404.html":
            out.append(rel)
    return out


def _rendered(page) -> tuple[int, int]:
    """Wait for every chart of the page to be drawn (without an error) and every formula typeset; their counts."""
    plots = page.locator(".lab-chart__plot")
    for i in range(plots.count()):
        plots.nth(i).locator("svg, canvas").first.wait_for(state="attached", timeout=15_000)
        assert "lab-chart__plot--error" not in (plots.nth(i).get_attribute("class") or "")
    formulas = page.locator(".arithmatex")
    for i in range(formulas.count()):
        formulas.nth(i).locator(".katex").first.wait_for(state="attached", timeout=10_000)
    return plots.count(), formulas.count()


class TestSiteInBrowser:
    """Every built page in headless Chromium."""

    def test_every_page_renders_offline(self, browser: object, site_url: tuple[str, Path]) -> None:
        base, site = site_url
        context = browser.new_context()
        requests: list[str] = []
        context.on("request", lambda r: requests.append(r.url))
        errors: list[str] = []
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        charts = math = 0
        pages = _pages(site)
        assert {"index.html", "tracks/pretrain.html", "questions.html", "blog/index.html"} <= set(pages)
        for path in pages:
            page.goto(base + path, wait_until="load")
            assert page.title().strip(), path
            # The blog's listing pages (blog/, its archive and categories) put their h1 in a header, not an article.
            assert page.locator("article h1, .md-content__inner > header h1").count() >= 1, path
            drawn, typeset = _rendered(page)
            charts, math = charts + drawn, math + typeset
        context.close()
        assert charts >= 2 and math >= 1, (charts, math)
        assert errors == []
        foreign = sorted({u for u in requests if urlparse(u).hostname not in LOCAL_HOSTS and not u.startswith("data:")})
        assert foreign == [], f"requests off localhost: {foreign}"
        assert not [u for u in requests if u.endswith(".vl.json")]  # every chart's spec is inlined in its page

    def test_charts_follow_dark_mode(self, browser: object, site_url: tuple[str, Path]) -> None:
        base, _ = site_url
        page = browser.new_page()
        page.goto(base, wait_until="networkidle")  # Material has fetched sitemap.xml: instant navigation is armed
        page.evaluate("window.__noReload = true")
        page.locator("a.md-footer__link--next").click()  # to Pretraining by Material's instant navigation
        page.wait_for_url(lambda url: urlparse(url).path.endswith("/tracks/pretrain.html"))
        assert page.evaluate("window.__noReload === true")  # the charts below were drawn without a reload
        plot = page.locator(".lab-chart__plot").first
        plot.locator("svg").wait_for(state="attached", timeout=15_000)
        white_labels = plot.locator('svg text[fill="#fff"]')
        assert page.evaluate("document.body.dataset.mdColorScheme") == "default"
        assert white_labels.count() == 0
        page.locator("label.md-header__button[for='__palette_1']").click()  # the dark-mode toggle
        page.wait_for_function("document.body.dataset.mdColorScheme === 'slate'")
        page.wait_for_function(
            "document.querySelector('.lab-chart__plot svg text[fill=\"#fff\"]') !== null", timeout=15_000
        )
        assert white_labels.count() > 0  # vega-embed's dark theme: light axis labels
        page.close()


class TestSiteFromDisk:
    """The built site opened as files (file://, no server): links open pages, charts draw from their inlined specs,
    math typesets, and the one feature that needs a server, search, says so."""

    def test_pages_work_from_file_urls(self, browser: object, site_url: tuple[str, Path]) -> None:
        _, site = site_url
        context = browser.new_context()
        requests: list[str] = []
        context.on("request", lambda r: requests.append(r.url))
        errors: list[str] = []
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto((site / "index.html").as_uri(), wait_until="load")
        page.locator("nav.md-nav a.md-nav__link[href$='tracks/pretrain.html']").first.click()  # a plain .html link
        page.wait_for_url(lambda url: url.endswith("/tracks/pretrain.html"))
        assert page.locator("article h1").count() == 1  # a page, not a folder listing
        charts = math = 0
        for path in ["tracks/pretrain.html", "tracks/D_bayes.html", "blog/2026/11/22/circuits-during-finetuning.html"]:
            page.goto((site / path).as_uri(), wait_until="load")
            drawn, typeset = _rendered(page)
            charts, math = charts + drawn, math + typeset
        assert charts >= 5 and math >= 5, (charts, math)
        search = page.locator("input.md-search__input")
        assert search.is_disabled() and "lab site serve" in (search.get_attribute("placeholder") or "")
        context.close()
        assert errors == []
        assert not [u for u in requests if not u.startswith(("file://", "data:"))], "requests off the disk"
