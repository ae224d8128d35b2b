"""Build and serve the lab's static site (mkdocs-material; macros in :mod:`lab.site.macros`, hooks in
:mod:`lab.site.hooks`).

``build_site()`` is what ``lab site build`` runs; ``serve_site()`` is ``lab site serve``. The built ``site/`` also
works opened from disk (``site/index.html``): plain ``.html`` links and charts inlined in their pages; only search
needs the server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.paths import REPO_ROOT, results_root

CONFIG_FILE = REPO_ROOT / "mkdocs.yml"
VENDOR_DIR = REPO_ROOT / "site-src" / "assets" / "vendor"


def _check_vendor() -> None:
    from lab.site.hooks import VENDOR_FILES

    missing = [f for f in VENDOR_FILES if not (VENDOR_DIR / f).exists()]
    if missing:
        raise LabError(f"the site's bundled JS is missing from {VENDOR_DIR} ({', '.join(missing)}): run ./.ci/setup")


def _check_results() -> None:
    """Refuse to build from results that fail their checks, listing every problem, one per line."""
    from lab.site.checks import check_results
    from lab.site.hooks import SKIPPED_PROFILES

    if problems := check_results(results_root("cpu"), skip=SKIPPED_PROFILES):
        raise LabError("\n".join(problems))


class _Collect(logging.Handler):
    """Keeps mkdocs' warnings and errors so a failed build can say why in one exception."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip()
        if msg and msg not in self.messages:
            self.messages.append(msg)


def build_site(site_dir: Path | None = None, strict: bool = True, **overrides: Any) -> Path:
    """Build the site into ``site_dir`` (default ``site/``); with ``strict`` any mkdocs warning fails.
    ``overrides`` replace ``mkdocs.yml`` settings (``docs_dir=...``, ``nav=[...]``: tests build small sites).

    Raises:
        LabError: the JS bundles are missing, a result file fails its checks (one line per problem: see
            :func:`lab.site.checks.check_results`), a macro failed (a result a page needs is missing, a claim the
            data contradicts, a caption that does not match its chart: one line each, naming the page), or mkdocs
            warned in strict mode (an asset from another host included).
    """
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import MkDocsException

    from lab.site import macros

    _check_vendor()
    _check_results()
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's end-of-life banner on every build
    site_dir = Path(site_dir) if site_dir is not None else REPO_ROOT / "site"
    macros.ERRORS.clear()
    collect = _Collect()
    logger = logging.getLogger("mkdocs")
    logger.addHandler(collect)
    try:
        config = load_config(config_file=str(CONFIG_FILE), strict=strict, site_dir=str(site_dir), **overrides)
        build(config)
    except (MkDocsException, SystemExit) as e:
        # A macro error is reported by the macros plugin with a traceback; its own line (macros.ERRORS) is the news.
        details = "; ".join(macros.ERRORS) or "; ".join(
            m for m in collect.messages if not m.startswith("Error reading page")
        )
        raise LabError(f"site build failed: {details or e}") from e
    finally:
        logger.removeHandler(collect)
    return site_dir


def serve_site(port: int = 8000) -> None:
    """Serve the site with live reload on http://127.0.0.1:``port`` until interrupted."""
    from mkdocs.commands.serve import serve

    _check_vendor()
    serve(config_file=str(CONFIG_FILE), dev_addr=f"127.0.0.1:{port}", livereload=True)
