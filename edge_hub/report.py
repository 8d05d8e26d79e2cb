"""`edge-runtime hub report|export`: a thin layer over SQL on either store.

Report, per site and device: findings by priority, urgent findings nobody has reviewed yet (no feedback names
them), the last contact (the newest finding, feedback or status the hub got from it) and its status, and gaps
in `seq` (sequence numbers the hub never got: findings still in transit, lost, or evicted on the device). Export:
the findings themselves as CSV or JSON lines, streamed.

The SQL is written once; each store supplies its placeholders and how a timestamp becomes epoch seconds.
"""
from __future__ import annotations

import csv
import json
import re
import time
from datetime import datetime, timezone
from typing import IO, Any, Iterator

from edge_hub.stores import HubStore
from edge_runtime.cli import table_lines  # the status table's layout, for the hub's
from edge_runtime.errors import ConfigError

FIRST_SEQ = 1  # edge_runtime.findings.SequenceCounter starts at 1: a device whose first stored seq is 5 lost 1-4
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CSV_COLUMNS = ["finding_id", "site", "device_id", "seq", "priority", "created_at", "received_at", "task", "model",
               "model_version", "label", "probability", "measurements", "needs_review", "reviewed", "verdict", "dups"]


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'2026-12-01', '2026-12-01T08:00Z' (UTC unless an offset is given) or a span back from now: '90m',
    '24h', '7d'. -> epoch seconds."""
    if not text:
        return None
    m = _RELATIVE.match(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("hub", f"--since {text!r}: give an ISO 8601 time (2026-12-01T08:00Z) or a span "
                                 "such as 90m, 24h, 7d") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(float(epoch), timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Sql:
    """Fills a query template for one store: {p:name} is a parameter, {e:col} the column as epoch seconds,
    {where} the --site/--since filter on findings."""

    def __init__(self, store: HubStore, site: str | None, since: float | None) -> None:
        self.store, self.site, self.since = store, site, since
        self.params: dict[str, Any] = {"site": site, "since": since}

    def where(self, alias: str = "", since: bool = True) -> str:
        a = f"{alias}." if alias else ""
        parts = ["1 = 1"]
        if self.site is not None:
            parts.append(f"{a}site = {self.store.param.format('site')}")
        if since and self.since is not None:
            parts.append(self.store.since_param.format(col=f"{a}received_at"))
        return " AND ".join(parts)

    def epoch(self, col: str) -> str:
        return self.store.epoch.format(col=col)

    def rows(self, sql: str) -> list[tuple]:
        return self.store.query(sql, self.params)


def build_report(store: HubStore, site: str | None = None, since: float | None = None) -> dict[str, Any]:
    q = _Sql(store, site, since)
    devices: dict[tuple[str, str], dict[str, Any]] = {}

    def device(s: str | None, d: str | None) -> dict[str, Any]:
        key = (s or "?", d or "?")
        if key not in devices:
            devices[key] = {"site": key[0], "device_id": key[1], "status": None, "status_at": None,
                            "last_contact": None, "findings": {}, "urgent_unreviewed": 0,
                            "oldest_unreviewed": None, "seq": {"first": None, "last": None, "missing": 0, "gaps": []}}
        return devices[key]

    for s, d, priority, n in q.rows(
            f"SELECT site, device_id, priority, count(*) FROM findings WHERE {q.where()} "
            "GROUP BY site, device_id, priority"):
        device(s, d)["findings"][priority or "none"] = int(n)
    for s, d, n, oldest in q.rows(
            f"SELECT site, device_id, count(*), min({q.epoch('f.received_at')}) FROM findings f "
            f"WHERE f.priority = 'urgent' AND {q.where('f')} "
            "AND NOT EXISTS (SELECT 1 FROM feedback b WHERE b.finding_id = f.finding_id) GROUP BY site, device_id"):
        row = device(s, d)
        row["urgent_unreviewed"], row["oldest_unreviewed"] = int(n), iso(oldest)
    # Last contact is not limited by --since: a device silent for a week is what the report must show.
    contact = {}
    for s, d, t in q.rows(
            f"SELECT site, device_id, max(t) FROM ("
            f"SELECT site, device_id, max({q.epoch('received_at')}) AS t FROM findings WHERE {q.where(since=False)} "
            "GROUP BY site, device_id UNION ALL "
            f"SELECT site, device_id, max({q.epoch('received_at')}) FROM feedback WHERE {q.where(since=False)} "
            "GROUP BY site, device_id UNION ALL "
            f"SELECT site, device_id, {q.epoch('received_at')} FROM device_status WHERE {q.where(since=False)}"
            ") AS c GROUP BY site, device_id"):
        contact[(s or "?", d or "?")] = t
    for s, d, status, t in q.rows(
            f"SELECT site, device_id, status, {q.epoch('received_at')} FROM device_status WHERE {q.where(since=False)}"):
        row = device(s, d)
        row["status"], row["status_at"] = status, iso(t)
    for s, d, first, last in q.rows(
            f"SELECT site, device_id, min(seq), max(seq) FROM findings WHERE seq IS NOT NULL AND {q.where()} "
            "GROUP BY site, device_id"):
        row = device(s, d)
        row["seq"].update(first=int(first), last=int(last))
        if since is None and first > FIRST_SEQ:  # with --since the window starts wherever it starts
            row["seq"]["gaps"].append([FIRST_SEQ, int(first) - 1])
    for s, d, lo, hi in q.rows(
            "SELECT site, device_id, prev + 1, seq - 1 FROM ("
            "SELECT site, device_id, seq, lag(seq) OVER (PARTITION BY site, device_id ORDER BY seq) AS prev "
            f"FROM findings WHERE seq IS NOT NULL AND {q.where()}) AS g WHERE seq > prev + 1 "
            "ORDER BY site, device_id, seq"):
        device(s, d)["seq"]["gaps"].append([int(lo), int(hi)])
    for (s, d), row in devices.items():
        row["last_contact"] = iso(contact.get((s, d)))
        row["seq"]["missing"] = sum(hi - lo + 1 for lo, hi in row["seq"]["gaps"])
    ordered = [devices[k] for k in sorted(devices)]
    totals: dict[str, int] = {"devices": len(ordered), "urgent_unreviewed": 0, "seq_missing": 0}
    for row in ordered:
        for priority, n in row["findings"].items():
            totals[priority] = totals.get(priority, 0) + n
        totals["urgent_unreviewed"] += row["urgent_unreviewed"]
        totals["seq_missing"] += row["seq"]["missing"]
    return {"generated_at": iso(time.time()), "store": store.kind, "site": site, "since": iso(since),
            "devices": ordered, "totals": totals}


def _gaps_text(gaps: list[list[int]], limit: int = 3) -> str:
    parts = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in gaps[:limit]]
    return ", ".join(parts) + (f" (+{len(gaps) - limit} more)" if len(gaps) > limit else "") if parts else "-"


def render_report(report: dict[str, Any]) -> list[str]:
    """The report as a table, one line per device, then a totals line."""
    priorities = sorted({p for row in report["devices"] for p in row["findings"]},
                        key=lambda p: (p != "urgent", p != "routine", p))
    rows = []
    for row in report["devices"]:
        seq = row["seq"]
        rows.append({"site": row["site"], "device": row["device_id"], "status": row["status"] or "-",
                     "last_contact": row["last_contact"] or "-",
                     **{p: row["findings"].get(p, 0) for p in priorities},
                     "unreviewed_urgent": row["urgent_unreviewed"],
                     "seq": f"{seq['first']}-{seq['last']}" if seq["first"] is not None else "-",
                     "missing": seq["missing"], "gaps": _gaps_text(seq["gaps"])})
    scope = (f"site {report['site']}" if report["site"] else "all sites") + (
        f", findings since {report['since']}" if report["since"] else "")
    t = report["totals"]
    lines = [f"hub report ({report['store']}), {scope}, at {report['generated_at']}"]
    if rows:
        lines += table_lines(rows, ["site", "device", "status", "last_contact", *priorities, "unreviewed_urgent",
                                    "seq", "missing", "gaps"])
    lines.append(f"{t['devices']} device(s); " + ", ".join(f"{p} {t.get(p, 0)}" for p in priorities)
                 + (", " if priorities else "") + f"urgent not reviewed {t['urgent_unreviewed']}, "
                 f"seq missing {t['seq_missing']}")
    return lines


def export_rows(store: HubStore, site: str | None = None, since: float | None = None) -> Iterator[tuple]:
    """(finding_id, site, device_id, seq, priority, created_at, received_at epoch, payload text, dups, verdict)
    in site, device, seq order; verdict is the newest feedback's, None when unreviewed."""
    q = _Sql(store, site, since)
    sql = (f"SELECT f.finding_id, f.site, f.device_id, f.seq, f.priority, f.created_at, {q.epoch('f.received_at')}, "
           f"{store.as_text.format(col='f.payload')}, f.dups, "
           "(SELECT b.verdict FROM feedback b WHERE b.finding_id = f.finding_id "
           "ORDER BY b.received_at DESC LIMIT 1) "
           f"FROM findings f WHERE {q.where('f')} ORDER BY f.site, f.device_id, f.seq, f.finding_id")
    return iter(store.stream(sql, q.params))


