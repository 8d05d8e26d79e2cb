"""`edge-runtime pacs refused|requeue`: the reports a PACS refused, read from the device's outbox, and sending them
again once the cause is fixed on the PACS (wired from cli.build_parser, like `collect`)."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from edge_runtime.pacs.reference import DESTINATION


def add_parser(sub) -> None:
    p = sub.add_parser("pacs", help="reports the PACS refused: list them, or send them again",
                       description="Read the outbox of --config's state directory (the daemon may be running). "
                                   "'refused' lists the reports the PACS refused, with its status; 'requeue' makes "
                                   "them pending again (all, or --finding ID ...) once the PACS accepts them.")
    p.add_argument("action", choices=["refused", "requeue"])
    p.add_argument("--finding", action="append", default=None, metavar="ID", help="requeue only this finding_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pacs)


def cmd_pacs(args: argparse.Namespace, config) -> int:
    from edge_runtime.outbox import Outbox

    with Outbox.from_config(config) as box:
        if args.action == "requeue":
            n = box.requeue_refused(DESTINATION, args.finding)
            print(f"{n} refused report(s) pending again; the running daemon sends them at its next pass")
            return 0
        rows = box.refused_deliveries(DESTINATION, limit=1000)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        when = datetime.fromtimestamp(r["at"], timezone.utc).isoformat(timespec="seconds") if r["at"] else "-"
        status = f"0x{r['status']:04X}" if r["status"] is not None else "local"
        print(f"{when}  {r['finding_id']}  {status}  {r['reason']}")
    if not rows:
        print("no refused reports")
    return 0
