"""Local view benchmark (issue 14): what watching the live picture costs the pipeline, and how late it arrives.

One run, one process: the daemon (`edge_runtime.service.Service`) with the fetal-head phantom at 30 fps into
`fetal-head` (INT8 where the engine has it) and its view on a free loopback port, through four phases of
`--seconds` each:

- A: nobody watches;
- B: 3 viewers on /live.mjpeg: aiohttp client coroutines on a thread of their own, each reading the multipart
  stream part by part (their receive time minus the part's X-Capture-Time is kept as a side number);
- C: nobody watches again, so that drift (the machine's load, the budget controller) shows between A and C;
- D: headless chromium reads /live.mjpeg with fetch() and a ReadableStream reader from the view's own origin, parses
  the parts and keeps `Date.now()/1000 - X-Capture-Time` per part: the picture-to-browser delay.

Per phase, from the daemon's in-memory ring (`service.recent_frames`, FrameResult.latency_ms is capture to
result): p50/p99 and budget misses; the view's own CPU (the threads named edge-view*: the HTTP loop, the render
and the I/O threads, utime+stime from /proc/self/task/<tid>/stat) as % of one core over the phase's wall time;
the whole process's CPU; the load average. Chromium's own CPU (its process group) is reported for phase D apart.

    python -m benchmarks.view --seconds 40 --out view.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchError, CpuMeter, clean, latency_stats

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
VIEW_THREAD_PREFIX = "edge-view"  # edge-view-http (the event loop), edge-view_0 (render), edge-view-io_0

# The page-side reader of phase D: no <img>, no page of the view's (it would open the event stream and a picture of
# its own): fetch() with the bearer token from the view's origin (/healthz needs no token), parts parsed by hand.
READER_JS = r"""
(() => {
  const st = window.edgeBench = {samples: [], decoded: [], parts: 0, bytes: 0, error: null,
                                 ctl: new AbortController()};
  const enc = new TextEncoder(), dec = new TextDecoder("ascii");
  const SEP = enc.encode("\r\n\r\n");
  const find = (buf, len, pat, from) => {
    outer: for (let i = from; i + pat.length <= len; i++) {
      for (let j = 0; j < pat.length; j++) if (buf[i + j] !== pat[j]) continue outer;
      return i;
    }
    return -1;
  };
  (async () => {
    const r = await fetch(URL_, {headers: {Authorization: "Bearer " + TOKEN_}, signal: st.ctl.signal, cache: "no-store"});
    if (!r.ok) { st.error = "HTTP " + r.status; return; }
    const reader = r.body.getReader();
    let buf = new Uint8Array(1 << 20), len = 0;
    const append = (chunk) => {
      if (len + chunk.length > buf.length) {
        const bigger = new Uint8Array(Math.max(buf.length * 2, len + chunk.length));
        bigger.set(buf.subarray(0, len)); buf = bigger;
      }
      buf.set(chunk, len); len += chunk.length;
    };
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      append(value); st.bytes += value.length;
      for (;;) {  // every whole part in the buffer
        const h = find(buf, len, SEP, 0);
        if (h < 0) break;
        const head = dec.decode(buf.subarray(0, h));
        const m = /Content-Length:\s*(\d+)/i.exec(head), t = /X-Capture-Time:\s*([\d.]+)/i.exec(head);
        const fi = /X-Frame-Index:\s*(\d+)/i.exec(head);
        if (!m) { st.error = "a part without Content-Length: " + head.slice(0, 80); return; }
        const n = parseInt(m[1]), end = h + 4 + n;
        if (len < end + 2) break;  // the rest of this part is still on its way
        const now = Date.now() / 1000;
        st.parts++;
        if (t) {
          const cap = parseFloat(t[1]);
          st.samples.push([now - cap, fi ? parseInt(fi[1]) : -1]);
          const jpeg = buf.slice(h + 4, end);
          createImageBitmap(new Blob([jpeg], {type: "image/jpeg"}))
            .then(bmp => { st.decoded.push(Date.now() / 1000 - cap); bmp.close(); }, () => {});
        }
        buf.copyWithin(0, end + 2, len); len -= end + 2;
      }
    }
  })().catch(e => { if (e.name !== "AbortError") st.error = String(e); });
  return true;
})()
"""


def build_config(args: argparse.Namespace, root: Path):
    from edge_runtime.config import (Config, DeviceSection, EngineSection, ServiceSection, SourceSection, ViewSection,
                                     check_sources)

    live = SourceSection(name="probe", kind="phantom", model="fetal-head", fps=args.fps)
    config = Config(device=DeviceSection(id="bench", site="bench", state_dir=str(root / "state")),
                    engine=EngineSection(kind=args.engine, precision=args.precision, threads=args.threads),
                    service=ServiceSection(metrics_port=0),
                    view=ViewSection(port=0, mjpeg_max_fps=args.mjpeg_fps),
                    sources=[live])
    check_sources(config)
    return config


# ------------------------------------------------------------------ CPU of threads and processes
def thread_cpu_s(prefix: str) -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads whose Python name starts with `prefix`."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if not t.name.startswith(prefix) or t.native_id is None:
            continue
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)
    return out


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in process group `pgid` (chromium and its helpers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp is field 5
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# ------------------------------------------------------------------ the aiohttp viewers
class Viewers:
    """`n` MJPEG readers on a thread with its own event loop."""

    def __init__(self, url: str, token: str, n: int) -> None:
        self.url, self.token, self.n = url, token, n
        self.parts = [0] * n
        self.bytes = [0] * n
        self.delays: list[tuple[float, int]] = []  # (receive time - capture time, frame index)
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="bench-viewers", daemon=True)
        self._ready = threading.Event()

    def start(self) -> Viewers:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        import aiohttp

        self._stop = asyncio.Event()
        self._ready.set()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"},
                                         timeout=aiohttp.ClientTimeout(total=None, sock_read=30)) as session:
            tasks = [asyncio.create_task(self._read(session, i)) for i in range(self.n)]
            await self._stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, session, i: int) -> None:
        try:
            async with session.get(self.url) as r:
                if r.status != 200:
                    self.errors.append(f"viewer {i}: HTTP {r.status}")
                    return
                stream = r.content
                while True:
                    head = await stream.readuntil(b"\r\n\r\n")
                    fields = dict(line.split(":", 1) for line in head.decode("ascii").split("\r\n")
                                  if ":" in line)
                    fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
                    n = int(fields["content-length"])
                    await stream.readexactly(n + 2)
                    now = time.time()
                    self.parts[i] += 1
                    self.bytes[i] += n
                    if "x-capture-time" in fields:
                        self.delays.append((now - float(fields["x-capture-time"]),
                                            int(fields.get("x-frame-index", -1))))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the result
            self.errors.append(f"viewer {i}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ phases
def quantiles_ms(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    s = latency_stats([v * 1000.0 for v in values_s])
    return {k: round(s[k], 1) for k in ("p50", "p95", "p99", "max")} | {"n": len(values_s)}


def view_share(delays: list, rows: dict[int, Any]) -> dict[str, Any]:
    """Picture-to-receiver delays split: capture to result is the pipeline's (FrameResult.latency_ms of the very
    frame, from the ring), result to receiver is the view's own (drawing, encoding, the rate cap, the socket)."""
    total = [d for d, _ in delays]
    own = [d - rows[i].latency_ms / 1000.0 for d, i in delays if i in rows]
    return {"picture_to_receiver_ms": quantiles_ms(total), "result_to_receiver_ms": quantiles_ms(own)}


