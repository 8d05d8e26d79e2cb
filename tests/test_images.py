from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.errors import InputError
from edge_runtime.imaging.inputs import open_input


def test_png_gray_and_rgb(tmp_path):
    gray = np.tile(np.arange(256, dtype=np.uint8), (10, 1))
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    inp = open_input(tmp_path / "g.png")
    assert inp.kind == "png" and inp.n_frames == 1
    assert np.array_equal(inp.frame(0), gray)
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :, 0] = 200  # red in RGB order
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = open_input(tmp_path / "c.png").frame(0)
    assert out.shape == (10, 20, 3) and out[0, 0, 0] == 200 and out[0, 0, 2] == 0


def test_rgb_file_with_gray_content_becomes_gray(tmp_path):
    gray = np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.jpg"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    out = open_input(tmp_path / "x.jpg").frame(0)
    assert out.ndim == 2


def test_16bit_png_is_windowed(tmp_path):
    data = np.linspace(0, 60000, 100 * 100).reshape(100, 100).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "w.png"), data)
    out = open_input(tmp_path / "w.png").frame(0)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_size_guard_uses_header(tmp_path):
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((200, 300), np.uint8))
    with pytest.raises(InputError, match="too large: 300x200x1"):
        open_input(tmp_path / "big.png", max_pixel_bytes=1000)


def test_truncated_jpeg(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    (tmp_path / "t.jpg").write_bytes(buf.tobytes()[:200])
    with pytest.raises(InputError) as info:
        open_input(tmp_path / "t.jpg").frame(0)
    assert "t.jpg" in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        open_input(tmp_path / "e.png")
