"""The report builder process: `python -m edge_runtime.pacs.builder FD NICE`.

Reads requests {"seq", "payload", "local", "path"} from the socket FD, builds each report into its path and answers
{"seq", "uid"} or {"seq", "error"} in order. Niced, so a backlog after a PACS outage takes the CPU the live
pipeline leaves; a process of its own, so building (highdicom, ~15-20 ms a report) never holds the daemon's GIL.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from multiprocessing.connection import Connection


def build_report_file(payload: str, local: dict, path: str) -> str:
    """Build one report into `path` (atomically); returns its SOP Instance UID. Raises ReportError when the
    finding cannot make a valid report."""
    from edge_runtime.pacs.sr import build_sr

    sr = build_sr(json.loads(payload), local)
    tmp = f"{path}.tmp"
    sr.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return str(sr.SOPInstanceUID)


def serve(conn: Connection) -> None:
    from edge_runtime.pacs.sr import ReportError

    try:
        conn.send_bytes(b'{"ready": true}')
    except OSError:
        return
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the daemon closed its end: done
        answer: dict = {"seq": request.get("seq")}
        try:
            answer["uid"] = build_report_file(request["payload"], request["local"], request["path"])
        except ReportError as exc:
            answer["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a finding that breaks highdicom: that report's error only
            answer["error"] = f"{type(exc).__name__}: {exc}"
        try:
            conn.send_bytes(json.dumps(answer).encode())
        except OSError:
            return  # the daemon is gone (killed): nobody to answer


def main() -> None:
    fd, nice = int(sys.argv[1]), int(sys.argv[2])
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    serve(Connection(socket.socket(fileno=fd).detach()))


if __name__ == "__main__":
    main()
