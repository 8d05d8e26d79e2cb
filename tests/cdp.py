"""A tiny Chrome DevTools Protocol driver on aiohttp's websocket client: headless chromium, one page, navigate,
evaluate, wait_for, screenshot. No selenium or playwright: the CI image has Debian's `chromium` and aiohttp.

    with Browser.start() as b:          # raises BrowserMissing when there is no chromium
        b.navigate("http://127.0.0.1:8080/?token=...")
        b.wait_for("document.querySelector('.tile') !== null", timeout=10)
        b.evaluate("1 + 1")             # -> 2
        b.screenshot(Path("page.png"), 1280, 900)

The API is synchronous: an asyncio loop runs in a daemon thread, each call is submitted to it and waited for.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserMissing(RuntimeError):
    pass


class CDPError(RuntimeError):
    pass


def find_chromium() -> str | None:
    env = os.environ.get("EDGE_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def skip_reason() -> str | None:
    """Why a browser test cannot run here (None when it can)."""
    if find_chromium() is None:
        return "chromium not found (apt install chromium; .ci/run installs it): the page is tested in a real browser"
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen, profile: tempfile.TemporaryDirectory, port: int) -> None:
        self.proc, self._profile, self.port = proc, profile, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdp-loop", daemon=True)
        self._thread.start()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: list[dict[str, Any]] = []
        self._event_waiters: list[tuple[str, asyncio.Future]] = []
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._call(self._attach())

    # ------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> Browser:
        binary = find_chromium()
        if binary is None:
            raise BrowserMissing(skip_reason())
        profile = tempfile.TemporaryDirectory(prefix="edge-cdp-")
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
                "--remote-debugging-port=0", f"--user-data-dir={profile.name}", *extra_args, "about:blank"]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        port_file = Path(profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        port = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode("utf-8", "replace")[-2000:] if proc.stderr else ""
                profile.cleanup()
                raise CDPError(f"chromium exited with {proc.returncode} before DevTools was up: {err.strip()}")
            try:
                first = port_file.read_text().splitlines()[0].strip()
                if first:
                    port = int(first)
                    break
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.05)
        if port is None:
            _kill_group(proc)
            profile.cleanup()
            raise CDPError(f"chromium wrote no {port_file.name} within {timeout:.0f} s")
        # stderr is not read from here on: keep the pipe from filling up
        threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
        try:
            return cls(proc, profile, port)
        except BaseException:
            _kill_group(proc)
            profile.cleanup()
            raise

    def close(self) -> None:
        try:
            if self._loop.is_running():
                try:
                    self._call(self._detach(), timeout=5)
                except Exception:
                    pass
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
        finally:
            _kill_group(self.proc)
            self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the page
    def navigate(self, url: str, timeout: float = 20.0) -> None:
        """Load `url` and wait for its DOMContentLoaded (a live MJPEG picture never finishes loading)."""
        self._call(self._navigate(url, timeout), timeout + 5)

    def evaluate(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of a JS expression (a promise is awaited), by value; a thrown exception raises CDPError."""
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                             "userGesture": True, "timeout": int(timeout * 1000)}, timeout + 5)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text") or json.dumps(d)
            raise CDPError(f"JS exception: {text}")
        return res.get("result", {}).get("value")

    def wait_for(self, condition: str, timeout: float = 10.0, interval: float = 0.1, what: str = "") -> Any:
        """Evaluate `condition` until it is truthy; its value. TimeoutError names the condition and the last value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.evaluate(condition, timeout=max(1.0, timeout))
            except CDPError as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what or condition!r} not true within {timeout:.0f} s (last: {last!r}); "
                                   f"console: {self.console[-5:]}")
            time.sleep(interval)

    def screenshot(self, path: Path, width: int = 1280, height: int = 900, full_page: bool = False) -> Path:
        """A PNG of the viewport at `width` x `height` CSS pixels (scale 1)."""
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        time.sleep(0.3)  # a frame laid out at the new size
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def send(self, method: str, params: dict | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """One raw CDP command on the page's session."""
        return self._call(self._send(method, params or {}, timeout), timeout + 5)

    # ------------------------------------------------------------------ loop side
    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _attach(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        base = f"http://127.0.0.1:{self.port}"
        pages = []
        for _ in range(50):
            async with self._session.get(f"{base}/json/list") as r:
                pages = [t for t in await r.json(content_type=None) if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.1)
        if not pages:
            async with self._session.put(f"{base}/json/new?about:blank") as r:
                pages = [await r.json(content_type=None)]
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0, heartbeat=None)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        for domain in ("Page.enable", "Runtime.enable"):
            await self._send(domain, {}, 10)

    async def _detach(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(f"{data['error'].get('message')}: {data['error'].get('data', '')}"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            method = data.get("method", "")
            if method == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif method == "Runtime.exceptionThrown":
                d = data["params"].get("exceptionDetails", {})
                text = (d.get("exception") or {}).get("description") or d.get("text", "")
                self.console.append("exception: " + text)
            self._events.append(data)
            del self._events[:-200]
            for name, fut in list(self._event_waiters):
                if name == method and not fut.done():
                    fut.set_result(data.get("params", {}))
        for fut in self._pending.values():  # the socket closed under us
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def _send(self, method: str, params: dict, timeout: float) -> dict[str, Any]:
        if self._ws is None or self._ws.closed:
            raise CDPError("the DevTools connection is closed")
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        await self._ws.send_str(json.dumps({"id": mid, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(mid, None)
            raise TimeoutError(f"CDP {method} got no answer within {timeout:.0f} s") from None

    async def _navigate(self, url: str, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiter = ("Page.domContentEventFired", fut)
        self._event_waiters.append(waiter)
        try:
            res = await self._send("Page.navigate", {"url": url}, timeout)
            if res.get("errorText"):
                raise CDPError(f"navigating to {url}: {res['errorText']}")
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{url} did not finish loading within {timeout:.0f} s") from None
        finally:
            self._event_waiters.remove(waiter)


def _drain(stream) -> None:
    try:
        while stream and stream.read(65536):
            pass
    except (OSError, ValueError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Chromium's zygote, GPU and renderer processes share its session: end them all, then reap."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children left behind by a crashed parent
        except (ProcessLookupError, PermissionError):
            pass
