"""The local view: an aiohttp server inside the daemon, on its own thread and event loop.

Threads: "edge-view-http" runs the event loop (requests, streams, the event broadcaster); "edge-view" draws and
encodes pictures (render.py) and "edge-view-io" reads the outbox and the service's state, both niced so that the
pipeline keeps the CPU. Nothing here runs on a worker's thread but `Pictures.offer` and, while a stream watches
that source, one `call_soon_threadsafe` per frame to wake it.

Streams never hold up the pipeline or each other: an MJPEG viewer always gets the newest picture (never a queue of
old ones), at most `mjpeg_max_fps`; a viewer that stops reading is dropped after WRITE_TIMEOUT_S; an event-stream
client whose queue overflows is dropped. See /work/notes/view-api.md for the endpoints (README "Local view").
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edge_runtime.config import ViewSection
from edge_runtime.errors import EdgeError
from edge_runtime.view import auth
from edge_runtime.view.feedback import MAX_BODY_BYTES, FeedbackError, build_record, same_feedback
from edge_runtime.view.pictures import Pictures
from edge_runtime.view.render import Renderer
from edge_runtime.view.snapshot import live_tile, status

log = logging.getLogger("edge_runtime.view")

STATIC = Path(__file__).resolve().parent / "static"
WRITE_TIMEOUT_S = 10.0  # a viewer whose socket takes longer than this to accept a part is dropped
SSE_QUEUE = 256  # events waiting for one event-stream client; more and it is dropped
SSE_PING_S = 15.0
TICK_S = 0.25  # the broadcaster: result events at most 4/s per live source
STATUS_EVERY_S = 2.0
FINDINGS_LIMIT_MAX = 200
RENDER_NICE = 10
HEAVY = (("explanation", "overlay"), ("explanation", "grid"), ("result", "contour"), ("thumbnail",))


def _nice_thread() -> None:
    try:  # Linux: a thread is a task with its own nice value
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICE)
    except (OSError, AttributeError):
        pass


def light(finding: dict[str, Any]) -> dict[str, Any]:
    """A finding without its pictures (overlay, key frame, contour): what an event carries; the page fetches the
    whole finding from /api/findings when it wants to show them."""
    out = dict(finding)
    for path in HEAVY:
        parent = out
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                break
            parent[key] = dict(parent[key])
            parent = parent[key]
        else:
            if path[-1] in parent:
                parent[path[-1]] = True
    exam = out.get("exam")
    if isinstance(exam, dict) and isinstance(exam.get("key_frame"), dict):
        out["exam"] = {**exam, "key_frame": {k: v for k, v in exam["key_frame"].items() if k != "thumbnail"}}
    return out


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode("utf-8")


def _error(status: int, text: str):
    from aiohttp import web

    return web.json_response({"error": text}, status=status)


class ViewServer:
    def __init__(self, service, cfg: ViewSection, state_dir: Path, pictures: Pictures, where: str = "configuration") -> None:
        self.service = service
        self.cfg = cfg
        self.where = where
        self.pictures = pictures
        self.token_path = Path(cfg.token_file) if cfg.token_file else state_dir / "view.token"
        self.token = ""
        self.port: int | None = None
        self.renderer = Renderer(pictures, service.recent_frames)
        self.counters = {"requests": 0, "unauthorized": 0, "mjpeg_parts": 0, "viewers_dropped": 0, "events_sent": 0,
                         "feedback": 0, "feedback_refused": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-view", initializer=_nice_thread)
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="edge-view-io", initializer=_nice_thread)
        self._watching: dict[str, int] = {}  # source -> MJPEG viewers waiting on it
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self._streams = 0
        self._sse: dict[asyncio.Queue, asyncio.Task | None] = {}
        self._closing = False
        self._broadcaster: asyncio.Task | None = None
        self._page = b""
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------ life cycle
    @property
    def scheme(self) -> str:
        return "https" if self.cfg.cert_file else "http"

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self) -> None:
        self.token = auth.load_or_create_token(self.token_path)
        self._page = (STATIC / "index.html").read_bytes()
        self.pictures.on_offer = self._offered
        self._thread = threading.Thread(target=self._run, name="edge-view-http", daemon=True)
        self._thread.start()
        self._started.wait(30.0)
        if self._start_error is not None:
            exc = self._start_error
            self.pictures.on_offer = None
            import errno

            if isinstance(exc, OSError):
                why = "already in use (a second daemon?)" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise EdgeError(self.where, f"key 'view.port': cannot listen on {self.cfg.host}:{self.cfg.port} for "
                                            f"the view: {why}; free the port or set another view.port") from None
            if isinstance(exc, ssl.SSLError):
                raise EdgeError(self.where, f"keys 'view.cert_file'/'view.key_file': cannot use them for TLS "
                                            f"({exc})") from None
            raise EdgeError(self.where, f"the view did not start: {exc}") from None
        log.info("view: %s (token in %s)", self.url, self.token_path)

    def stop(self, timeout: float = 5.0) -> None:
        self.pictures.on_offer = None
        loop = self._loop
        if loop is not None and not loop.is_closed() and self._thread is not None and self._thread.is_alive():
            try:
                fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                fut.result(timeout)
            except Exception as exc:  # noqa: BLE001 - a stop must go on
                log.warning("view: stopping took too long or failed (%s)", exc)
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
            self._thread.join(timeout)
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._loop = None  # nothing to stop: stop() must not schedule onto a closed loop
            loop.close()
            self._started.set()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application(middlewares=[self._auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/findings", self._findings)
        app.router.add_get("/api/feedback", self._feedback_list)
        app.router.add_post("/api/findings/{finding_id}/feedback", self._feedback)
        app.router.add_get("/latest.jpg", self._latest)
        app.router.add_get("/live.mjpeg", self._mjpeg)
        app.router.add_get("/events", self._events)
        ctx = None
        if self.cfg.cert_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, ssl_context=ctx, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._broadcaster = asyncio.get_running_loop().create_task(self._broadcast())

    async def _shutdown(self) -> None:
        self._closing = True
        if self._broadcaster is not None:
            self._broadcaster.cancel()
        for fut_set in self._waiters.values():
            for fut in fut_set:
                if not fut.done():
                    fut.set_result(None)
        for q in list(self._sse):
            self._drop_sse(q, count=False)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ helpers
    def _offered(self, source: str) -> None:
        """On a worker's thread, per picture: wake the streams that watch this source (none: nothing at all)."""
        if self._watching.get(source) and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake, source)
            except RuntimeError:  # the loop is closing
                pass

    def _wake(self, source: str) -> None:
        for fut in self._waiters.get(source, ()):
            if not fut.done():
                fut.set_result(None)

    async def _io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    def _source(self, request) -> str:
        from aiohttp import web

        name = request.query.get("source")
        names = [s.name for s in self.service.config.sources]
        if not name:
            raise web.HTTPBadRequest(text=f"400: name the source (?source=NAME); sources: {', '.join(names)}\n")
        if name not in names:
            raise web.HTTPNotFound(text=f"404: unknown source {name!r}; sources: {', '.join(names) or 'none'}\n")
        return name

    def _limit(self, request, default: int) -> int:
        from aiohttp import web

        raw = request.query.get("limit", str(default))
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if not 1 <= n <= FINDINGS_LIMIT_MAX:
            raise web.HTTPBadRequest(text=f"400: limit must be 1..{FINDINGS_LIMIT_MAX}; got {raw!r}\n")
        return n

    def _stream_slot(self) -> bool:
        if self._streams >= self.cfg.max_viewers:
            return False
        self._streams += 1
        return True

    # ------------------------------------------------------------ middleware and pages
    async def _auth_check(self, request):
        from aiohttp import web

        token, from_query = auth.offered_token(request.headers, request.query, request.cookies)
        if not auth.token_matches(self.token, token):
            self.counters["unauthorized"] += 1
            return web.Response(status=401, text="401: this view needs its token (Authorization: Bearer <token>, "
                                                 "or ?token=<token> once in a browser)\n",
                                headers={"WWW-Authenticate": 'Bearer realm="edge-runtime view"'})
        return from_query

    @property
    def _auth(self):
        from aiohttp import web

        @web.middleware
        async def middleware(request, handler):
            self.counters["requests"] += 1
            if request.path == "/healthz":
                return await handler(request)
            checked = await self._auth_check(request)
            if isinstance(checked, web.StreamResponse):
                return checked
            if request.method not in ("GET", "HEAD") and not _same_origin(request):
                # The cookie is SameSite=Strict, but "same site" includes another port of this host: a page served
                # there could post with it. A browser says where a request comes from; only this origin may write.
                self.counters["unauthorized"] += 1
                return web.Response(status=403, text="403: a write to the view must come from the view's own page\n")
            if checked:  # a browser's first visit: the token moves into a cookie
                if request.path == "/":
                    response = web.Response(status=302, headers={"Location": "/"})  # token out of the address bar
                else:
                    response = await handler(request)
                if not response.prepared:  # a stream has sent its headers already; the header token still works
                    response.set_cookie(auth.COOKIE, self.token, httponly=True, samesite="Strict", path="/",
                                        secure=self.scheme == "https")
                    response.headers.setdefault("Cache-Control", "no-store")
                return response
            response = await handler(request)
            if not response.prepared:  # patient pictures and findings: never in a shared tablet's disk cache
                response.headers.setdefault("Cache-Control", "no-store")
            return response

        return middleware

    async def _healthz(self, request):
        from aiohttp import web

        return web.Response(text="ok\n")

    async def _index(self, request):
        from aiohttp import web

        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' "
                                       "'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    # ------------------------------------------------------------ JSON
    async def _status(self, request):
        from aiohttp import web

        return web.json_response(await self._io(status, self.service, self.pictures), dumps=_dumps)

    def _findings_with_feedback(self, limit: int) -> list[dict[str, Any]]:
        box = self.service.outbox
        by_finding: dict[str, list] = {}
        for record, state in box.feedback(500):
            by_finding.setdefault(record.get("finding_id"), []).append({**record, "state": state})
        return [{"finding": f, "state": state, "source": self.pictures.source_of(f),
                 "feedback": by_finding.get(f.get("finding_id"), [])} for f, state in box.recent_findings(limit)]

    async def _findings(self, request):
        from aiohttp import web
        from edge_runtime.outbox import OutboxError

        limit = self._limit(request, 20)
        try:
            items = await self._io(self._findings_with_feedback, limit)
        except OutboxError as exc:
            return _error(503, f"outbox: {exc.reason}")
        return web.json_response({"findings": items}, dumps=_dumps)

    async def _feedback_list(self, request):
        from aiohttp import web
        from edge_runtime.outbox import OutboxError

        limit = self._limit(request, 50)
        try:
            rows = await self._io(self.service.outbox.feedback, limit)
        except OutboxError as exc:
            return _error(503, f"outbox: {exc.reason}")
        return web.json_response({"feedback": [{**r, "state": st} for r, st in rows]}, dumps=_dumps)

    async def _feedback(self, request):
        from aiohttp import web
        from edge_runtime.outbox import OutboxError

        finding_id = request.match_info["finding_id"]
        try:
            record, created, state = await self._take_feedback(request, finding_id)
        except FeedbackError as exc:
            self.counters["feedback_refused"] += 1
            log.warning("view: feedback on finding %r refused (%d): %s", finding_id[:64], exc.status, exc)
            return _error(exc.status, str(exc))
        except OutboxError as exc:
            self.counters["feedback_refused"] += 1
            log.error("view: feedback on finding %r not stored: %s", finding_id[:64], exc.reason)
            return _error(503, f"outbox: {exc.reason}; nothing was stored, try again")
        if created:
            self.counters["feedback"] += 1
            log.info("view: feedback %s on finding %s: %s%s", record["feedback_id"], finding_id, record["verdict"],
                     "".join(f" {k}={record[k]}" for k in ("label", "value_mm") if k in record))
            self._publish("feedback", {**record, "state": "pending"})
        return web.json_response({"feedback": record, "state": state}, status=201 if created else 200, dumps=_dumps)

    async def _take_feedback(self, request, finding_id: str) -> tuple[dict, bool, str]:
        if len(finding_id) > 200:
            raise FeedbackError(404, "unknown finding (the id is too long to be one)")
        if request.content_type != "application/json":
            given = request.headers.get("Content-Type") or "no Content-Type"
            raise FeedbackError(415, f"the body must be application/json; got {given[:80]!r}")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise FeedbackError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        from aiohttp import web

        try:
            raw = await request.read()  # the whole body, however it arrives (client_max_size caps it)
        except web.HTTPRequestEntityTooLarge:
            raise FeedbackError(413, f"the body is over {MAX_BODY_BYTES} bytes") from None
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FeedbackError(400, f"the body is not JSON ({str(exc).splitlines()[0][:80]})") from None
        box = self.service.outbox
        finding = await self._io(box.finding, finding_id)
        if finding is None:
            raise FeedbackError(404, f"unknown finding {finding_id!r} (not on this device, or pruned)")
        record = build_record(body, finding, self.service.identity, self._labels_for)
        stored, created, state = await self._io(box.commit_feedback, record)
        if not created and not same_feedback(stored, record):
            raise FeedbackError(409, f"feedback_id {record['feedback_id']} was used before for other feedback")
        return stored, created, state

    def _labels_for(self, model: str) -> list[str]:
        runner = self.service.runners.get(model)
        return list(runner.manifest.output.labels) if runner is not None else []

    # ------------------------------------------------------------ pictures
    async def _render(self, source: str):
        return await asyncio.get_running_loop().run_in_executor(self._render_pool, self.renderer.jpeg, source)

    async def _latest(self, request):
        from aiohttp import web

        source = self._source(request)
        rendered = await self._render(source)
        if rendered is None:
            return web.Response(status=503, text=f"503: no picture from {source} yet\n",
                                headers={"Retry-After": "1"})
        return web.Response(body=rendered.jpeg, content_type="image/jpeg", headers={
            "Cache-Control": "no-store", "X-Capture-Time": f"{rendered.captured_ts:.3f}",
            "X-Frame-Index": str(rendered.frame_index)})

    async def _wait_picture(self, source: str, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(source, set())
        waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            waiters.discard(fut)

    async def _mjpeg(self, request):
        from aiohttp import web

        source = self._source(request)
        raw_fps = request.query.get("fps", str(self.cfg.mjpeg_max_fps))
        try:
            fps = float(raw_fps)
        except ValueError:
            fps = 0.0
        if not fps > 0:
            raise web.HTTPBadRequest(text=f"400: fps must be a number above 0; got {raw_fps[:20]!r}\n")
        fps = min(fps, self.cfg.mjpeg_max_fps)
        if not self._stream_slot():
            raise web.HTTPServiceUnavailable(text=f"503: {self.cfg.max_viewers} viewers already (view.max_viewers)\n")
        loop = asyncio.get_running_loop()
        self._watching[source] = self._watching.get(source, 0) + 1
        resp = web.StreamResponse(headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame",
                                           "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        try:
            await resp.prepare(request)
            interval, next_at, last = 1.0 / fps, 0.0, 0
            while not self._closing:
                if self.pictures.latest(source)[0] == last:
                    if request.transport is None or request.transport.is_closing():
                        break  # the viewer left while no picture came (a source down): give its slot back
                    await self._wait_picture(source, 1.0)
                    continue
                wait = next_at - loop.time()
                if wait > 0:  # the rate cap: sleep, then send the newest picture of then (never a backlog)
                    await asyncio.sleep(wait)
                rendered = await self._render(source)
                if rendered is None or rendered.count == last:
                    continue
                head = (f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(rendered.jpeg)}\r\n"
                        f"X-Capture-Time: {rendered.captured_ts:.3f}\r\nX-Frame-Index: {rendered.frame_index}"
                        "\r\n\r\n").encode("ascii")
                await asyncio.wait_for(resp.write(head + rendered.jpeg + b"\r\n"), WRITE_TIMEOUT_S)
                self.counters["mjpeg_parts"] += 1
                last, next_at = rendered.count, loop.time() + interval
        except asyncio.TimeoutError:
            self.counters["viewers_dropped"] += 1
            log.info("view: dropped an MJPEG viewer of %s that stopped reading", source)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, RuntimeError):
            pass  # the viewer left
        finally:
            self._watching[source] -= 1
            self._streams -= 1
        return resp

    # ------------------------------------------------------------ events
    def _publish(self, name: str, data: Any) -> None:
        """On the loop: one event to every event-stream client; a client whose queue is full is dropped."""
        if not self._sse:
            return
        chunk = _event(name, data)
        for q in list(self._sse):
            try:
                q.put_nowait(chunk)
            except asyncio.QueueFull:
                self._drop_sse(q)

    def _drop_sse(self, q: asyncio.Queue, count: bool = True) -> None:
        task = self._sse.pop(q, None)
        if count:
            self.counters["viewers_dropped"] += 1
            log.info("view: dropped an event-stream client that fell %d events behind", SSE_QUEUE)
        if task is not None:
            task.cancel()

    async def _events(self, request):
        from aiohttp import web

        if not self._stream_slot():
            raise web.HTTPServiceUnavailable(text=f"503: {self.cfg.max_viewers} viewers already (view.max_viewers)\n")
        q: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        self._sse[q] = asyncio.current_task()
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n\n" + _event("status", await self._io(status, self.service, self.pictures)))
            while not self._closing:
                try:
                    chunk = await asyncio.wait_for(q.get(), SSE_PING_S)
                except asyncio.TimeoutError:
                    chunk = b": ping\n\n"
                await asyncio.wait_for(resp.write(chunk), WRITE_TIMEOUT_S)
                self.counters["events_sent"] += 1
        except asyncio.TimeoutError:
            self.counters["viewers_dropped"] += 1
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            if request.transport is not None and q not in self._sse:  # dropped for falling behind
                request.transport.abort()
        finally:
            self._sse.pop(q, None)
            self._streams -= 1
        return resp

    def _gather(self, last_seq: int | None, want_status: bool) -> dict[str, Any]:
        """On the io thread, once per tick: everything the broadcaster sends (a slow disk or a hung inbox folder
        stalls this thread, never the event loop that serves the page and the streams)."""
        from edge_runtime.config import LIVE_KINDS

        box = self.service.outbox
        if last_seq is None:
            last_seq = box.stats()["next_seq"] - 1
        findings = box.findings_after(last_seq)
        results = []
        for src in self.service.config.sources:
            if src.kind in LIVE_KINDS:
                recent = self.service.recent_frames(src.name, 30)
                if recent:
                    results.append((src.name, recent))
        alarms = [a.get("reason", "") for a in self.service.current_alarms()] + list(self.service.alarms)[-5:]
        return {"now": time.time(), "results": results, "findings": findings, "alarms": alarms,
                "last_seq": max([last_seq] + [f.get("seq", last_seq) for f in findings]),
                "status": status(self.service, self.pictures) if want_status else None}

    async def _broadcast(self) -> None:
        """While anyone listens: results (<= 4/s per live source), new findings, alarms, and the status."""
        from edge_runtime.outbox import OutboxError

        loop = asyncio.get_running_loop()
        seen_frames: dict[str, int] = {}
        last_seq: int | None = None
        last_status = 0.0
        last_alarms: list[str] = []
        while not self._closing:
            await asyncio.sleep(TICK_S)
            box = self.service.outbox
            if not self._sse or box is None:
                last_seq = None
                continue
            try:
                want_status = loop.time() - last_status >= STATUS_EVERY_S
                tick = await self._io(self._gather, last_seq, want_status)
                for name, recent in tick["results"]:
                    if recent[-1].frame_index != seen_frames.get(name):
                        seen_frames[name] = recent[-1].frame_index
                        self._publish("result", {"source": name, **live_tile(recent, tick["now"])})
                for f in tick["findings"]:
                    self._publish("finding", {**light(f), "view_source": self.pictures.source_of(f)})
                last_seq = tick["last_seq"]
                for text in tick["alarms"]:
                    if text not in last_alarms:
                        self._publish("alarm", {"text": text})
                last_alarms = tick["alarms"]
                if want_status:
                    last_status = loop.time()
                    self._publish("status", tick["status"])
            except OutboxError as exc:
                log.warning("view: reading the outbox for events failed: %s", exc.reason)
            except Exception:  # noqa: BLE001 - the broadcaster must outlive one bad read
                log.exception("view: the event broadcaster failed once; going on")


def _same_origin(request) -> bool:
    """No Origin / Sec-Fetch-Site header (curl, a script): fine, the token decides. A browser's cross-origin write
    (another port or host) is refused."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
