"""The README's pictures, taken by the lab's own browser (Debian chromium through Playwright, as the browser test):
the site's home page and one track page, built from the committed results into a temporary folder and served on
127.0.0.1, and one app and the app gallery, served by ``marimo run``. Writes small PNGs into docs/img/.

    .venv/bin/python .ci/screenshots.py              # every picture
    .venv/bin/python .ci/screenshots.py --only site  # site-home.png and site-track.png

Nothing is fetched from another host (the site and the apps are offline). PNGs are shrunk with ``pngquant`` when it
is installed (``apt-get install pngquant``); each is checked to stay under 300 KB.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
WINDOW = {"width": 1280, "height": 900}
MAX_BYTES = 300_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
SITE_PAGES = {"site-home.png": "index", "site-track.png": "tracks/B_attention"}  # the track page: at its first chart
APP = "B_attention"  # the app pictured: live attention patterns with layer/head sliders


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shrink(png: Path) -> None:
    """Quantise to 256 colours with pngquant when it is installed (a screenshot of text loses nothing visible)."""
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--output", str(png), "256", str(png)], check=False)
    size = png.stat().st_size
    print(f"{png.relative_to(ROOT)}: {size / 1000:.0f} KB")
    if size > MAX_BYTES:
        raise SystemExit(f"{png.name} is {size / 1000:.0f} KB, over {MAX_BYTES // 1000} KB: install pngquant")


def _block_other_hosts(context) -> None:
    """Refuse every request that leaves 127.0.0.1 (the pictures must show what an offline reader sees)."""
    context.route(
        "**/*",
        lambda route: (
            route.continue_()
            if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))
            else route.abort()
        ),
    )


def _page_path(site: Path, name: str) -> str:
    """A page's URL path in the built site, with directory URLs (``tracks/x/``) or plain files (``tracks/x.html``)."""
    if name == "index":
        return ""
    return f"{name}/" if (site / name / "index.html").exists() else f"{name}.html"


def site(browser) -> None:
    """Build the site from the committed results into a temporary folder, serve it and picture two pages."""
    sys.path.insert(0, str(ROOT))
    from lab.site.build import build_site

    with tempfile.TemporaryDirectory(prefix="lab-screenshots-") as tmp:
        folder = Path(tmp) / "site"
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        os.environ["LAB_SITE_URL"] = base
        build_site(site_dir=folder)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            context = browser.new_context(viewport=WINDOW, color_scheme="light")
            _block_other_hosts(context)
            page = context.new_page()
            for name, page_name in SITE_PAGES.items():
                response = page.goto(base + _page_path(folder, page_name), wait_until="networkidle")
                if response is None or response.status != 200:
                    raise SystemExit(
                        f"{page_name}: the built site has no such page (HTTP {response and response.status})"
                    )
                plots = page.locator(".lab-chart__plot")
                for i in range(plots.count()):
                    plots.nth(i).locator("svg, canvas").first.wait_for(state="attached", timeout=30_000)
                if page_name != "index" and plots.count():  # one jump down (scrolling up shows "Back to top")
                    top = page.evaluate(
                        "e => e.getBoundingClientRect().top + window.scrollY", plots.first.element_handle()
                    )
                    page.evaluate("y => window.scrollTo(0, y)", max(0, top - 330))  # the chart and the text above
                page.wait_for_timeout(800)
                page.screenshot(path=str(OUT / name))
                _shrink(OUT / name)
            context.close()
        finally:
            server.shutdown()
            server.server_close()


def _marimo(target: Path, port: int) -> subprocess.Popen:
    marimo = Path(sys.executable).with_name("marimo")
    cmd = [str(marimo), "run", str(target), "--headless", "--no-token", "--port", str(port), "--no-skew-protection"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"marimo run {target} did not start on port {port}")


def apps(browser) -> None:
    """Picture the app gallery (``marimo run notebooks/``) and one app, each served by marimo."""
    for name, target, ready in (
        ("apps-gallery.png", ROOT / "notebooks", "text=Attention"),
        ("app-attention.png", ROOT / "notebooks" / f"{APP}.py", "text=Every head on your prompt"),
    ):
        port = _free_port()
        proc = _marimo(target, port)
        try:
            context = browser.new_context(viewport=WINDOW, color_scheme="light")
            _block_other_hosts(context)
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.locator(ready).first.wait_for(timeout=180_000)
            page.wait_for_timeout(3000)  # charts draw after their cell's output arrives
            page.screenshot(path=str(OUT / name))
            _shrink(OUT / name)
            context.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["site", "apps"], default=None)
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian chromium is not installed (apt-get install chromium; ./.ci/test does it)")
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            if args.only in (None, "site"):
                site(browser)
            if args.only in (None, "apps"):
                apps(browser)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
