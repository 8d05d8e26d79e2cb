"""What the page shows, read from the running service: each source's tile, the outbox and the link, alarms and the
quarantined files. Pure reads of state the service already keeps (the live ring, the budget controllers, the
outbox counters, the uplink's state); nothing here writes."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import __version__
from edge_runtime.config import LIVE_KINDS
from edge_runtime.view.guidance import guidance

QUARANTINE_LISTED = 20
FPS_WINDOW_S = 2.0


def _utc(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def latest_fields(r) -> dict[str, Any]:
    return {"frame_index": r.frame_index, "captured_ts": round(r.captured_at, 3), "assessed": r.assessed,
            "detected": r.detected, "head_circumference_mm": r.head_circumference_mm,
            "quality": r.quality, "exam_id": r.exam_id, "latency_ms": round(r.latency_ms, 2),
            "budget_met": r.budget_met, "variant": r.variant}


def live_tile(recent: list, now: float) -> dict[str, Any]:
    """The per-frame part of a live tile: newest result, guidance, fps over the last 2 s, p50/p99 over the ring."""
    state, line = guidance(recent, now=now)
    out: dict[str, Any] = {"guidance": line, "guidance_state": state, "latest": None, "fps": None,
                           "p50_ms": None, "p99_ms": None, "frames": len(recent)}
    if recent:
        out["latest"] = latest_fields(recent[-1])
        times = [r.captured_at for r in recent if now - r.captured_at <= FPS_WINDOW_S]
        if len(times) >= 2 and times[-1] > times[0]:
            out["fps"] = round((len(times) - 1) / (times[-1] - times[0]), 1)
        lat = np.array([r.latency_ms for r in recent])
        out["p50_ms"], out["p99_ms"] = (round(float(v), 1) for v in np.percentile(lat, [50, 99]))
    return out


def quarantined(service) -> list[dict[str, Any]]:
    """The newest quarantined study files of every inbox, with the reason the daemon wrote beside each."""
    items = []
    for name, folder in list(service.folders.items()):
        qdir = Path(folder.quarantine_dir)
        try:
            reasons = sorted(qdir.glob("*.reason.txt"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            continue
        for path in reasons[:QUARANTINE_LISTED]:
            try:
                text = path.read_text(encoding="utf-8", errors="replace").strip()
                at = path.stat().st_mtime
            except OSError:
                continue
            stamp, _, reason = text.partition(" ")
            items.append({"source": name, "file": path.name[:-len(".reason.txt")], "reason": reason or text,
                          "at": _utc(at), "ts": at})
    items.sort(key=lambda d: d["ts"], reverse=True)
    for d in items:
        del d["ts"]
    return items[:QUARANTINE_LISTED]


def study_line(finding: dict[str, Any]) -> str:
    """The newest study's answer in a few words: 'pneumonia 0.93, urgent', 'HC 182.4 mm', 'out of scope: ...'."""
    result = finding.get("result", {})
    if result.get("assessed") is False:
        return "out of scope: " + str(result.get("reason", ""))[:80]
    if "label" in result:
        p = (result.get("probabilities") or {}).get(result["label"])
        line = result["label"] + (f" {p:.2f}" if isinstance(p, (int, float)) else "")
    else:
        hc = (result.get("measurements") or {}).get("head_circumference_mm")
        line = f"HC {hc:.1f} mm" if isinstance(hc, (int, float)) else "no measurement"
    if finding.get("priority") == "urgent":
        line += ", urgent"
    if result.get("needs_review"):
        line += ", needs review"
    return line


def source_tiles(service, pictures, now: float) -> list[dict[str, Any]]:
    states = service.source_states()
    tiles = []
    for src in service.config.sources:
        st = states.get(src.name)
        live = src.kind in LIVE_KINDS
        budget = service.budgets.get(src.name)
        runner = service.runners.get(src.model)
        tile: dict[str, Any] = {
            "name": src.name, "kind": src.kind, "model": src.model, "live": live,
            "state": st.state if st else "starting", "reason": st.reason if st else "",
            "budget_ms": budget.budget_ms if budget is not None else
            (src.budget_ms or (runner.manifest.latency_budget_ms if runner else None)),
            "level": {"index": budget.index, "variant": budget.level.variant, "rate_hz": budget.level.max_rate_hz}
            if budget is not None else None,
            "results": service.results_modes.get(src.name, "frame"),
            "picture": pictures.latest(src.name)[1] is not None,
        }
        if live:
            tile.update(live_tile(service.recent_frames(src.name), now))
        else:
            window = list(service.windows.get(src.model, ()))
            last = pictures.latest(src.name)[1]
            tile.update({"guidance": study_line(last.finding) if last is not None else "waiting for studies",
                         "guidance_state": "study", "latest": None, "fps": None,
                         "p50_ms": round(float(np.percentile(window, 50)), 1) if window else None,
                         "p99_ms": round(float(np.percentile(window, 99)), 1) if window else None,
                         "inbox": service.folders[src.name].depth() if src.name in service.folders else None})
        tiles.append(tile)
    return tiles


def status(service, pictures) -> dict[str, Any]:
    from edge_runtime.outbox import OutboxError

    now = time.time()
    out: dict[str, Any] = {
        "device": {"id": service.identity.device_id, "site": service.identity.site, "version": __version__},
        "now": _utc(now), "ready": service.ready.is_set(),
        "sources": source_tiles(service, pictures, now),
        "outbox": None, "link": {"configured": service.uplink is not None, "connected": False,
                                 "state": "not configured" if service.uplink is None else "", "last_error": "",
                                 "last_delivery": None, "last_receipt": None},
        "alarms": [], "quarantine": quarantined(service),
    }
    box = service.outbox
    if box is not None:
        try:
            s = box.stats()
            out["outbox"] = {"pending": sum(s["pending"].values()), "pending_urgent": s["pending"]["urgent"],
                             "sent_unstored": s["sent_unstored"], "rows": s["rows"], "evicted": s["evicted"],
                             "feedback_pending": box.feedback_pending()}
        except OutboxError as exc:
            out["outbox"] = {"error": exc.reason}
    up = service.uplink
    if up is not None:
        s = up.stats()
        out["link"].update(connected=bool(s["connected"]), state=s["state"], last_error=s["last_error"],
                           last_delivery=_utc(up.last_acked_at), last_receipt=_utc(up.last_stored_at))
    alarms = [dict(a) for a in service.current_alarms()]
    alarms += [{"kind": "alarm", "reason": text} for text in list(service.alarms)[-5:]]
    out["alarms"] = alarms
    return out
