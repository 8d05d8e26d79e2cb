"""Live sources against real inputs: a video written by cv2.VideoWriter, the shared echo cine, the phantom."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from conftest import DICOM_DIR, needs_shared

from edge_runtime.slot import LatestSlot
from edge_runtime.sources.base import run_until
from edge_runtime.sources.cine import CineSource
from edge_runtime.sources.phantom import PhantomSource, PhantomSpec
from edge_runtime.sources.video import VideoSource


def write_video(path, frames=20, size=(160, 120), fps=20.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        img = np.full((size[1], size[0], 3), (i * 12) % 256, np.uint8)
        writer.write(img)
    writer.release()
    return path


def collect(slot: LatestSlot, seconds: float) -> list:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        f = slot.get(0.05)
        if f is not None:
            out.append(f)
    return out


def test_video_file_frames_in_order(tmp_path):
    path = write_video(tmp_path / "clip.avi")
    slot = LatestSlot()
    src = VideoSource("us-grabber", slot, str(path), fps=100, pixel_spacing_mm=0.3)
    src.start()
    frames = collect(slot, 0.6)
    src.stop()
    assert src.frames_in >= 20
    assert frames and frames[0].pixels.ndim == 2 and frames[0].pixels.shape == (120, 160)
    assert frames[0].pixel_spacing_mm == (0.3, 0.3) and frames[0].source_kind == "video"
    idx = [f.study.frame_index for f in frames]
    assert idx == sorted(idx)


def test_video_feed_that_ends_is_reopened(tmp_path):
    path = write_video(tmp_path / "clip.avi", frames=5)
    slot = LatestSlot()
    src = VideoSource("grabber", slot, str(path), fps=200)
    src.start()
    assert run_until(lambda: src.reconnects >= 2, 5.0)
    src.stop()
    assert src.frames_in >= 10 and src.running is False


def test_missing_device_retries_without_crashing(tmp_path):
    slot = LatestSlot()
    src = VideoSource("grabber", slot, str(tmp_path / "no-such-device.avi"))
    src.start()
    assert run_until(lambda: src.errors >= 2, 5.0)
    assert src.running
    # The device appears (USB grabber plugged in): frames start to flow.
    write_video(tmp_path / "no-such-device.avi")
    assert run_until(lambda: src.frames_in > 0, 15.0)
    src.stop()


@needs_shared
def test_cine_replays_at_its_frame_rate():
    slot = LatestSlot()
    src = CineSource("echo", slot, DICOM_DIR / "pydicom-data" / "color3d_jpeg_baseline.dcm", key=b"k" * 32)
    assert src.fps == pytest.approx(30.0, abs=0.01)
    src.start()
    frames = collect(slot, 1.0)
    src.stop()
    assert 20 <= src.frames_in <= 40  # about 30 in one second, never a burst
    f = frames[-1]
    assert f.pixels.shape == (480, 640, 3) and f.study.modality == "US" and f.study.study_id.startswith("2.25.")
    assert f.pixel_spacing_mm is not None


def test_phantom_source_drops_when_consumer_is_slow():
    slot = LatestSlot()
    src = PhantomSource("phantom", slot, fps=60, spec=PhantomSpec(width=320, height=216))
    src.start()
    got = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if slot.get(0.05) is not None:
            got += 1
            time.sleep(0.1)  # a model at 10 fps behind a 60 fps feed
    src.stop()
    assert src.frames_in >= 40 and slot.dropped >= src.frames_in - got - 1 and got <= 12


def test_a_source_that_cannot_open_is_down_with_reason_and_retry_then_up(tmp_path):
    class Flaky(PhantomSource):
        fail = True

        def open(self) -> None:
            if self.fail:
                raise OSError("grabber unplugged")

    src = Flaky("probe", LatestSlot(), fps=50)
    assert src.state.state == "starting"
    src.start()
    try:
        assert src.first_attempt.wait(10)
        down = src.state
        assert down.state == "down" and down.reason == "open failed: grabber unplugged" and down.next_retry
        assert run_until(lambda: src.errors >= 3, 10)
        assert src.state.since == down.since  # retries are the same outage: its clock keeps running
        src.fail = False
        assert run_until(lambda: src.state.state == "up" and src.frames_in > 0, 15)
    finally:
        src.stop()
    assert src.state.state == "stopped"
