"""The hub's subcommands, wired into `edge-runtime` by edge_runtime.cli: `collect` and `hub report|export`.

Only argparse here; each command imports what it runs when it runs, so the daemon's own commands never load
the hub's stores (nor psycopg).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from edge_runtime.errors import ConfigError, EdgeError

DB_HELP = "postgresql://user@host/db (a fleet: several collectors, one database) or a SQLite file PATH (one small hub)"


def add_parsers(sub, common=None) -> None:
    """`collect` and `hub report|export` on the main parser's subcommands; `common(parser)` adds the front door's
    own options (--config, -v, --log-level) to the nested `hub` actions, which its loop does not reach."""
    from edge_hub.collector import DEFAULT_TOPICS

    p = sub.add_parser("collect", help="subscribe to findings on a broker and store them idempotently (hub side)")
    p.add_argument("--broker", required=True, metavar="URL", help="mqtts://host:8883 (mqtt:// only to loopback "
                                                                  "unless --allow-insecure)")
    p.add_argument("--db", required=True, metavar="URL|PATH", help=DB_HELP)
    p.add_argument("--topic", action="append", default=None,
                   help=f"subscription, repeatable (default: {', '.join(DEFAULT_TOPICS)})")
    p.add_argument("--share", default="", metavar="GROUP",
                   help="join the shared-subscription group GROUP ($share/GROUP/<each topic>): several collectors "
                        "split the messages; give each its own --client-id")
    p.add_argument("--client-id", default="", help="stable id: the broker keeps the session under it "
                                                   "(default edge-collector-<hostname>)")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--session-expiry", type=int, default=7 * 24 * 3600, metavar="S",
                   help="MQTT 5: how long the broker queues findings while this collector is away (default 7 days)")
    p.add_argument("--ca-file", default="")
    p.add_argument("--cert-file", default="", help="client certificate for mutual TLS")
    p.add_argument("--key-file", default="")
    p.add_argument("--username", default="")
    p.add_argument("--password-file", default="", help="file holding the password (not on the command line)")
    p.add_argument("--allow-insecure", action="store_true", help="allow plaintext mqtt:// to a non-loopback broker")
    p.add_argument("--no-receipts", action="store_true", help="do not publish receipts to the devices (then set "
                                                              "mqtt.require_receipts = false on them)")
    p.add_argument("--batch-max", type=int, default=500, metavar="N",
                   help="stop reading and commit once a batch holds N messages (500; one read can add a few more)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (tests)")
    p.set_defaults(func=cmd_collect)

    hub = sub.add_parser("hub", help="what the hub's database holds: report per site and device, export findings")
    actions = hub.add_subparsers(dest="hub_command", required=True)
    r = actions.add_parser("report", help="per site and device: findings by priority, urgent not reviewed, last "
                                          "contact, seq gaps")
    e = actions.add_parser("export", help="findings as CSV or JSON lines")
    for q in (r, e):
        q.add_argument("--db", required=True, metavar="URL|PATH", help=DB_HELP)
        q.add_argument("--site", default=None, help="one site only")
        q.add_argument("--since", default=None, metavar="T",
                       help="findings received since T: ISO 8601 (2026-12-01T08:00Z) or a span (90m, 24h, 7d)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_hub_report)
    e.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    e.add_argument("--output", "-o", default="-", metavar="FILE", help="default: stdout")
    e.set_defaults(func=cmd_hub_export)
    if common is not None:
        for q in (r, e):
            common(q)


def _open_for_reading(db: str):
    from edge_hub.stores import StoreUnavailable, is_postgres_url, open_store

    if not is_postgres_url(db) and not Path(db).is_file():
        raise ConfigError("hub", f"--db {db!r}: no such file (a SQLite path, or a postgresql:// URL)")
    try:
        return open_store(db, where="hub", name="hub-report")
    except StoreUnavailable as exc:
        raise EdgeError("hub", str(exc)) from None


def cmd_hub_report(args: argparse.Namespace, config=None) -> int:
    from edge_hub.report import build_report, parse_since, render_report

    since = parse_since(args.since)
    store = _open_for_reading(args.db)
    try:
        report = build_report(store, args.site, since)
    finally:
        store.close()
    print(json.dumps(report, indent=2) if args.json else "\n".join(render_report(report)))
    return 0


def cmd_hub_export(args: argparse.Namespace, config=None) -> int:
    from edge_hub.report import export_rows, parse_since, write_export

    since = parse_since(args.since)
    store = _open_for_reading(args.db)
    try:
        if args.output == "-":
            n = write_export(export_rows(store, args.site, since), sys.stdout, args.format)
        else:
            try:
                with open(args.output, "w", encoding="utf-8", newline="") as out:
                    n = write_export(export_rows(store, args.site, since), out, args.format)
            except OSError as exc:
                raise EdgeError("hub", f"--output {args.output!r}: {exc.strerror}") from None
    finally:
        store.close()
    print(f"hub export: {n} finding(s)", file=sys.stderr)
    return 0


def cmd_collect(args: argparse.Namespace, config=None) -> int:
    from edge_hub.collector import DEFAULT_TOPICS, Collector, shared

    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError("collect", f"--password-file {args.password_file!r}: {exc.strerror}") from None
    if args.batch_max < 1:
        raise ConfigError("collect", f"--batch-max must be at least 1; got {args.batch_max}")
    topics = args.topic or list(DEFAULT_TOPICS)
    if args.share:
        topics = shared(topics, args.share)
    collector = Collector(args.broker, args.db, topic=topics, client_id=args.client_id, protocol=args.protocol,
                          session_expiry_s=args.session_expiry, ca_file=args.ca_file, cert_file=args.cert_file,
                          key_file=args.key_file, username=args.username, password=password,
                          allow_insecure=args.allow_insecure, receipts=not args.no_receipts,
                          batch_max=args.batch_max)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: collector._stop.set())
    try:
        collector.run(max_seconds=args.max_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from edge_hub.stores import StoreUnavailable

    try:
        counts = collector.store.counts()
    except StoreUnavailable:
        counts = {}  # the database is still away: this collector's own counts below
    finally:
        collector.store.close()
    mine = {k: collector.counters[k] for k in ("received", "stored", "duplicates", "rejected", "feedback", "statuses")}
    print(json.dumps({"db": _label(args.db), **counts, "connects": collector.counters["connects"],
                      "this_collector": mine}), flush=True)
    return 0


def _label(db: str) -> str:
    from edge_hub.stores.postgres import redact

    return redact(str(db))
