"""Hostile and broken inputs (issue 12): a corpus built at test time from the shared files goes through `infer` and
the daemon's inbox; decoder crashes, hangs and memory blow-ups cost the file only; every file is accounted for."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import CR_CHEST, DICOM_DIR, needs_shared

from edge_runtime.errors import InputError
from edge_runtime.imaging.guard import DecodeLimits
from edge_runtime.imaging.isolation import DecodePool

sys.path.insert(0, str(Path(__file__).parent))
from hostile_corpus import EXPECT_REFUSED, build_corpus, jpeg_bomb, klass, png_bomb  # noqa: E402
from hostile_run import INTERNALS, run_daemon, run_infer  # noqa: E402

SMALL_US = DICOM_DIR / "pydicom-data" / "US1_UNCR.dcm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    if not DICOM_DIR.is_dir():
        pytest.skip(f"shared data not found at {DICOM_DIR}")
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus", quick=True)


def test_infer_survives_the_corpus_and_accounts_for_every_file(corpus, tmp_path):
    result = run_infer(corpus, tmp_path)
    assert result["rc"] == 1, "infer must end normally (1: some inputs failed), never by a signal"
    outcomes = result["outcomes"]
    assert not [n for n, o in outcomes.items() if not o], "every input ends with a finding or a reason"
    assert not result["stray_stderr"], result["stray_stderr"][:5]
    wrong = [n for n, o in outcomes.items() if klass(n) in EXPECT_REFUSED and any(k == "finding" for k, _ in o)]
    assert not wrong, f"broken files read as images: {wrong[:5]}"
    leaks = [(n, r) for n, o in outcomes.items() for k, r in o if k == "error" and INTERNALS.search(r)]
    assert not leaks, leaks[:5]
    reasons = {Path(n).name: r for n, o in outcomes.items() for k, r in o if k == "error"}
    minus_one = [r for n, r in reasons.items() if n.endswith("frames_-1.dcm")]
    assert minus_one and all("NumberOfFrames = -1" in r for r in minus_one)
    truncated = [r for n, r in reasons.items() if klass(n) == "trunc"]
    assert all(re.search("truncated|corrupt|no pixel data|not a DICOM|unreadable", r) for r in truncated), truncated
    assert any("inflates to more than" in r for n, r in reasons.items() if klass(n) == "deflate-bomb")
    crashes = [r for n, r in reasons.items() if klass(n) == "crash"]
    assert len(crashes) == 4 and all(re.search(r"decoder crashed with SIGABRT while decoding frame 0 with .*gdcm.*: "
                                               r"gdcm\w+\.[ch]xx:\d+", r) for r in crashes), crashes
    assert all("too large" in r for n, r in reasons.items() if klass(n) in ("png-bomb", "jpeg-bomb"))


def test_daemon_inbox_survives_the_corpus_within_its_memory(corpus, tmp_path):
    result = run_daemon(corpus, tmp_path)
    assert result["alive"], "the daemon died on the corpus"
    assert not result["left_in_inbox"], result["left_in_inbox"][:5]
    outcomes = result["outcomes"]
    assert not [f.name for f in corpus if not outcomes.get(f.name)], "every file ends in done/ or quarantine/"
    refused = [f.name for f in corpus if klass(f) in EXPECT_REFUSED]
    assert all(outcomes[n][0][0] == "quarantined" for n in refused), \
        [n for n in refused if outcomes[n][0][0] != "quarantined"][:5]
    reasons = [r for o in outcomes.values() for k, r in o if k == "quarantined"]
    assert not [r for r in reasons if INTERNALS.search(r)]
    crashed = [outcomes[f.name][0][1] for f in corpus if klass(f) == "crash"]
    assert len(crashed) == 4 and all("decoder crashed with SIGABRT" in r for r in crashed), crashed
    dup_uid = [n for n in outcomes if klass(n) == "dup-uid"]
    assert dup_uid and outcomes[dup_uid[0]][0][0] == "done", "a reused SOP Instance UID with other pixels is processed"
    assert not result["non_json_log_lines"], result["non_json_log_lines"][:5]
    assert result["peak_rss"] < 600 * 2**20, f"daemon peak RSS {result['peak_rss'] >> 20} MiB"


@needs_shared
def test_a_decoder_crash_is_a_reason_naming_the_signal_and_the_next_file_decodes():
    with DecodePool(timeout_s=120) as pool:
        pool.wait_ready()
        worker = pool._all[0]
        with open(f"/proc/{worker.proc.pid}/fd/2", "a") as native:  # what GDCM prints on its way down
            native.write("terminate called after throwing an instance of 'gdcm::Exception'\n"
                         "  what():  /project/gdcm_src/Source/MediaStorageAndFileFormat/gdcmBitmap.cxx:737 ():\n"
                         "An invalid logic behavior occurred\n")
        os.kill(worker.proc.pid, signal.SIGABRT)  # what GDCM's uncaught C++ exception does to a process
        worker.proc.wait(timeout=30)
        with pytest.raises(InputError, match=r"crashed with SIGABRT while opening it as DICOM: gdcmBitmap.cxx:737 "
                                             r"\(\): An invalid logic behavior occurred$"):
            pool.open(SMALL_US)
        with pool.open(SMALL_US) as inp:
            assert inp.frame(0).shape == (480, 640, 3)
        with pool.open(CR_CHEST) as inp:  # a crash in the middle of a file names the frame and the decoder
            os.kill(pool._all[0].proc.pid, signal.SIGSEGV)
            with pytest.raises(InputError, match=r"crashed with SIGSEGV while decoding frame 0 with JPEG 2000"):
                inp.frame(0)
        with pool.open(SMALL_US) as inp:
            assert inp.frame(0).shape == (480, 640, 3)
        assert pool.stats()["crashes"] == 2 and pool.stats()["restarts"] == 2


@needs_shared
def test_a_hung_decoder_is_stopped_after_the_timeout():
    with DecodePool(timeout_s=3) as pool:
        pool.wait_ready()
        worker = pool._all[0]
        os.kill(worker.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(InputError, match="took longer than 3 s"):
            pool.open(SMALL_US)
        assert time.monotonic() - t0 < 60
        pool.timeout_s = 120
        with pool.open(SMALL_US) as inp:
            assert inp.n_frames == 1 and inp.frame(0).dtype.name == "uint8"


@needs_shared
def test_a_decode_over_the_worker_memory_limit_costs_that_file_only():
    # The estimate lets the file through (limit raised), the worker's address-space limit stops the decode.
    with DecodePool(timeout_s=120, memory_bytes=24 << 20, limits=DecodeLimits(max_decode_bytes=1 << 40)) as pool:
        with pytest.raises(InputError, match="more than the decode worker has left|crashed with SIG"):
            with pool.open(CR_CHEST) as inp:
                inp.frame(0)
    with DecodePool(timeout_s=120) as pool:
        with pool.open(CR_CHEST) as inp:
            assert inp.frame(0).shape == (1955, 1841)


def test_image_bombs_are_refused_from_their_headers(tmp_path):
    png = tmp_path / "bomb.png"
    png.write_bytes(png_bomb(23000))
    jpeg = tmp_path / "bomb.jpeg"
    jpeg.write_bytes(jpeg_bomb(30000))
    with DecodePool(timeout_s=120) as pool:
        with pytest.raises(InputError, match="too large to decode safely"):
            pool.open(png)
        with pytest.raises(InputError, match="progressive JPEG needs about"):
            pool.open(jpeg)
        assert pool.stats()["crashes"] == 0


# ---------------------------------------------------------------- the daemon's study path, no silent outcome
def _service_config(tmp_path: Path, inbox: Path, model: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f'[device]\nid = "d"\nsite = "s"\nstate_dir = "{tmp_path / "state"}"\n\n'
                    '[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
                    '[service]\nmetrics_port = 0\nstop_timeout_s = 10\n\n'
                    f'[[sources]]\nname = "inbox"\nkind = "dicom-folder"\nmodel = "{model}"\ninbox = "{inbox}"\n')
    return path


def _rows(state: Path) -> list[dict]:
    import json
    import sqlite3

    conn = sqlite3.connect(state / "outbox.sqlite")
    try:
        return [json.loads(p) for (p,) in conn.execute("SELECT payload FROM findings ORDER BY seq")]
    finally:
        conn.close()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@needs_shared
def test_duplicates_an_identical_copy_is_logged_a_reused_uid_gets_its_own_finding(tmp_path, caplog):
    import logging

    import pydicom

    from edge_runtime.config import load_config
    from edge_runtime.service import Service

    caplog.set_level(logging.INFO, logger="edge_runtime.service")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    service = Service(load_config(_service_config(tmp_path, inbox, "cxr-pneumonia")))
    service.start()
    done = tmp_path / "inbox-done"
    try:
        (inbox / "a.dcm").write_bytes(CR_CHEST.read_bytes())
        _wait(lambda: (done / "a.dcm").exists(), 120, "a.dcm in done/")
        (inbox / "b.dcm").write_bytes(CR_CHEST.read_bytes())
        _wait(lambda: (done / "b.dcm").exists(), 120, "the identical copy in done/")
        assert len(_rows(tmp_path / "state")) == 1
        assert any("byte-identical" in r.getMessage() and "b.dcm" in r.getMessage() for r in caplog.records)
        other = pydicom.dcmread(DICOM_DIR / "pydicom-data" / "RG3_J2KI.dcm")
        other.SOPInstanceUID = pydicom.dcmread(CR_CHEST, stop_before_pixels=True).SOPInstanceUID
        other.save_as(inbox / "c.dcm")
        _wait(lambda: (done / "c.dcm").exists(), 120, "the reused UID in done/")
        rows = _rows(tmp_path / "state")
        assert len(rows) == 2, "a different image under a seen SOP Instance UID gets its own finding"
        assert rows[0]["study"]["instance_id"] == rows[1]["study"]["instance_id"]
        assert service.metrics.registry.get_sample_value("edge_decode_files_total") == 3
    finally:
        service.stop()


@needs_shared
def test_a_multi_frame_file_broken_after_some_frames_says_how_many_were_committed(tmp_path):
    import pydicom
    from hostile_corpus import _items
    from pydicom.encaps import generate_frames

    from edge_runtime.config import load_config
    from edge_runtime.service import Service

    ds = pydicom.dcmread(DICOM_DIR / "pydicom-data" / "examples_ybr_color.dcm")  # 30 JPEG frames
    frames = list(generate_frames(ds.PixelData, number_of_frames=30))
    frames[10] = frames[10][:-100]  # frame 10 lost its end in transfer
    ds.PixelData = _items(frames)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    ds.save_as(inbox / "cine.dcm")
    service = Service(load_config(_service_config(tmp_path, inbox, "fetal-head")))
    service.start()
    try:
        reason = tmp_path / "inbox-quarantine" / "cine.dcm.reason.txt"
        _wait(reason.exists, 180, "the quarantine reason")
        text = reason.read_text()
        assert "frame 10 is truncated" in text and "after 10 of 30 frames were committed" in text, text
        assert sorted(r["study"]["frame_index"] for r in _rows(tmp_path / "state")) == list(range(10))
    finally:
        service.stop()