def _csv_row(row: tuple) -> list[Any]:
    finding_id, site, device, seq, priority, created, received, text, dups, verdict = row
    try:
        f = json.loads(text)
    except ValueError:
        f = {}
    result = f.get("result") if isinstance(f.get("result"), dict) else {}
    model = f.get("model") if isinstance(f.get("model"), dict) else {}
    label = result.get("label")
    probs = result.get("probabilities") if isinstance(result.get("probabilities"), dict) else {}
    measurements = result.get("measurements")
    return [finding_id, site, device, seq, priority, created, iso(received), f.get("task"), model.get("name"),
            model.get("version"), label, probs.get(label) if label is not None else None,
            json.dumps(measurements, separators=(",", ":")) if measurements else None,
            result.get("needs_review"), verdict is not None, verdict, dups]


def write_export(rows: Iterator[tuple], out: IO[str], fmt: str) -> int:
    """CSV (one row per finding, the columns in CSV_COLUMNS) or JSON lines (each finding's JSON, with a "hub"
    object added: received_at, dups, verdict; from PostgreSQL the keys come in jsonb's order). -> rows written."""
    n = 0
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for row in rows:
            w.writerow(_csv_row(row))
            n += 1
        return n
    for row in rows:
        finding_id, _, _, _, _, _, received, text, dups, verdict = row
        try:
            f = json.loads(text)
        except ValueError:
            f = {"finding_id": finding_id}
        f["hub"] = {"received_at": iso(received), "dups": dups, "verdict": verdict}
        out.write(json.dumps(f, separators=(",", ":")) + "\n")
        n += 1
    return n
