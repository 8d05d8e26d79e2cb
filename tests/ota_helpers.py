"""Helpers for the model-update tests: keys, model folders copied to tmp with a new version, bundles and the
hostile tars a bundle verifier must refuse. The shipped models/ folders are never modified."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from conftest import REPO

from edge_runtime.ota import bundle as bundles


def keypair(root: Path, name: str = "hub") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    private, public = root / f"{name}.key.pem", root / f"{name}.pub.pem"
    if not private.exists():
        bundles.generate_keypair(private, public)
    return private, public


def set_version(folder: Path, version: str) -> Path:
    manifest = folder / "manifest.toml"
    lines = manifest.read_text().splitlines(keepends=True)
    lines = [f'version = "{version}"\n' if line.startswith("version = ") else line for line in lines]
    manifest.write_text("".join(lines))
    return folder


def copy_model(src: Path, dest_root: Path, version: str | None = None) -> Path:
    """A copy of a model folder (shipped or test-built) under dest_root, optionally with another version."""
    dest = dest_root / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.sig"))
    return set_version(dest, version) if version else dest


def shipped(name: str) -> Path:
    return REPO / "models" / name


def members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar.getmembers()]


def rewrite(bundle: Path, out: Path, change) -> Path:
    """A copy of a bundle with `change(members)` applied to its (TarInfo, bytes) list."""
    items = change(members(bundle))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in items:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out


def file_info(name: str, data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_info(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, b""
