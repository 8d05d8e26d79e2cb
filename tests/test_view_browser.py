"""The local view's page (edge_runtime/view/static/index.html) in a real headless chromium, against a real daemon.

One `Service` for the module: a sweeping phantom into `fetal-head` (an exam, so a finding, every sweep) and, when
the shared data is there, a real chest CR into `cxr-pneumonia` through a dicom-folder inbox; `[view]` on a free
port. The browser is driven over the DevTools protocol (tests/cdp.py). What is proven:

- the live tile updates: its `.frame-index` moves on, and its picture (the MJPEG stream) is decoded;
- the overlay is drawn: the frame `latest.jpg` says it is (X-Frame-Index) carries the fitted ellipse of exactly
  that frame (from the daemon's own ring) in the overlay colour along its outline and not inside it, and the
  picture the tile shows carries an ellipse-coloured ring as well;
- feedback: a click on Confirm (and a Correct with a value) lands as a feedback row in the daemon's outbox,
  pending, for that finding, and as a `li.feedback` on the page.
"""
from __future__ import annotations

import math
import shutil
import time

import pytest
from cdp import Browser, skip_reason
from conftest import CR_CHEST
from mqtt_helpers import MOSQUITTO, Broker, wait_until

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

# What the page counts as the overlay's colour: the server draws the ellipse green (0,200,0) once the head is
# steady and amber (RGB 255,190,0) while it is not (edge_runtime/view/render.py); JPEG blurs a 2 px line into
# speckle, so the test is loose on the shade and strict on the hue. B-mode speckle itself is gray.
OVERLAY_JS = """
window.edgeTest = window.edgeTest || {};
edgeTest.isOverlay = (r, g, b) =>
  (g > 110 && g - r > 50 && g - b > 50) ||                       /* green: measured */
  (r > 170 && g > 100 && r - b > 110 && g - b > 60);             /* amber: hold still */
edgeTest.pixels = (img) => {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth || img.width; c.height = img.naturalHeight || img.height;
  const ctx = c.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height);
};
edgeTest.hit = (d, x, y, r) => {
  for (let dy = -r; dy <= r; dy++) for (let dx = -r; dx <= r; dx++) {
    const px = Math.round(x) + dx, py = Math.round(y) + dy;
    if (px < 0 || py < 0 || px >= d.width || py >= d.height) continue;
    const i = 4 * (py * d.width + px);
    if (edgeTest.isOverlay(d.data[i], d.data[i + 1], d.data[i + 2])) return true;
  }
  return false;
};
edgeTest.ring = (d, top, bottom) => {   /* overlay-coloured pixels between the text bands: count and bbox */
  let n = 0, x0 = 1e9, y0 = 1e9, x1 = -1, y1 = -1;
  for (let y = top; y < d.height - bottom; y++) for (let x = 0; x < d.width; x++) {
    const i = 4 * (y * d.width + x);
    if (edgeTest.isOverlay(d.data[i], d.data[i + 1], d.data[i + 2])) {
      n++; if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
  }
  return {n, x0, y0, x1, y1, width: d.width, height: d.height};
};
true;
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from edge_runtime.config import load_config
    from edge_runtime.service import Service

    root = tmp_path_factory.mktemp("view")
    inbox = root / "inbox"
    inbox.mkdir()
    xray = ""
    if CR_CHEST.is_file():
        shutil.copy(CR_CHEST, inbox / "chest.dcm")
        xray = f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "cxr-pneumonia"\ninbox = "{inbox}"\n'
    # A real Mosquitto and collector when the binary is there: feedback clicked on the page must reach the hub.
    broker = collector = None
    mqtt = ""
    if MOSQUITTO is not None:
        from edge_hub.collector import Collector

        broker = Broker(root / "broker").start()
        collector = Collector(broker.url, root / "hub.sqlite", client_id="hub-view-page", reconnect_min_s=0.05).start()
        collector.subscribed.wait(15)
        mqtt = (f'[mqtt]\nbroker = "{broker.url}"\ntelemetry_interval_s = 0\nreconnect_min_s = 0.2\n'
                "reconnect_max_s = 1\nreceipt_timeout_s = 5\n\n")
    path = root / "edge.toml"
    path.write_text(
        f'[device]\nid = "test-scanner"\nsite = "test-clinic"\nstate_dir = "{root / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
        "[service]\nmetrics_port = 0\nstop_timeout_s = 15\n\n"
        "[view]\nport = 0\n\n" + mqtt +
        '[[sources]]\nname = "probe"\nkind = "phantom"\nmodel = "fetal-head"\nfps = 30\nsweeps = true\n'
        "exam_gap_s = 1.5\n\n" + xray)
    service = Service(load_config(path))
    service.start()
    try:
        assert service.view is not None and service.view.port, "the view is not serving"
        token = (root / "state" / "view.token").read_text().strip()
        yield service, f"http://127.0.0.1:{service.view.port}", token, bool(xray), root / "hub.sqlite" if broker else None
    finally:
        service.stop()
        if collector is not None:
            collector.stop(2.0)
        if broker is not None:
            broker.stop()


@pytest.fixture(scope="module")
def page(daemon):
    service, base, token, _, _ = daemon
    with Browser.start() as b:
        b.navigate(f"{base}/?token={token}")  # the first visit: the server answers with the cookie
        b.wait_for("document.querySelector('div.tile[data-source=\"probe\"]') !== null", 20, what="the probe's tile")
        b.evaluate(OVERLAY_JS)
        yield b


def tile(source: str) -> str:
    return f"document.querySelector('div.tile[data-source=\"{source}\"]')"


def test_the_live_tile_updates(page):
    first = page.wait_for(f"(() => {{ const t = {tile('probe')}.querySelector('.frame-index').textContent;"
                          " return /^\\d+$/.test(t) ? parseInt(t) : null; })()", 20, what="a frame index on the tile")
    later = page.wait_for(f"(() => {{ const v = parseInt({tile('probe')}.querySelector('.frame-index').textContent);"
                          f" return v > {first} ? v : null; }})()", 5, what="the tile's frame index moving on")
    assert later > first
    # The picture is the MJPEG stream, decoded (a broken image has no natural size).
    src = page.evaluate(f"{tile('probe')}.querySelector('img').getAttribute('src')")
    assert src.startswith("live.mjpeg?source=probe")
    page.wait_for(f"{tile('probe')}.querySelector('img').naturalWidth > 0", 15, what="the live picture decoded")
    guidance = page.wait_for(f"{tile('probe')}.querySelector('.guidance').textContent.trim()", 5,
                             what="a guidance line")
    assert guidance in ("no head in view", "hold still", "waiting for frames") or guidance.startswith("measured")
    state = page.evaluate(f"{tile('probe')}.querySelector('.guidance').className")
    assert state.split()[0] == "guidance" and len(state.split()) == 2
    # The header reads the outbox and the link from /api/status.
    assert page.wait_for("/\\d+ pending/.test(document.querySelector('#outbox-depth').textContent)", 5)
    assert page.evaluate("document.querySelector('#link-state').textContent.trim()") not in ("", "\u2026")


def ellipse_points(ellipse: dict, scale: float, factor: float = 1.0, n: int = 72) -> list[list[float]]:
    """Points on the ellipse (cv2's convention: full axes, angle in degrees), in the JPEG's pixels."""
    (cx, cy), (d1, d2), angle = ellipse["center_px"], ellipse["axes_px"], ellipse["angle_deg"]
    a, b, t = d1 / 2 * factor, d2 / 2 * factor, math.radians(angle)
    pts = []
    for k in range(n):
        u = 2 * math.pi * k / n
        x, y = a * math.cos(u), b * math.sin(u)
        pts.append([(cx + x * math.cos(t) - y * math.sin(t)) * scale, (cy + x * math.sin(t) + y * math.cos(t)) * scale])
    return pts


def test_the_overlay_is_drawn_on_the_frame_it_belongs_to(daemon, page):
    service, *_ = daemon
    fetch_js = """(async () => {
      const r = await fetch("latest.jpg?source=probe", {cache: "no-store"});
      if (!r.ok) return {status: r.status};
      const img = new Image();
      img.src = URL.createObjectURL(await r.blob());
      await img.decode();
      edgeTest.latest = edgeTest.pixels(img);
      return {status: r.status, frame: parseInt(r.headers.get("X-Frame-Index")),
              capture: parseFloat(r.headers.get("X-Capture-Time")), width: img.naturalWidth};
    })()"""
    deadline = time.monotonic() + 40  # a sweep lifts the probe for 3 s in 8: wait for a frame with a head
    checked = None
    while time.monotonic() < deadline:
        got = page.evaluate(fetch_js)
        if got.get("status") == 200:
            ring = {r.frame_index: r for r in service.recent_frames("probe")}
            r = ring.get(got["frame"])
            assert r is not None, f"frame {got['frame']} of latest.jpg is not in the daemon's ring"
            assert abs(got["capture"] - r.captured_at) < 0.01, "X-Capture-Time is not that frame's capture time"
            if r.detected and r.ellipse:
                checked = (got, r)
                break
        time.sleep(0.3)
    assert checked, "no frame with a fitted head in latest.jpg within 40 s"
    got, r = checked
    scale = got["width"] / 800.0  # the phantom is 800 px wide; the server shrinks only above 800
    def overlay_hits(points: list) -> int:  # points with an overlay-coloured pixel within 2 px
        return page.evaluate(f"{points}.filter(p => edgeTest.hit(edgeTest.latest, p[0], p[1], 2)).length")

    hits = overlay_hits(ellipse_points(r.ellipse, scale))
    inside = overlay_hits(ellipse_points(r.ellipse, scale, 0.8))  # the same outline shrunk: inside the head
    assert hits >= 0.85 * 72, f"only {hits}/72 points of frame {r.frame_index}'s fitted ellipse are overlay-coloured"
    assert inside <= 0.1 * 72, f"{inside}/72 points inside the ellipse are overlay-coloured: colour is everywhere"

    # And the picture the tile shows (the MJPEG stream, as decoded by the browser) carries a ring of that colour:
    # the text bands (guidance on top, the capture clock at the bottom) are left out.
    ring = page.wait_for(f"(() => {{ const img = {tile('probe')}.querySelector('img');"
                         " if (!img.naturalWidth) return null;"
                         " const s = edgeTest.ring(edgeTest.pixels(img), 70, 30); return s.n > 300 ? s : null; })()",
                         30, interval=0.3, what="an ellipse-coloured ring in the tile's picture")
    (d1, d2) = r.ellipse["axes_px"]
    w, h = (ring["x1"] - ring["x0"]) / scale, (ring["y1"] - ring["y0"]) / scale
    assert 0.8 * min(d1, d2) <= w <= 1.2 * max(d1, d2) and 0.8 * min(d1, d2) <= h <= 1.2 * max(d1, d2), (ring, d1, d2)
    # where the daemon fitted the head lately (the phantom's head drifts by about 20 px)
    centres = [x.ellipse["center_px"] for x in service.recent_frames("probe") if x.detected and x.ellipse]
    mx, my = (ring["x0"] + ring["x1"]) / 2 / scale, (ring["y0"] + ring["y1"]) / 2 / scale
    assert min(math.hypot(mx - cx, my - cy) for cx, cy in centres) < 30, (ring, centres[-5:])


def first_finding(page, timeout: float = 60.0, exam: bool | None = None) -> str:
    sel = "li.finding" + ("" if exam is None else ".exam" if exam else ":not(.exam)")
    return page.wait_for(f"document.querySelector('{sel}')?.dataset.findingId", timeout, what=f"a {sel} on the page")


def outbox_feedback(service, finding_id: str) -> list[tuple[dict, str]]:
    return [(rec, st) for rec, st in service.outbox.feedback(100) if rec["finding_id"] == finding_id]


def hub_feedback(db, feedback_id: str):
    import sqlite3

    if db is None or not db.exists():
        return None
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT finding_id, verdict FROM feedback WHERE feedback_id = ?", (feedback_id,)).fetchone()
    except sqlite3.OperationalError:  # the collector has not made its tables yet
        return None
    finally:
        conn.close()


def test_a_confirm_click_reaches_the_outbox_the_hub_and_the_feedback_list(daemon, page):
    service, *_, hub_db = daemon
    fid = first_finding(page)
    li = f"document.querySelector('li.finding[data-finding-id=\"{fid}\"]')"
    page.evaluate(f"{li}.querySelector('button.confirm').click()")
    answer = page.wait_for(f"(() => {{ const a = {li}?.querySelector('.answer');"
                           " return a && /done|error/.test(a.className) ? a.className + ': ' + a.textContent : null;"
                           " })()",
                           10, what="the answer to the confirm")
    assert "done" in answer, answer
    rows = wait_until(lambda: outbox_feedback(service, fid), 5, interval=0.2, what="the feedback row in the outbox")
    (rec, state), = rows
    assert rec["verdict"] == "confirm" and state in ("pending", "sent", "stored")
    assert rec["device_id"] == "test-scanner" and rec["finding"]["model"]
    if hub_db is not None:  # through the outbox and a real Mosquitto to the collector, whose receipt marks it stored
        row = wait_until(lambda: hub_feedback(hub_db, rec["feedback_id"]), 30, interval=0.2,
                         what="the feedback at the collector")
        assert row == (fid, "confirm")
        wait_until(lambda: outbox_feedback(service, fid)[0][1] == "stored", 30, interval=0.2,
                   what="the collector's receipt")
    page.wait_for(f"document.querySelector('li.feedback[data-feedback-id=\"{rec['feedback_id']}\"]') !== null", 5,
                  what="the feedback on the page's list")
    # The page shows it on the finding too, and after a reload (from /api/feedback, not only from its own POST).
    page.navigate(page.evaluate("location.href.split('?')[0]"))  # the cookie alone authenticates now
    page.evaluate(OVERLAY_JS)
    page.wait_for(f"document.querySelector('li.feedback[data-feedback-id=\"{rec['feedback_id']}\"]') !== null", 10,
                  what="the feedback listed after a reload")


def test_a_correction_of_a_measurement_carries_the_value(daemon, page):
    service, *_ = daemon
    fid = first_finding(page, 60, exam=True)
    li = f"document.querySelector('li.finding[data-finding-id=\"{fid}\"]')"
    page.evaluate(f"{li}.querySelector('button.correct').click()")
    page.wait_for(f"{li}.querySelector('form.correct-form input[name=value_mm]') !== null", 5, what="the correct form")
    page.evaluate(f"(() => {{ const f = {li}.querySelector('form.correct-form');"
                  " f.querySelector('input[name=value_mm]').value = '181.5';"
                  " f.querySelector('input[name=note]').value = 'caliper on the outer table';"
                  " f.querySelector('button[type=submit]').click(); })()")
    rows = wait_until(lambda: [x for x in outbox_feedback(service, fid) if x[0]["verdict"] == "correct"], 10,
                      interval=0.2, what="the correction in the outbox")
    rec, _ = rows[0]
    assert rec["value_mm"] == pytest.approx(181.5) and rec["note"] == "caliper on the outer table"
    assert rec["finding"]["task"] == "segmentation"
    page.wait_for(f"document.querySelector('li.feedback[data-feedback-id=\"{rec['feedback_id']}\"]') !== null", 5)


def test_a_correction_of_a_classification_offers_the_models_labels(daemon, page):
    service, _, _, has_xray, _ = daemon
    if not has_xray:
        pytest.skip(f"no chest CR at {CR_CHEST} (../shared beside the checkout): no classification finding")
    fid = first_finding(page, 90, exam=False)
    li = f"document.querySelector('li.finding[data-finding-id=\"{fid}\"]')"
    page.evaluate(f"{li}.querySelector('button.correct').click()")
    options = page.wait_for(f"(() => {{ const s = {li}.querySelector('form.correct-form select[name=label]');"
                            " return s ? [...s.options].map(o => o.value) : null; })()", 5, what="the label select")
    assert sorted(options) == ["normal", "pneumonia"]
    finding = service.outbox.finding(fid)
    other = next(k for k in options if k != finding["result"].get("label"))
    page.evaluate(f"(() => {{ const f = {li}.querySelector('form.correct-form');"
                  f" f.querySelector('select[name=label]').value = '{other}';"
                  " f.querySelector('button[type=submit]').click(); })()")
    rows = wait_until(lambda: [x for x in outbox_feedback(service, fid) if x[0]["verdict"] == "correct"], 10,
                      interval=0.2, what="the label correction in the outbox")
    assert rows[0][0]["label"] == other
    # The study tile shows the study's picture (latest.jpg), not a broken image.
    page.wait_for(f"{tile('xray')}.querySelector('img').naturalWidth > 0", 10, what="the study picture")


def test_without_the_event_stream_the_page_polls_the_status(daemon, page):
    """An event stream that fails (a proxy that buffers it, a dropped client): the page polls /api/status every 2 s
    and the tile still moves on."""
    service, base, _, _, _ = daemon
    failing = ("window.EventSource = class { constructor() { setTimeout(() => this.onerror && this.onerror("
               "new Event('error')), 50); } addEventListener() {} close() {} };")
    script = page.send("Page.addScriptToEvaluateOnNewDocument", {"source": failing})["identifier"]
    try:
        page.navigate(f"{base}/")
        page.wait_for("/polling/.test(document.querySelector('#conn').textContent)", 10, what="the page polling")
        first = page.wait_for(f"parseInt({tile('probe')}?.querySelector('.frame-index').textContent) || null", 10,
                              what="a frame index from the first poll")
        page.wait_for(f"parseInt({tile('probe')}.querySelector('.frame-index').textContent) > {first}", 8,
                      what="the tile moving on by polling alone")
    finally:
        page.send("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})
