"""Opening a page in headless Chromium, offline, and asking it what it drew and fetched.

Chromium runs with its proxy pointed at a closed port and every host name unresolvable,
and is driven through the DevTools protocol: every request the page makes is recorded,
and the pixels of every canvas (in shadow roots too, where BokehJS draws) are counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

INSTALL = "sudo apt-get install -y chromium"
"""How README says to get the browser the report test needs."""

_CANVASES = """
(() => {
  const found = [];
  const walk = (root) => root.querySelectorAll('*').forEach((el) => {
    if (el.tagName === 'CANVAS') found.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
  });
  walk(document);
  return JSON.stringify(found.map((c) => {
    const ctx = c.width && c.height ? c.getContext('2d') : null;
    if (!ctx) return [c.width, c.height, 0];
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    let painted = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 3] > 0 && (px[i] < 250 || px[i + 1] < 250 || px[i + 2] < 250)) painted++;
    }
    return [c.width, c.height, painted];
  }));
})()
"""


def find_browser() -> str | None:
    """The first Chromium or Chrome on PATH, or ``None``."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def install_browser(timeout: float = 240.0) -> str | None:
    """The browser on PATH, or Chromium installed with apt-get where running as root; ``None`` if neither."""
    if find_browser() is not None:
        return find_browser()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "chromium"]
    for commands in ([install], [["apt-get", "update"], install]):
        for command in commands:
            try:
                subprocess.run(command, env=env, timeout=timeout, capture_output=True, check=False)
            except (OSError, subprocess.TimeoutExpired):
                return None
        if find_browser() is not None:
            return find_browser()
    return None


@dataclass
class PageVisit:
    """What a page did in the browser.

    Attributes
    ----------
    requests
        URL of every request the page made, its own included.
    failed
        URL and error text of each request that failed.
    canvases
        ``(width, height, painted pixels)`` of every canvas, painted meaning neither
        transparent nor white.
    exceptions
        Uncaught JavaScript exceptions.
    text
        The page's visible text when the visit ended.
    """

    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canvases: list[tuple[int, int, int]] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    text: str = ""

    def painted(self, at_least: int = 500) -> int:
        """Canvases with at least ``at_least`` painted pixels."""
        return sum(1 for _, _, n in self.canvases if n >= at_least)


def _no_proxy_get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as answer:
        return json.loads(answer.read())


async def _drive(ws_url: str, page: str, *, canvases: int, seconds: float) -> PageVisit:
    from tornado.websocket import websocket_connect

    visit = PageVisit()
    conn = await websocket_connect(ws_url, max_message_size=1 << 26)
    count = 0

    def note(message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params") or {}
        if method == "Network.requestWillBeSent":
            visit.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            visit.failed.append(f"{params.get('requestId')}: {params.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            visit.exceptions.append(json.dumps(params.get("exceptionDetails", {}))[:500])

    async def call(method: str, **params: Any) -> dict[str, Any]:
        nonlocal count
        count += 1
        await conn.write_message(json.dumps({"id": count, "method": method, "params": params}))
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout=30)
            if raw is None:
                raise RuntimeError("Chromium closed the DevTools connection")
            message = json.loads(raw)
            if message.get("id") == count:
                return message.get("result") or {}
            note(message)

    try:
        for domain in ("Network.enable", "Page.enable", "Runtime.enable"):
            await call(domain)
        await call("Page.navigate", url=page)
        deadline = time.monotonic() + seconds
        while True:
            await asyncio.sleep(0.5)
            result = await call("Runtime.evaluate", expression=_CANVASES, returnByValue=True)
            value = (result.get("result") or {}).get("value")
            visit.canvases = [tuple(c) for c in json.loads(value)] if value else []
            if visit.painted() >= canvases or time.monotonic() > deadline:
                break
        await asyncio.sleep(1.0)
        result = await call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
        visit.text = str((result.get("result") or {}).get("value") or "")
    finally:
        conn.close()
    return visit


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the browser ``proc`` and the helpers in its process group: politely, then for sure."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # The leader is gone; its helpers may not be.
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def visit_offline(browser: str, page: Path | str, *, canvases: int, seconds: float = 30.0) -> PageVisit:
    """Open ``page`` in headless ``browser``, offline, until ``canvases`` are painted or ``seconds`` pass.

    ``page`` is a file, or the URL of a page served on this machine (127.0.0.1 is reached
    directly; every other address stays unreachable).
    """
    # Chromium's helper processes may still be writing the profile as the folder is removed.
    with tempfile.TemporaryDirectory(prefix="dask-infer-chromium-", ignore_cleanup_errors=True) as profile:
        args = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1200,2000",
            "about:blank",
        ]
        # Its own process group: the browser and every helper it starts end together. Its
        # temporary folders go inside the profile, which is removed with them.
        proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TMPDIR": profile},
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{browser} did not open its DevTools port (exit code {proc.poll()})")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            targets = _no_proxy_get(f"http://127.0.0.1:{port}/json/list")
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            url = page if isinstance(page, str) else page.resolve().as_uri()
            return asyncio.run(_drive(ws_url, url, canvases=canvases, seconds=seconds))
        finally:
            _end_group(proc)
