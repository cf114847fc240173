"""Headless Chromium driven over the DevTools protocol, for tests that check what OHIF itself holds.

Chromium is started with ``--remote-debugging-pipe``: DevTools messages are NUL-terminated JSON on file
descriptors 3 (to the browser) and 4 (from it), the transport Puppeteer uses. That needs only the standard
library (no websocket package, which the project does not install) and opens no port another local process
could connect to.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-extensions",
    "--disable-sync",
    "--mute-audio",
    "--remote-debugging-pipe",
]


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    """In the child: the pipe ends as fds 3 and 4 (moved out of the way first, as either may be 3 or 4)."""
    high_read, high_write = fcntl.fcntl(read_end, fcntl.F_DUPFD, 100), fcntl.fcntl(write_end, fcntl.F_DUPFD, 100)
    os.dup2(high_read, 3)
    os.dup2(high_write, 4)


class BrowserError(RuntimeError):
    """A DevTools command failed, or a page script threw."""


class Chromium:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript in it and returns the JSON value."""

    def __init__(self, width: int = 1400, height: int = 900, log_path: Path | None = None) -> None:
        if not CHROMIUM:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="evlf-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child sees the pipe ends as fds 3 and 4, where --remote-debugging-pipe expects them
        self._log = (log_path or Path(self._profile) / "chromium.log").open("w")
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(3, 4),
            preexec_fn=lambda: _as_fds_3_and_4(to_browser_r, from_browser_w),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)  # fmt: skip

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self._on_event(message)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _on_event(self, message: dict) -> None:
        params = message.get("params", {})
        if message.get("method") == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text[:500]}")
        elif message.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(f"exception: {details.get('exception', {}).get('description', details)}"[:1000])
        self._events.append(message)

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        """One DevTools command; its ``result``, or :class:`BrowserError` with the protocol's message."""
        with self._cond:
            self._next_id += 1
            call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while call_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise BrowserError(f"{method}: no answer within {timeout} s (browser rc {self.process.poll()})")
                self._cond.wait(min(left, 1.0))
            reply = self._replies.pop(call_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True, "timeout": timeout * 1000},
            session=True,
            timeout=timeout + 5,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression, timeout=min(30.0, timeout))
            except BrowserError as exc:
                last = f"error: {exc}"
            else:
                if last:
                    return last
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {what or expression!r}; last value {last!r}")

    def mouse(self, kind: str, x: float, y: float, buttons: int = 1, clicks: int = 1) -> None:
        """One mouse event at viewport CSS pixel (x, y): ``kind`` is mousePressed / mouseMoved / mouseReleased."""
        self.send(
            "Input.dispatchMouseEvent",
            {"type": kind, "x": x, "y": y, "button": "left", "buttons": buttons, "clickCount": clicks},
            session=True,
        )

    def click(self, x: float, y: float, clicks: int = 1) -> None:
        """A left click (``clicks=2``: a double click) at viewport CSS pixel (x, y)."""
        self.mouse("mouseMoved", x, y, buttons=0)
        for n in range(1, clicks + 1):
            self.mouse("mousePressed", x, y, clicks=n)
            self.mouse("mouseReleased", x, y, buttons=0, clicks=n)

    def center_of(self, selector: str, timeout: float = 30, text: str | None = None) -> tuple[float, float]:
        """Viewport CSS pixel at the centre of the first visible element matching a CSS selector (and whose whole
        text is ``text``), once nothing covers that pixel: a click there reaches the element, not a toast or a
        tooltip lying over it for a moment."""
        match = "true" if text is None else f"e.textContent.trim() === {json.dumps(text)}"
        box = self.wait_for(
            f"""(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]
                 .find(e => {match} && e.getBoundingClientRect().width > 0);
               if (!e) return null; const r = e.getBoundingClientRect();
               const x = r.left + r.width / 2, y = r.top + r.height / 2, top = document.elementFromPoint(x, y);
               return top && (e.contains(top) || top.contains(e)) ? [x, y] : null; }})()""",
            timeout,
            what=f"a visible, uncovered {selector}" + ("" if text is None else f" reading {text!r}"),
        )
        return float(box[0]), float(box[1])

    def click_on(self, selector: str, clicks: int = 1, timeout: float = 30) -> None:
        self.click(*self.center_of(selector, timeout), clicks=clicks)

    def click_text(self, text: str, selector: str = "button", timeout: float = 30) -> None:
        """Click the first visible element matching ``selector`` whose whole text is ``text``."""
        self.click(*self.center_of(selector, timeout, text=text))

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """Press at ``start``, move in ``steps`` steps to ``end``, release: what a reader's hand does."""
        self.mouse("mouseMoved", *start, buttons=0)
        self.mouse("mousePressed", *start)
        for n in range(1, steps + 1):
            t = n / steps
            self.mouse("mouseMoved", start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
        self.mouse("mouseReleased", *end, buttons=0)

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text}, session=True)

    def key(self, key: str, code: str = "", key_code: int = 0) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": key, "code": code or key, "windowsVirtualKeyCode": key_code},
                session=True,
            )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(BrowserError):  # it may have gone already
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        self._reader.join(timeout=5)
        os.close(self._from_browser)
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call ``check`` until it returns something truthy (HTTP-side waits of the tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout} s for {what}")
