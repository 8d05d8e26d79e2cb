"""Torch-free access to the shared training data (Kermany chest X-ray, HC18 fetal head ultrasound).

Used by the training scripts, the quantization toolkit (calibration data) and the runtime tests, so every
consumer sees the same leakage-free train/validation split. Only numpy, OpenCV and the standard library.

Split rule (both datasets): images are grouped by patient/subject; a group goes to validation when
int(sha1(group key)[:8], 16) % 100 < 20. The assignment depends only on the key, never on listing order,
so adding or removing files does not move other groups between splits.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SPLITS = ("train", "val")
VAL_PERCENT = 20
CXR_LABELS = ("normal", "pneumonia")
CXR_CLASS_DIRS = {"NORMAL": 0, "PNEUMONIA": 1}

_PERSON_RE = re.compile(r"^(person\d+)_", re.IGNORECASE)
# Normal studies: IM-0523-0001.jpeg, IM-0523-0001-0002.jpeg, NORMAL2-IM-0381-0001.jpeg. Everything up to and
# including the IM-NNNN number identifies the patient/study; the trailing -NNNN counters number its images.
_NORMAL_RE = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)", re.IGNORECASE)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _is_val(key: str) -> bool:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def cxr_group(path: Path) -> str:
    """Patient group of a Kermany file name (before duplicate merging)."""
    name = Path(path).name
    m = _PERSON_RE.match(name) or _NORMAL_RE.match(name)
    if m:
        return m.group(1)
    # Unknown pattern: drop the extension and the final -NNNN / _NNNN image counter.
    return re.sub(r"[-_]\d+$", "", Path(name).stem)


def _sha1_file(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def cxr_all_items(root: Path) -> list[tuple[Path, int, str]]:
    """Every Kermany training image as (path, label, merged group key), sorted by path.

    Groups that share a byte-identical file are merged (union-find); the merged key is the smallest
    member key, so duplicates never straddle the split.
    """
    root = Path(root)
    files: list[tuple[Path, int]] = []
    for cls, label in CXR_CLASS_DIRS.items():
        d = root / "train" / cls
        if not d.is_dir():
            raise FileNotFoundError(f"missing {d}")
        files += [(p, label) for p in sorted(d.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            parent[hi] = lo

    first_by_hash: dict[str, str] = {}
    groups = []
    for p, _ in files:
        # Keys are qualified by class folder: person/IM numbering spaces are per folder.
        g = f"{p.parent.name}/{cxr_group(p)}"
        parent.setdefault(g, g)
        groups.append(g)
        h = _sha1_file(p)
        if h in first_by_hash:
            union(first_by_hash[h], g)
        else:
            first_by_hash[h] = g
    return sorted((p, label, find(g)) for (p, label), g in zip(files, groups))


def cxr_items(root: Path, split: str) -> list[tuple[Path, int]]:
    """Kermany images of one split as sorted (path, label) with label 0 = normal, 1 = pneumonia."""
    _check_split(split)
    want_val = split == "val"
    return [(p, label) for p, label, g in cxr_all_items(root) if _is_val(g) == want_val]


def cxr_items_with_groups(root: Path, split: str) -> list[tuple[Path, int, str]]:
    """Like cxr_items, plus the merged patient group (for bootstrap over patients)."""
    _check_split(split)
    want_val = split == "val"
    return [t for t in cxr_all_items(root) if _is_val(t[2]) == want_val]


@dataclass(frozen=True)
class HC18Item:
    image: Path
    annotation: Path
    pixel_size_mm: float
    hc_mm: float
    subject_id: str


def hc18_all_items(root: Path) -> list[HC18Item]:
    root = Path(root)
    items = []
    with open(root / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            img = root / "images" / row["filename"]
            ann = img.with_name(img.stem + "_Annotation.png")
            items.append(
                HC18Item(img, ann, float(row["pixel_size_mm"]), float(row["head_circumference_mm"]), str(row["subject_id"]).strip())
            )
    return sorted(items, key=lambda it: it.image.name)


def hc18_items(root: Path, split: str) -> list[HC18Item]:
    """HC18 images of one split, sorted by file name; split by subject_id."""
    _check_split(split)
    want_val = split == "val"
    return [it for it in hc18_all_items(root) if _is_val(f"hc18-subject-{it.subject_id}") == want_val]


def hc18_outline_ellipse(annotation_path: Path) -> tuple[tuple[float, float], tuple[float, float], float]:
    """cv2.fitEllipse of the annotation outline pixels: ((cx, cy), (full axis 1, full axis 2), angle)."""
    ann = cv2.imread(str(annotation_path), cv2.IMREAD_GRAYSCALE)
    if ann is None:
        raise FileNotFoundError(annotation_path)
    ys, xs = np.nonzero(ann > 127)
    if len(xs) < 5:
        raise ValueError(f"annotation has too few outline pixels: {annotation_path}")
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    (cx, cy), (d1, d2), angle = cv2.fitEllipse(pts)
    return (float(cx), float(cy)), (float(d1), float(d2)), float(angle)


def hc18_mask(annotation_path: Path) -> np.ndarray:
    """uint8 0/1 filled skull ellipse at the annotation's resolution."""
    from edge_runtime.heads.geometry import ellipse_mask  # numpy/cv2 only

    ann = cv2.imread(str(annotation_path), cv2.IMREAD_GRAYSCALE)
    if ann is None:
        raise FileNotFoundError(annotation_path)
    center, axes, angle = hc18_outline_ellipse(annotation_path)
    return ellipse_mask(ann.shape[:2], center, axes, angle)


def load_display_image(path: Path) -> np.ndarray:
    """uint8 HxW gray display image (Kermany JPEGs are gray content stored as RGB)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(path)
    return img
