"""Write a variant into a model folder and its manifest.toml.

The manifest is edited as text: a ``[[variants]]`` block (with its ``[variants.*]`` sub-tables) whose id
matches is replaced in place, otherwise a new block is inserted after the last variant. Everything else in the
file (other tables, key order, comments) is left byte-for-byte as it was. The new text is parsed with the
runtime's own ``parse_manifest`` and the variant's files are sha256-verified before the manifest is atomically
replaced, so a failed registration leaves the old manifest untouched.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from edge_runtime.registry import MANIFEST, parse_manifest, sha256_file, verify_variant

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]\s]+)\s*(\]\]?)\s*(#.*)?$")
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------------------------- TOML out
def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, Path):
        return json.dumps(str(v), ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    if hasattr(v, "item"):  # numpy scalar
        return _value(v.item())
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def render_variant(entry: dict[str, Any]) -> str:
    """A [[variants]] block: scalar keys first, then one [variants.<name>] sub-table per dict value."""
    lines = ["[[variants]]"]
    tables = []
    for k, v in entry.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{_key(k)} = {_value(v)}")
    for name, table in tables:
        lines += ["", f"[variants.{_key(name)}]"]
        lines += [f"{_key(str(k))} = {_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- text edit
def _variant_blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) line ranges of each [[variants]] block incl. its [variants.*] sub-tables; trailing blank and
    comment lines stay outside (they introduce whatever comes next)."""
    blocks: list[tuple[int, int]] = []
    start = None
    for i, line in enumerate(lines + ["[__end__]"]):
        m = _HEADER.match(line)
        if not m:
            continue
        name, is_array = m.group(2), m.group(1) == "[["
        continues = start is not None and name.startswith("variants.")
        if continues:
            continue
        if start is not None:
            end = i
            while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                end -= 1
            blocks.append((start, end))
            start = None
        if is_array and name == "variants":
            start = i
    return blocks


def upsert_variant_text(text: str, entry: dict[str, Any]) -> str:
    """Manifest text with the variant `entry['id']` replaced (or added after the last variant)."""
    raw = tomllib.loads(text)
    ids = [v.get("id") for v in raw.get("variants", [])]
    lines = text.splitlines()
    blocks = _variant_blocks(lines)
    if len(blocks) != len(ids):
        raise ValueError(f"found {len(blocks)} [[variants]] blocks but the manifest parses to {len(ids)} variants")
    new = render_variant(entry).splitlines()
    if entry["id"] in ids:
        start, end = blocks[ids.index(entry["id"])]
        lines[start:end] = new
    elif blocks:
        end = blocks[-1][1]
        lines[end:end] = [""] + new
    else:
        lines += [""] + new
    out = "\n".join(lines) + "\n"
    check = tomllib.loads(out)
    if [v.get("id") for v in check["variants"]].count(entry["id"]) != 1:
        raise ValueError(f"variant {entry['id']!r} not written exactly once")
    for k in raw:
        if k != "variants" and raw[k] != check.get(k):
            raise ValueError(f"manifest edit changed table {k!r}")
    return out


# ----------------------------------------------------------------------------------------------- register
def register_variant(
    model_dir: Path,
    entry: dict[str, Any],
    file: Path,
    weights: Path | None = None,
) -> Path:
    """Copy the variant's file(s) into the model folder, record their sha256, upsert the manifest entry.

    `entry` holds id, format, engines, precision and optional tables (metrics, calibration, quantization);
    file / sha256 / weights / weights_sha256 are filled in here. The new manifest text is parsed before any file
    is touched, and the copied files are verified against it before the manifest is replaced. Returns its path.
    """
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST
    file = Path(file)
    if weights is not None and Path(weights).with_suffix("").name != file.with_suffix("").name:
        raise ValueError("an OpenVINO IR's .xml and .bin must share a name")
    sources = [file] + ([Path(weights)] if weights is not None else [])
    body = {k: v for k, v in entry.items() if k not in ("id", "file", "sha256", "weights", "weights_sha256")}
    full: dict[str, Any] = {"id": entry["id"], "file": file.name}
    for k in ("format", "engines", "precision"):
        if k in body:
            full[k] = body.pop(k)
    full["sha256"] = sha256_file(file)
    if weights is not None:
        full["weights"] = Path(weights).name
        full["weights_sha256"] = sha256_file(weights)
    full.update({k: v for k, v in body.items() if not isinstance(v, dict)})
    full.update({k: v for k, v in body.items() if isinstance(v, dict)})
    text = upsert_variant_text(manifest_path.read_text(encoding="utf-8"), full)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        manifest = parse_manifest(tmp)  # the runtime must accept the new manifest before anything changes
        variant = next(v for v in manifest.variants if v.id == full["id"])
        for src in sources:
            dst = model_dir / src.name
            if src.resolve() != dst.resolve():
                part = dst.with_name(dst.name + ".tmp")
                shutil.copyfile(src, part)
                os.replace(part, dst)
        verify_variant(manifest, variant)  # the files in the folder match the hashes written
        os.replace(tmp, manifest_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return manifest_path


def remove_variant(model_dir: Path, variant_id: str) -> list[Path]:
    """Drop a variant's [[variants]] block and its files (unless another variant uses them); returns the removed
    files. Used when a re-run refuses a variant that an earlier run had registered: stale evidence must not ship."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST
    text = manifest_path.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    entries = raw.get("variants", [])
    ids = [v.get("id") for v in entries]
    if variant_id not in ids:
        return []
    if len(ids) == 1:
        raise ValueError(f"refusing to remove {variant_id!r}: a manifest needs at least one variant")
    lines = text.splitlines()
    blocks = _variant_blocks(lines)
    if len(blocks) != len(ids):
        raise ValueError(f"found {len(blocks)} [[variants]] blocks but the manifest parses to {len(ids)} variants")
    start, end = blocks[ids.index(variant_id)]
    while end < len(lines) and not lines[end].strip():
        end += 1  # the blank line that separated it from what follows
    del lines[start:end]
    out = "\n".join(lines) + "\n"
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(out, encoding="utf-8")
    try:
        parse_manifest(tmp)
        os.replace(tmp, manifest_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    gone = entries[ids.index(variant_id)]
    still = {e.get(k) for e in entries if e.get("id") != variant_id for k in ("file", "weights")}
    removed = []
    for k in ("file", "weights"):
        name = gone.get(k)
        if name and name not in still and (model_dir / name).is_file():
            (model_dir / name).unlink()
            removed.append(model_dir / name)
    return removed
