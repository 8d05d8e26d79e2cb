"""Calibration and evaluation samples, read through the runtime's own imaging path.

Every sample becomes a model input exactly as on the device: ``open_input(path).frame(0, manifest windowing)``
gives the display image (DICOM after its LUTs, PNG, JPEG) and ``edge_runtime.imaging.preprocess.prepare``
turns it into the tensor, with the manifest's preprocessing spec. Nothing here knows about engines.

Labelled data comes from ``quantize.datasets`` (same leakage-free splits as training: calibrate on TRAIN,
evaluate on VAL) or from a plain folder, where a file's label is its first sub-folder (``NORMAL/x.jpeg``).
Calibration picks a fixed number of samples, stratified by label: each label gets its share of the sample
in proportion to its frequency (largest remainders), chosen with a seeded generator. HC18 has no class label;
its strata are head-circumference quintiles, so small first-trimester and large term heads are both present.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.imaging.inputs import open_input, sniff
from edge_runtime.imaging.preprocess import ResizeGeometry, prepare
from edge_runtime.registry import ModelManifest

DATASETS = ("cxr-kermany", "hc18")
HC_STRATA = 5


@dataclass(frozen=True)
class Sample:
    """One labelled (or unlabelled) input file."""

    path: Path
    label: int | None = None  # class index for classification; None when unlabelled
    stratum: str = "all"  # what calibration stratifies on
    group: str = ""  # patient / subject, for bootstrap CIs
    pixel_size_mm: float | None = None  # HC18
    hc_mm: float | None = None  # HC18 ground truth
    annotation: Path | None = None  # HC18 outline


@dataclass
class CalibrationSet:
    """Model-input tensors for calibration plus where they came from (recorded in the manifest)."""

    tensors: list[np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors)


# ----------------------------------------------------------------------------------------------- listing
def dataset_samples(data: Path, dataset: str, split: str) -> list[Sample]:
    """Labelled samples of one split of a known dataset (quantize.datasets splits)."""
    from quantize import datasets as ds

    data = Path(data)
    if dataset == "cxr-kermany":
        return [
            Sample(p, label=lab, stratum=ds.CXR_LABELS[lab], group=g)
            for p, lab, g in ds.cxr_items_with_groups(data, split)
        ]
    if dataset == "hc18":
        items = ds.hc18_items(data, split)
        hc = np.array([it.hc_mm for it in items])
        edges = np.quantile(hc, np.linspace(0, 1, HC_STRATA + 1)[1:-1]) if len(hc) else []
        return [
            Sample(
                it.image,
                stratum=f"hc-q{int(np.searchsorted(edges, it.hc_mm, side='right')) + 1}",
                group=it.subject_id,
                pixel_size_mm=it.pixel_size_mm,
                hc_mm=it.hc_mm,
                annotation=it.annotation,
            )
            for it in items
        ]
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")


def folder_samples(folder: Path, labels: tuple[str, ...] = ()) -> list[Sample]:
    """Every DICOM/PNG/JPEG file under a folder (by content, not extension), sorted.

    A file's stratum is its first sub-folder; when that name matches one of `labels` (case-insensitive)
    it is also the file's class label. Files directly in the folder are unlabelled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    lookup = {name.lower(): i for i, name in enumerate(labels)}
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name.endswith("_Annotation.png"):
            continue
        try:
            sniff(p)
        except Exception:
            continue  # not an image: README, labels.csv, ...
        rel = p.relative_to(folder)
        stratum = rel.parts[0] if len(rel.parts) > 1 else "all"
        out.append(Sample(p, label=lookup.get(stratum.lower()), stratum=stratum, group=p.stem))
    if not out:
        raise FileNotFoundError(f"no DICOM, PNG or JPEG files under {folder}")
    return out


def stratified_pick(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """n samples, each stratum represented in proportion to its size (largest remainder), seeded; sorted by path."""
    if n <= 0:
        raise ValueError("the number of calibration samples must be positive")
    if n >= len(samples):
        return sorted(samples, key=lambda s: str(s.path))
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.stratum, []).append(s)
    names = sorted(by)
    quota = {k: n * len(by[k]) / len(samples) for k in names}
    take = {k: int(quota[k]) for k in names}
    for k in sorted(names, key=lambda k: (-(quota[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    rng = np.random.default_rng(seed)
    picked = []
    for k in names:
        members = sorted(by[k], key=lambda s: str(s.path))
        idx = rng.choice(len(members), size=min(take[k], len(members)), replace=False)
        picked += [members[i] for i in sorted(idx)]
    return sorted(picked, key=lambda s: str(s.path))


# ----------------------------------------------------------------------------------------------- tensors
def display_image(sample: Sample | Path, manifest: ModelManifest) -> np.ndarray:
    """The uint8 display image the runtime would see for this file (frame 0, manifest windowing)."""
    path = sample.path if isinstance(sample, Sample) else Path(sample)
    return open_input(path).frame(0, manifest.windowing)


def model_input(image: np.ndarray, manifest: ModelManifest) -> tuple[np.ndarray, ResizeGeometry]:
    return prepare(image, manifest.preprocess)


def _fingerprint(paths: list[Path], root: Path | None) -> str:
    names = []
    for p in paths:
        try:
            names.append(str(p.relative_to(root)) if root else p.name)
        except ValueError:
            names.append(p.name)
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def build_calibration(
    manifest: ModelManifest,
    data: Path,
    dataset: str | None = None,
    n: int = 300,
    seed: int = 0,
    split: str = "train",
) -> CalibrationSet:
    """n calibration tensors from a labelled dataset's split, or from any folder of images / DICOM files."""
    data = Path(data)
    if dataset:
        pool = dataset_samples(data, dataset, split)
        source = f"{dataset} {split} split (quantize.datasets)"
    else:
        pool = folder_samples(data, manifest.output.labels)
        split = ""
        source = "folder"
    picked = stratified_pick(pool, n, seed)
    tensors = [model_input(display_image(s, manifest), manifest)[0] for s in picked]
    strata = Counter(s.stratum for s in picked)
    provenance = {
        "source": source,
        "data": data.name,
        "dataset": dataset or "folder",
        "split": split,
        "n_samples": len(picked),
        "pool_size": len(pool),
        "seed": seed,
        "stratified_by": ("label" if dataset == "cxr-kermany" or (not dataset and any(s.label is not None for s in pool))
                          else "head-circumference quintile" if dataset == "hc18" else "sub-folder"),
        "strata": {k: strata[k] for k in sorted(strata)},
        "files_sha256": _fingerprint([s.path for s in picked], data),
        "input_path": f"open_input(file).frame(0, '{manifest.windowing}') -> edge_runtime.imaging.preprocess.prepare",
    }
    return CalibrationSet(tensors, provenance)


def ort_reader(calib: CalibrationSet, input_name: str):
    """A fresh onnxruntime CalibrationDataReader over the set (a reader can be consumed only once)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Also supports ORT's strided collection (set_range), which bounds the memory of histogram methods."""

        def __init__(self) -> None:
            self._it = iter(calib.tensors)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(calib.tensors)

        def __len__(self) -> int:
            return len(calib.tensors)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(calib.tensors[start_index:end_index])

    return _Reader()
