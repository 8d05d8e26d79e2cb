"""`hub report` and `hub export` over both stores: priorities, urgent not reviewed, last contact and status,
seq gaps, --site and --since; CSV and JSON lines."""
from __future__ import annotations

import csv
import io
import json

import pytest

from mqtt_helpers import fake_finding
from pg_helpers import PgServer, needs_postgres
from edge_hub.messages import parse
from edge_hub.report import build_report, parse_since, render_report
from edge_hub.stores import open_store

T0 = 1_764_000_000.0  # received_at of the fleet below (epoch s)


@pytest.fixture(scope="module")
def pg():
    server = PgServer().start()
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def fleet(request, tmp_path):
    """site-a/dev-1: seq 1-10 without 4, 5 and 8; two urgent (seq 3 and 6), seq 3 reviewed; online.
    site-a/dev-2: seq 3-5 (1-2 never arrived); offline, status newer than its findings. site-b/dev-3: seq 1-2."""
    db = str(tmp_path / "hub.sqlite") if request.param == "sqlite" else request.getfixturevalue("pg").database()
    store = open_store(db, name="hub-test")
    rows, ids = [], {}
    plan = [("site-a", "dev-1", s, "urgent" if s in (3, 6) else "routine") for s in range(1, 11) if s not in (4, 5, 8)]
    plan += [("site-a", "dev-2", s, "routine") for s in (3, 4, 5)] + [("site-b", "dev-3", s, "routine") for s in (1, 2)]
    for n, (site, dev, seq, prio) in enumerate(plan):
        f = fake_finding(n, prio, dev, site) | {"seq": seq}
        ids[(dev, seq)] = f["finding_id"]
        rows.append(parse(f"edge/v1/{site}/{dev}/findings", json.dumps(f).encode(), T0 + seq))
    fb = {"feedback_id": "fb-1", "finding_id": ids[("dev-1", 3)], "verdict": "confirm"}
    rows.append(parse("edge/v1/site-a/dev-1/feedback", json.dumps(fb).encode(), T0 + 50))
    rows.append(parse("edge/v1/site-a/dev-1/status", b"online", T0 + 20, True))
    rows.append(parse("edge/v1/site-a/dev-2/status", b"offline", T0 + 100))
    store.write(rows)
    yield db, store, ids
    store.close()


def by_device(report: dict) -> dict[str, dict]:
    return {d["device_id"]: d for d in report["devices"]}


def test_report_shows_each_devices_state(fleet):
    _, store, ids = fleet
    r = build_report(store)
    d = by_device(r)
    assert list(d) == ["dev-1", "dev-2", "dev-3"]
    assert d["dev-1"]["findings"] == {"urgent": 2, "routine": 5}
    assert d["dev-1"]["urgent_unreviewed"] == 1, "seq 3 has feedback, seq 6 has none"
    assert d["dev-1"]["seq"] == {"first": 1, "last": 10, "missing": 3, "gaps": [[4, 5], [8, 8]]}
    assert d["dev-2"]["seq"]["gaps"] == [[1, 2]], "the first findings of a device never arrived"
    assert d["dev-3"]["seq"]["missing"] == 0
    assert (d["dev-1"]["status"], d["dev-2"]["status"], d["dev-3"]["status"]) == ("online", "offline", None)
    assert d["dev-1"]["last_contact"] == "2025-11-24T16:00:50Z", "the feedback at T0+50 is the newest contact"
    assert d["dev-2"]["last_contact"] == "2025-11-24T16:01:40Z"
    assert r["totals"] == {"devices": 3, "urgent_unreviewed": 1, "seq_missing": 5, "urgent": 2, "routine": 10}
    text = render_report(r)
    assert text[1].split() == ["SITE", "DEVICE", "STATUS", "LAST_CONTACT", "URGENT", "ROUTINE", "UNREVIEWED_URGENT",
                               "SEQ", "MISSING", "GAPS"]
    assert text[2].split()[:3] == ["site-a", "dev-1", "online"] and text[2].endswith("4-5, 8")
    assert text[-1].startswith("3 device(s); urgent 2, routine 10, urgent not reviewed 1, seq missing 5")


def test_report_filters_by_site_and_since(fleet):
    _, store, _ = fleet
    assert [d["device_id"] for d in build_report(store, site="site-b")["devices"]] == ["dev-3"]
    d = by_device(build_report(store, since=T0 + 6))  # findings received at T0+6 and later
    assert d["dev-1"]["findings"] == {"urgent": 1, "routine": 3} and d["dev-1"]["seq"]["gaps"] == [[8, 8]]
    assert d["dev-2"]["findings"] == {}, "no finding in the window"
    assert d["dev-2"]["last_contact"] == "2025-11-24T16:01:40Z", "last contact is not limited by --since"


def test_parse_since_takes_iso_and_spans():
    from edge_runtime.errors import ConfigError

    assert parse_since("2025-11-24T16:00:00Z") == T0
    assert parse_since("2025-11-24T17:00:00+01:00") == T0
    assert parse_since("24h", now=T0) == T0 - 86400 and parse_since("90m", now=T0) == T0 - 5400
    assert parse_since(None) is None
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        parse_since("yesterday")


def test_cli_report_and_exports(fleet, capsys, tmp_path):
    from edge_runtime.cli import main

    db, _, ids = fleet
    assert main(["hub", "report", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["seq_missing"] == 5
    assert main(["hub", "report", "--db", db, "--site", "site-a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hub report (") and "site site-a" in out[0] and len(out) == 5
    assert main(["hub", "export", "--db", db, "--format", "csv", "--site", "site-a"]) == 0
    got = capsys.readouterr()
    table = list(csv.DictReader(io.StringIO(got.out)))
    assert len(table) == 10 and "10 finding(s)" in got.err
    first = table[0]
    assert (first["device_id"], first["seq"], first["priority"], first["task"], first["label"]) == (
        "dev-1", "1", "routine", "classification", "normal")
    reviewed = next(r for r in table if r["finding_id"] == ids[("dev-1", 3)])
    assert (reviewed["reviewed"], reviewed["verdict"]) == ("True", "confirm")
    out_file = tmp_path / "fleet.jsonl"
    assert main(["hub", "export", "--db", db, "--output", str(out_file)]) == 0
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["finding_id"] == ids[("dev-1", 1)]
    assert lines[0]["hub"]["received_at"] == "2025-11-24T16:00:01Z" and lines[0]["model"]["name"] == "tiny-cls"


def test_cli_names_a_missing_database(tmp_path, capsys):
    from edge_runtime.cli import main

    assert main(["hub", "report", "--db", str(tmp_path / "nope.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.sqlite" in err and "no such file" in err
