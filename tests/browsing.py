"""What the browser tests share: finding Debian's ``chromium`` (skip without it, fail under ``LAB_REQUIRE_BROWSER=1``),
its command line, and a quiet static file server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
from http.server import SimpleHTTPRequestHandler

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium() -> str:
    """The path of Debian's chromium; skips the test (fails it under ``LAB_REQUIRE_BROWSER=1``) when missing."""
    path = shutil.which("chromium")
    if path is None:
        reason = "Debian chromium is not installed (apt-get install chromium; ./.ci/test does it)"
        if os.environ.get("LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LAB_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return path


class QuietHandler(SimpleHTTPRequestHandler):
    """A static file handler that does not log every request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass
