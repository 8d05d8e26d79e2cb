"""A stand-in for the daemon's data path, run as a child process by the fault tests so it can be SIGKILLed.

Commits findings item-0 .. item-(n-1) into an outbox file, each under its own source_item (so a restarted
producer skips what was already committed, like a study file re-processed after a crash), while an Uplink
publishes them. Prints "committed <i>" after each commit and "drained" once every finding is stored at the hub
(a receipt for each: the outbox keeps rows until then, as the daemon does with mqtt.require_receipts).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqtt_helpers import fake_finding, mqtt_section, priority_of  # noqa: E402

from edge_runtime.findings import DeviceIdentity  # noqa: E402
from edge_runtime.outbox import Outbox  # noqa: E402
from edge_runtime.uplink import Uplink  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--urgent-every", type=int, default=5)
    p.add_argument("--pace", type=float, default=0.0)
    p.add_argument("--rate-limit", type=float, default=0.0)
    p.add_argument("--device-id", default="dev-kill")
    p.add_argument("--exit-when-drained", action="store_true")
    args = p.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    outbox = Outbox(args.db, keep_until_stored=True)
    identity = DeviceIdentity(args.device_id, "site-k")
    uplink = Uplink(outbox, mqtt_section(args.broker, rate_limit=args.rate_limit), identity).start()
    for i in range(args.n):
        if stop.is_set():
            break
        finding = fake_finding(i, priority_of(i, args.urgent_every), device_id=identity.device_id, site=identity.site)
        outbox.commit(finding, source_item=f"item-{i}")
        print(f"committed {i}", flush=True)
        if args.pace:
            time.sleep(args.pace)
    while not stop.is_set():
        if outbox.depth() == 0 and outbox.sent_unstored() == 0:
            print("drained", flush=True)
            if args.exit_when_drained:
                break
            stop.wait(0.5)
        else:
            stop.wait(0.02)
    uplink.stop(timeout=3.0)
    outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
