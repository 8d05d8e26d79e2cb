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
    # The boundary between model pixels 31 and 32 (pixel-centre coordinates 31.5) is the image's 200 / 50
    # boundary, at image pixel-centre coordinates 199.5 / 49.5.
    back = geo.to_image(np.array([[31.5, 31.5]]))
    assert back[0] == pytest.approx([199.5, 49.5])


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


def test_geometry_maps_model_pixels_back_to_image_pixel_centres():
    from edge_runtime.imaging.preprocess import ResizeGeometry

    halve = ResizeGeometry(0.5, 0.5)  # 800 -> 400: model pixel 0 covers image pixels 0 and 1
    assert np.allclose(halve.to_image([[0, 0], [399, 199]]), [[0.5, 0.5], [798.5, 398.5]])
    boxed = ResizeGeometry(0.25, 0.25, pad_x=10.0, pad_y=4.0)
    assert np.allclose(boxed.to_image([[10, 4]]), [[1.5, 1.5]])  # first real pixel: centre of the first 4x4 block