def run_phase(service, name: str, seconds: float, last: list[int], keep: dict | None = None) -> dict[str, Any]:
    source = service.live_sources[0]
    first_frame = source.index
    view0, cpu = thread_cpu_s(VIEW_THREAD_PREFIX), CpuMeter()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    rows = []
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, max(0.05, seconds - (time.monotonic() - t0))))
        for r in service.recent_frames("probe"):
            if r.frame_index > last[0] and r.frame_index >= first_frame:
                last[0] = r.frame_index
                rows.append(r)
                if keep is not None:
                    keep[r.frame_index] = r
    wall = time.monotonic() - t0
    view1 = thread_cpu_s(VIEW_THREAD_PREFIX)
    view_s = sum(view1.get(k, 0.0) - view0.get(k, 0.0) for k in view1)
    variants: dict[str, int] = {}
    for r in rows:
        variants[r.variant] = variants.get(r.variant, 0) + 1
    lat = [r.latency_ms for r in rows]
    stats = latency_stats(lat) if lat else None
    return {
        "phase": name, "seconds": round(wall, 1), "frames_captured": source.index - first_frame,
        "frames_processed": len(rows), "budget_misses": sum(1 for r in rows if not r.budget_met),
        "budget_miss_rate": round(sum(1 for r in rows if not r.budget_met) / len(rows), 4) if rows else None,
        "latency_ms": None if stats is None else {k: round(stats[k], 1) for k in ("p50", "p90", "p99", "max")},
        "variants": variants,
        "view_cpu_pct_of_one_core": round(view_s / wall * 100.0, 2),
        "view_threads_cpu_s": {k: round(view1[k] - view0.get(k, 0.0), 2) for k in sorted(view1)},
        "process_cpu_pct": round(cpu.percent(), 1),
        "load_average_start": [round(x, 2) for x in load0], "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.machine import collect
    from edge_runtime.service import Service

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        from cdp import Browser, skip_reason
    except ImportError:
        Browser, skip_reason = None, lambda: "tests/cdp.py not found (run from a checkout)"
    machine = collect()
    with tempfile.TemporaryDirectory(prefix="edge-bench-view-") as tmp:
        root = Path(tmp)
        service = Service(build_config(args, root))
        browser = None
        phases: list[dict[str, Any]] = []
        try:
            service.start()
            if service.view is None or not service.view.port:
                raise BenchError("the view did not start (see the daemon's alarm above)")
            base = f"http://127.0.0.1:{service.view.port}"
            token = service.view.token
            if not args.no_browser and skip_reason() is None:
                browser = Browser.start()  # now, so that its start is in no phase; it idles on about:blank
            time.sleep(args.warmup_s)
            last = [-1]
            phases.append(run_phase(service, "A: no viewer", args.seconds, last))

            viewers = Viewers(f"{base}/live.mjpeg?source=probe", token, args.viewers).start()
            time.sleep(1.0)  # the streams connected and sending; not measured
            viewers.delays.clear()
            seen: dict[int, Any] = {r.frame_index: r for r in service.recent_frames("probe")}
            try:
                b = run_phase(service, f"B: {args.viewers} viewers on /live.mjpeg", args.seconds, last, seen)
            finally:
                viewers.stop()
            b["viewers"] = {"parts": viewers.parts, "kb": [round(x / 1024) for x in viewers.bytes],
                            "parts_per_s": [round(p / b["seconds"], 2) for p in viewers.parts],
                            "python_client": view_share(viewers.delays, seen), "errors": viewers.errors[:5]}
            phases.append(b)
            time.sleep(1.0)
            phases.append(run_phase(service, "C: no viewer", args.seconds, last))

            if browser is not None:
                browser.navigate(f"{base}/healthz")
                js = READER_JS.replace("URL_", json.dumps(f"{base}/live.mjpeg?source=probe")).replace(
                    "TOKEN_", json.dumps(token))
                browser.evaluate(js)
                time.sleep(1.0)
                browser.evaluate("(() => { edgeBench.samples.length = 0; edgeBench.decoded.length = 0;"
                                 " edgeBench.parts = 0; return true; })()")
                pg0 = group_cpu_s(browser.proc.pid)
                seen = {r.frame_index: r for r in service.recent_frames("probe")}
                d = run_phase(service, "D: chromium on /live.mjpeg", args.seconds, last, seen)
                got = browser.evaluate("(() => { const s = edgeBench; s.ctl.abort();"
                                       " return {samples: s.samples, decoded: s.decoded, parts: s.parts,"
                                       " error: s.error}; })()")
                d["browser"] = {"parts": got["parts"], "parts_per_s": round(got["parts"] / d["seconds"], 2),
                                **view_share([tuple(x) for x in got["samples"]], seen),
                                "picture_to_decoded_ms": quantiles_ms(got["decoded"]),
                                "chromium_cpu_pct_of_one_core": round((group_cpu_s(browser.proc.pid) - pg0)
                                                                      / d["seconds"] * 100.0, 1),
                                "error": got["error"]}
                phases.append(d)
            counters = dict(service.view.counters)
        finally:
            if browser is not None:
                browser.close()
            service.stop()

    def p99(p):
        return (p.get("latency_ms") or {}).get("p99")

    a, b, c = phases[0], phases[1], phases[2]
    d = phases[3] if len(phases) > 3 else None
    noise = abs((p99(a) or 0) - (p99(c) or 0))
    return {
        "benchmark": "view", "machine": machine, "engine": args.engine, "precision": args.precision,
        "threads": args.threads, "fps": args.fps, "mjpeg_max_fps": args.mjpeg_fps, "viewers": args.viewers,
        "phases": phases, "view_counters": counters,
        "summary": {
            "p99_ms": {"A": p99(a), "B": p99(b), "C": p99(c), "D": p99(d) if d else None},
            "p99_noise_ms_A_vs_C": round(noise, 1),
            "p99_B_minus_mean_AC_ms": None if None in (p99(a), p99(b), p99(c))
            else round(p99(b) - (p99(a) + p99(c)) / 2, 1),
            "budget_miss_rate": {"A": a["budget_miss_rate"], "B": b["budget_miss_rate"], "C": c["budget_miss_rate"]},
            "view_cpu_pct_B": b["view_cpu_pct_of_one_core"],
            "picture_to_browser_p95_ms": ((d or {}).get("browser", {}).get("picture_to_receiver_ms") or {}).get("p95"),
            "result_to_browser_p95_ms": ((d or {}).get("browser", {}).get("result_to_receiver_ms") or {}).get("p95"),
            "target_picture_to_browser_p95_ms": 150,
            "load_average": [a["load_average_start"][0], (d or c)["load_average_end"][0]],
        },
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.view", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=40.0, help="each phase's length (four phases)")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--viewers", type=int, default=3)
    p.add_argument("--mjpeg-fps", type=float, default=10.0, help="view.mjpeg_max_fps")
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    p.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-browser", action="store_true", help="skip phase D (no chromium)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import child_main

    def run(args: argparse.Namespace) -> dict[str, Any]:
        result = measure(args)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(clean(result), indent=2, allow_nan=False) + "\n")
        return result

    return child_main(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
