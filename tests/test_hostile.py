"""Hostile and broken inputs (issue 12): a corpus built at test time from the shared files goes through `infer` and
the daemon's inbox; decoder crashes, hangs and memory blow-ups cost the file only; every file is accounted for."""
from __future__ import annotations

import os
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
    assert all("truncated" in r or "corrupt" in r or "no pixel data" in r or "not a DICOM" in r or "unreadable" in r
               for n, r in reasons.items() if klass(n) == "trunc"), [r for n, r in reasons.items() if klass(n) == "trunc"]
    assert any("inflates to more than" in r for n, r in reasons.items() if klass(n) == "deflate-bomb")
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
    dup_uid = [n for n in outcomes if klass(n) == "dup-uid"]
    assert dup_uid and outcomes[dup_uid[0]][0][0] == "done", "a reused SOP Instance UID with other pixels is processed"
    assert not result["non_json_log_lines"], result["non_json_log_lines"][:5]
    assert result["peak_rss"] < 600 * 2**20, f"daemon peak RSS {result['peak_rss'] >> 20} MiB"


@needs_shared
def test_a_decoder_crash_is_a_reason_naming_the_signal_and_the_next_file_decodes():
    with DecodePool(timeout_s=120) as pool:
        pool.start()
        worker = pool._all[0]
        worker.wait_ready()
        os.kill(worker.proc.pid, signal.SIGABRT)  # what GDCM's uncaught C++ exception does to a process
        worker.proc.wait(timeout=30)
        with pytest.raises(InputError, match="crashed with SIGABRT"):
            pool.open(SMALL_US)
        with pool.open(SMALL_US) as inp:
            assert inp.frame(0).shape == (480, 640, 3)
        assert pool.stats()["crashes"] == 1 and pool.stats()["restarts"] == 1


@needs_shared
def test_a_hung_decoder_is_stopped_after_the_timeout():
    with DecodePool(timeout_s=3) as pool:
        pool.start()
        worker = pool._all[0]
        worker.wait_ready()
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
        with pytest.raises(InputError):
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
