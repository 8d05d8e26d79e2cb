from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.imaging.preprocess import PreprocessSpec, prepare


def test_stretch_normalise_layout():
    img = np.full((100, 200), 255, np.uint8)
    spec = PreprocessSpec(height=32, width=48, mean=(0.5,), std=(0.25,))
    x, geo = prepare(img, spec)
    assert x.shape == (1, 1, 32, 48) and x.dtype == np.float32
    assert np.allclose(x, (1.0 - 0.5) / 0.25)
    assert geo.scale_x == pytest.approx(48 / 200) and geo.scale_y == pytest.approx(32 / 100)


def test_letterbox_keeps_aspect_and_maps_back():
    img = np.zeros((100, 400), np.uint8)
    img[:, 200:] = 255
    spec = PreprocessSpec(height=64, width=64, resize="letterbox")
    x, geo = prepare(img, spec)
    assert x.shape == (1, 1, 64, 64)
    assert x[0, 0, 0, :].max() == 0  # padding rows at the top
    assert geo.pad_y == 24 and geo.pad_x == 0
    back = geo.to_image(np.array([[32.0, 32.0]]))
    assert back[0] == pytest.approx([200.0, 50.0])


def test_rgb_to_gray_and_gray_to_rgb():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 1] = 255
    x, _ = prepare(rgb, PreprocessSpec(height=10, width=10))
    assert x.shape == (1, 1, 10, 10) and 0.5 < x.max() < 0.65  # BT.601 green weight 0.587
    gray = np.full((10, 10), 128, np.uint8)
    x, _ = prepare(gray, PreprocessSpec(height=10, width=10, channels="rgb", mean=(0, 0, 0), std=(1, 1, 1)))
    assert x.shape == (1, 3, 10, 10) and np.allclose(x, 128 / 255)


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((4, 4), np.float32), PreprocessSpec(height=4, width=4))
