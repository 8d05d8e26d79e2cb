"""A synthetic B-mode fetal head phantom with a known head circumference.

Speckle (Rayleigh-distributed, as envelope-detected ultrasound is) inside a sector-shaped field of view,
a bright elliptical skull echo of known outer axes, a darker brain with a midline echo, and a little probe
motion from frame to frame. Used by the demo and tests: the ground-truth circumference is exact, so a
measurement error is the pipeline's, not the annotator's.

With sweeps (`SweepSchedule`) the probe is put on for a few seconds, lifted (speckle only, no head) and put back
on a head of another known circumference, so that exams (edge_runtime/exams.py) can be checked end to end.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edge_runtime.frames import Frame, StudyRef
from edge_runtime.heads.geometry import ramanujan_perimeter
from edge_runtime.sources.base import LiveSource


@dataclass(frozen=True)
class PhantomSpec:
    width: int = 800
    height: int = 540
    pixel_spacing_mm: float = 0.2
    head_circumference_mm: float = 220.0  # about 24 weeks by Hadlock
    axis_ratio: float = 0.8  # minor / major axis (cephalic index ~ 80 %)
    skull_thickness_mm: float = 3.0
    seed: int = 0

    def axes_px(self) -> tuple[float, float]:
        """Full outer axes in pixels giving exactly head_circumference_mm."""
        # Perimeter scales linearly with the axes: solve for the major semi-axis by scaling a unit ellipse.
        unit = ramanujan_perimeter(1.0, self.axis_ratio)
        a_mm = self.head_circumference_mm / unit
        a_px = a_mm / self.pixel_spacing_mm
        return 2 * a_px, 2 * a_px * self.axis_ratio


@dataclass(frozen=True)
class SweepSchedule:
    """Head shown for `on_s`, probe lifted for `off_s` (longer than the default exam gap of 2 s), repeated; sweep
    n shows circumferences[n % len]. The sizes sit in the range where the shipped model's bias on this phantom
    is under 2 mm (about -0.8 %: -1.2 mm at 160 mm, -2.0 mm at 220 mm; BENCHMARKS.md, "Exams")."""

    on_s: float = 5.0
    off_s: float = 3.0
    circumferences_mm: tuple[float, ...] = (190.0, 165.0, 200.0, 175.0)

    def at(self, t_s: float) -> tuple[int, float | None]:
        """(sweep number, true circumference or None while the probe is lifted) at t_s seconds into the feed."""
        period = self.on_s + self.off_s
        n = int(t_s // period)
        if t_s - n * period >= self.on_s:
            return n, None
        return n, self.circumferences_mm[n % len(self.circumferences_mm)]


class Phantom:
    """Endless frames: `frame(i)` returns a uint8 gray display image for frame number i."""

    def __init__(self, spec: PhantomSpec = PhantomSpec()) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        h, w = spec.height, spec.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        apex = (w / 2, -h * 0.15)
        angle = np.degrees(np.arctan2(xx - apex[0], yy - apex[1]))
        radius = np.hypot(xx - apex[0], yy - apex[1])
        self.sector = ((np.abs(angle) < 38) & (radius < h * 1.12) & (radius > h * 0.2)).astype(np.float32)
        self.depth_gain = np.clip(1.15 - yy / (h * 1.6), 0.35, 1.0)
        # A few pre-drawn speckle fields, cycled: drawing Rayleigh noise per frame would dominate the cost.
        # Speckle grains span a few pixels (the point-spread function): blur Rayleigh noise, renormalise.
        self.speckle = []
        for _ in range(8):
            grain = cv2.GaussianBlur(self.rng.rayleigh(0.5, (h, w)).astype(np.float32), (0, 0), 1.8)
            self.speckle.append(grain / grain.mean())
        self.yy, self.xx = yy, xx

    def center_at(self, index: int) -> tuple[float, float, float]:
        """Head centre (x, y) in pixels and rotation in degrees at frame `index` (slow probe motion)."""
        s = self.spec
        t = index / 30.0
        cx = s.width / 2 + 18 * math.sin(2 * math.pi * t / 4.0)
        cy = s.height * 0.55 + 10 * math.sin(2 * math.pi * t / 3.0)
        return cx, cy, 15 + 8 * math.sin(2 * math.pi * t / 5.0)

    def frame(self, index: int, head_circumference_mm: float | None = -1.0) -> np.ndarray:
        """The frame with the spec's head (default), a head of another circumference, or None: no head, the
        probe lifted off the belly (maternal-tissue speckle only)."""
        s = self.spec
        h, w = s.height, s.width
        echo = np.full((h, w), 0.45, np.float32)  # maternal tissue
        if head_circumference_mm is None:
            img = echo * self.speckle[index % len(self.speckle)] * self.depth_gain * self.sector
            return np.clip(img * 200.0, 0, 255).astype(np.uint8)
        if head_circumference_mm > 0:
            s = dataclasses.replace(s, head_circumference_mm=head_circumference_mm)
        major, minor = s.axes_px()
        cx, cy, rot = self.center_at(index)
        cv2.ellipse(echo, ((cx, cy), (major * 1.45, minor * 1.6), rot), 0.06, thickness=-1, lineType=cv2.LINE_AA)  # fluid
        thick = max(2, int(round(s.skull_thickness_mm / s.pixel_spacing_mm)))
        inner = (major - 2 * thick, minor - 2 * thick)
        cv2.ellipse(echo, ((cx, cy), (major, minor), rot), 0.28, thickness=-1, lineType=cv2.LINE_AA)  # brain
        # Skull: a ring whose outer edge is the measured outline. Bone facing the beam echoes brightest,
        # the lateral walls (parallel to the beam) much less, as on a real scan.
        ring = np.zeros_like(echo)
        cv2.ellipse(ring, ((cx, cy), (major, minor), rot), 1.0, thickness=-1, lineType=cv2.LINE_AA)
        cv2.ellipse(ring, ((cx, cy), inner, rot), 0.0, thickness=-1, lineType=cv2.LINE_AA)
        facing = 0.45 + 0.55 * np.abs(np.sin(np.arctan2(self.yy - cy, self.xx - cx)))
        echo = np.maximum(echo, ring * 1.5 * facing)
        # Midline echo (falx) along the major axis.
        r = math.radians(rot)
        dx, dy = math.cos(r) * inner[0] / 2 * 0.85, math.sin(r) * inner[0] / 2 * 0.85
        cv2.line(echo, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 0.8, 3, cv2.LINE_AA)
        img = echo * self.speckle[index % len(self.speckle)] * self.depth_gain * self.sector
        return np.clip(img * 200.0, 0, 255).astype(np.uint8)


class PhantomSource(LiveSource):
    """The phantom as a live feed at a fixed frame rate, with its calibration attached to every frame."""

    kind = "phantom"

    def __init__(self, name: str, slot, fps: float = 30.0, spec: PhantomSpec = PhantomSpec(),
                 sweeps: SweepSchedule | None = None) -> None:
        super().__init__(name, slot, fps=fps)
        self.phantom = Phantom(spec)
        self.sweeps = sweeps
        self.index = 0

    def truth_at(self, index: int) -> tuple[int, float | None]:
        """(sweep number, true head circumference or None: no head) of frame `index`. The schedule runs on
        frame numbers at the nominal rate, so the truth of a frame is exact however the capture is paced."""
        if self.sweeps is None:
            return 0, self.phantom.spec.head_circumference_mm
        return self.sweeps.at(index / (self.fps or 30.0))

    def read(self) -> Frame:
        captured = time.monotonic()
        pixels = self.phantom.frame(self.index, self.truth_at(self.index)[1]) if self.sweeps else \
            self.phantom.frame(self.index)
        spacing = (self.phantom.spec.pixel_spacing_mm,) * 2
        frame = Frame(pixels, self.kind, self.name, captured_at=captured, pixel_spacing_mm=spacing,
                      study=StudyRef(modality="US", frame_index=self.index))
        self.index += 1
        return frame
