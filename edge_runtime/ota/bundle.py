"""Signed model bundles: `edge-runtime models pack FOLDER --key KEY --out BUNDLE` and `models verify BUNDLE`.

A bundle is an uncompressed tar of one folder `<name>/` holding the model folder as it will be installed:
  <name>/manifest.toml      the model's manifest with a [bundle] table appended (every file's sha256) and a
                            [selftest] table (the test vectors' file, its sha256 and the tolerances)
  <name>/manifest.toml.sig  ed25519 over manifest.toml's exact bytes (raw 64 bytes): the registry checks the
                            same file when models.public_key is set, so the installed folder stays verifiable
  <name>/selftest.npz       fixed inputs and each variant's outputs on them (selftest.py)
  <name>/...                every other file of the folder (model files, CARD.md, scope features, code)
The signature covers the manifest, the manifest covers every file: one signature check proves all bytes.
Verification reads the tar without extracting it and refuses links, devices, absolute paths, '..', a second
top folder, duplicate names, files the manifest does not list (or lists but the tar lacks) and anything over
the size cap. Packing is deterministic apart from `packed_at`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterator

from edge_runtime.errors import EdgeError
from edge_runtime.registry import MANIFEST, SIGNATURE, parse_manifest

SELFTEST_FILE = "selftest.npz"
MARKER = "# ---- written by `edge-runtime models pack`: every file's sha256 and the self-test (do not edit) ----"
DEFAULT_MAX_BYTES = 256 << 20
SKIPPED_NAMES = {"__pycache__", ".DS_Store"}
_BLOCK = 1 << 20


class BundleError(EdgeError):
    """A bundle that must not be installed; the message names the bundle and the one reason. `claimed`: the
    (name, version) its manifest states, when it was read that far (for the report only: nothing verified it)."""

    claimed: tuple[str, str] | None = None


@dataclass(frozen=True)
class VerifiedBundle:
    """What verification proved about a bundle file."""

    path: Path
    name: str
    version: str
    manifest_sha256: str
    files: dict[str, str]  # path inside <name>/ -> sha256 (manifest.toml and its signature excluded)
    signed: bool  # False only for a local install with no public key to check against
    size: int
    content_id: str = ""  # what "the same version with the same contents" compares (content_id())


def content_id(manifest_text: str, files: dict[str, str]) -> str:
    """The model's contents without what packing adds (pack time, vectors, signature): two packs of one folder,
    or a bundle and the shipped folder it was made from, have the same id."""
    import json

    base = manifest_text[: manifest_text.index(MARKER)] if MARKER in manifest_text else manifest_text
    kept = sorted((p, h) for p, h in files.items() if p not in (SELFTEST_FILE, MANIFEST, SIGNATURE))
    return sha256_bytes(json.dumps([base.rstrip("\n"), kept]).encode("utf-8"))


def folder_content_id(folder: Path) -> str:
    folder = Path(folder)
    files = {rel: _hash_file(folder / rel) for rel in folder_files(folder)}
    return content_id((folder / MANIFEST).read_text(encoding="utf-8"), files)


# ---------------------------------------------------------------- keys and signatures
def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(str(path), f"cannot read the signing key: a PEM PKCS#8 ed25519 private key without a "
                                     f"passphrase is needed ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(str(path), "the signing key is not an ed25519 key")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = Path(path).read_bytes()
        key = load_pem_public_key(data) if b"BEGIN PUBLIC KEY" in data else Ed25519PublicKey.from_public_bytes(data[:32])
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a PEM public key or 32 raw bytes"
        raise BundleError(str(path), f"cannot read the public key (models.public_key): {why}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(str(path), "models.public_key is not an ed25519 key")
    return key


def generate_keypair(private_out: Path, public_out: Path) -> None:
    """A new signing key (PEM PKCS#8, mode 0600) and its public half (PEM) for models.public_key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_out = Path(private_out)
    fd = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    Path(public_out).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))


# ---------------------------------------------------------------- pack
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every regular file under the folder (posix relative paths), the manifest and its signature excluded.
    A link would install something the signature does not describe: refused."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in SKIPPED_NAMES or part.startswith(".") for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise BundleError(str(folder), f"{rel} is a symbolic link; a bundle holds regular files only")
        if path.is_dir():
            continue
        if not path.is_file():
            raise BundleError(str(folder), f"{rel} is not a regular file")
        if rel.as_posix() in (MANIFEST, SIGNATURE, SELFTEST_FILE):
            continue
        out.append(rel.as_posix())
    return out


def base_manifest_text(text: str, where: str) -> str:
    """The manifest without a previous pack's block, so that re-packing an installed folder works."""
    if MARKER in text:
        text = text[: text.index(MARKER)]
    raw = tomllib.loads(text)
    for table in ("bundle", "selftest"):
        if table in raw:
            raise BundleError(where, f"the manifest already has a [{table}] table; `models pack` writes it")
    return text.rstrip("\n") + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bundle_block(files: dict[str, str], selftest_sha: str, tolerances: dict[str, tuple[float, float]],
                 packed_at: str) -> str:
    lines = ["", MARKER, "[bundle]", "format = 1", f"packed_at = {_toml_str(packed_at)}", "", "[bundle.files]"]
    lines += [f"{_toml_str(p)} = {_toml_str(s)}" for p, s in sorted(files.items())]
    lines += ["", "[selftest]", f"file = {_toml_str(SELFTEST_FILE)}", f"sha256 = {_toml_str(selftest_sha)}", "",
              "[selftest.tolerance]"]
    lines += [f"{p} = {{ atol = {a!r}, rtol = {r!r} }}" for p, (a, r) in sorted(tolerances.items())]
    return "\n".join(lines) + "\n"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
    tar.addfile(info, io.BytesIO(data))


def pack(folder: Path, key_path: Path, out: Path, *, vectors: bytes | None = None,
         tolerances: dict[str, tuple[float, float]] | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> VerifiedBundle:
    """Write a signed bundle of `folder`. `vectors`: a selftest.npz made elsewhere (e.g. on reference hardware);
    by default they are made here from the folder's own variants (selftest.make_vectors)."""
    from edge_runtime.ota import selftest

    folder = Path(folder)
    key = load_private_key(key_path)
    manifest_path = folder / MANIFEST
    manifest = parse_manifest(manifest_path)  # a manifest the device would refuse is refused here first
    if manifest.name != folder.name:
        raise BundleError(str(folder), f"the manifest's name is {manifest.name!r} but the folder is {folder.name!r}")
    base = base_manifest_text(manifest_path.read_text(encoding="utf-8"), str(manifest_path))
    names = folder_files(folder)
    files = {}
    for rel in names:
        files[rel] = _hash_file(folder / rel)
    vectors = vectors if vectors is not None else selftest.make_vectors(manifest)
    files[SELFTEST_FILE] = sha256_bytes(vectors)
    tol = dict(selftest.DEFAULT_TOLERANCES)
    tol.update(tolerances or {})
    packed_at = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    text = base + bundle_block({k: v for k, v in files.items() if k != SELFTEST_FILE}, files[SELFTEST_FILE], tol,
                               packed_at)
    parse_manifest_text_check(text, str(manifest_path))
    data = text.encode("utf-8")
    signature = key.sign(data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        try:
            with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, f"{manifest.name}/{MANIFEST}", data)
                _add(tar, f"{manifest.name}/{SIGNATURE}", signature)
                _add(tar, f"{manifest.name}/{SELFTEST_FILE}", vectors)
                for rel in names:
                    info = tarfile.TarInfo(f"{manifest.name}/{rel}")
                    info.size, info.mode, info.mtime = (folder / rel).stat().st_size, 0o644, 0
                    with open(folder / rel, "rb") as fh:
                        tar.addfile(info, fh)
            tmp.flush()
            os.fsync(tmp.fileno())
        except BaseException:
            os.unlink(tmp.name)
            raise
    size = os.path.getsize(tmp.name)
    if size > max_bytes:
        os.unlink(tmp.name)
        raise BundleError(str(folder), f"the bundle would be {size} bytes, over the cap of {max_bytes} bytes")
    os.replace(tmp.name, out)
    return VerifiedBundle(out, manifest.name, manifest.version, sha256_bytes(data), files, True, size,
                          content_id(text, files))


def parse_manifest_text_check(text: str, where: str) -> None:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a bug in bundle_block, not bad input
        raise BundleError(where, f"the packed manifest is not valid TOML ({exc})") from None


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- verify
def _members(tar: tarfile.TarFile, where: str) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, top folder, path below it) for every member, refusing anything that could land outside."""
    seen: set[str] = set()
    top: str | None = None
    for member in tar:
        name = member.name
        pure = PurePosixPath(name)
        if member.issym() or member.islnk():
            raise BundleError(where, f"the tar holds a link ({name} -> {member.linkname}); refused")
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or not pure.parts:
            raise BundleError(where, f"the tar holds a path outside its folder ({name!r}); refused")
        if member.isdir():
            continue
        if not member.isreg():
            raise BundleError(where, f"the tar holds {name!r}, which is not a regular file; refused")
        if len(pure.parts) < 2:
            raise BundleError(where, f"the tar holds {name!r} outside a model folder; refused")
        if top is None:
            top = pure.parts[0]
        elif pure.parts[0] != top:
            raise BundleError(where, f"the tar holds two folders ({top!r} and {pure.parts[0]!r}); one model per bundle")
        rel = PurePosixPath(*pure.parts[1:]).as_posix()
        if rel in seen:
            raise BundleError(where, f"the tar holds {name!r} twice; refused")
        seen.add(rel)
        yield member, top, rel


def verify(path: Path, public_key: Path | None, *, max_bytes: int = DEFAULT_MAX_BYTES,
           expect_name: str | None = None) -> VerifiedBundle:
    """Every check that needs no engine: size, tar shape, signature, manifest, every file's sha256.
    public_key None: the signature is not checked (a local install on a device without a key) and the result
    says so."""
    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(where, f"cannot read the bundle ({exc.strerror})") from None
    if size > max_bytes:
        raise BundleError(where, f"the bundle is {size} bytes, over the cap of {max_bytes} bytes "
                                 "(models.max_bundle_bytes)")
    key = load_public_key(public_key) if public_key is not None else None
    hashes: dict[str, str] = {}
    manifest_bytes = signature = None
    top = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            total = 0
            for member, top, rel in _members(tar, where):
                total += member.size
                if total > max_bytes:
                    raise BundleError(where, f"the bundle unpacks to over {max_bytes} bytes; refused")
                fh = tar.extractfile(member)
                if rel in (MANIFEST, SIGNATURE):
                    data = fh.read(1 << 20)
                    if rel == MANIFEST:
                        manifest_bytes = data
                    else:
                        signature = data
                    continue
                h = hashlib.sha256()
                while block := fh.read(_BLOCK):
                    h.update(block)
                hashes[rel] = h.hexdigest()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(where, f"not a model bundle (a tar from `edge-runtime models pack`): {exc}") from None
    if manifest_bytes is None:
        raise BundleError(where, f"no {MANIFEST} in the bundle")
    if key is not None:
        from cryptography.exceptions import InvalidSignature

        if signature is None:
            raise BundleError(where, f"the bundle is not signed (no {SIGNATURE})")
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise BundleError(where, "bad signature: the manifest does not verify against models.public_key "
                                     "(signed with another key, or the manifest was changed)") from None
    try:
        raw = tomllib.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(where, f"the manifest is not valid TOML ({exc})") from None
    name, version = raw.get("name"), raw.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not version:
        raise BundleError(where, "the manifest has no name or version")
    try:
        _check_listing(where, raw, name, top, expect_name, hashes)
    except BundleError as exc:
        exc.claimed = (name, version)
        raise
    return VerifiedBundle(path, name, version, sha256_bytes(manifest_bytes), hashes, key is not None, size,
                          content_id(manifest_bytes.decode("utf-8"), hashes))


def _check_listing(where: str, raw: dict, name: str, top: str | None, expect_name: str | None,
                   hashes: dict[str, str]) -> None:
    """The signed manifest against the tar: names, and every file listed, present and unchanged."""
    if name != top:
        raise BundleError(where, f"the manifest is for model {name!r} but the bundle's folder is {top!r}")
    if expect_name is not None and name != expect_name:
        raise BundleError(where, f"the manifest is for model {name!r}, not {expect_name!r}")
    listed = raw.get("bundle", {}).get("files") if isinstance(raw.get("bundle"), dict) else None
    if not isinstance(listed, dict):
        raise BundleError(where, "the manifest has no [bundle.files] table (not packed by `edge-runtime models pack`)")
    expected = {str(k): str(v).lower() for k, v in listed.items()}
    st = raw.get("selftest")
    if not isinstance(st, dict) or st.get("file") != SELFTEST_FILE or not isinstance(st.get("sha256"), str):
        raise BundleError(where, "the manifest has no [selftest] table with the test vectors' file and sha256")
    expected[SELFTEST_FILE] = st["sha256"].lower()
    for rel, digest in sorted(hashes.items()):
        if rel not in expected:
            raise BundleError(where, f"file {rel} is in the tar but not in the signed manifest; refused")
        if digest != expected[rel]:
            raise BundleError(where, f"changed file: {rel} does not match its sha256 in the signed manifest "
                                     f"(manifest {expected[rel][:12]}..., file {digest[:12]}...)")
    missing = sorted(set(expected) - set(hashes))
    if missing:
        raise BundleError(where, f"file {missing[0]} is listed in the manifest but missing from the tar")


def unpack(bundle: VerifiedBundle, dest: Path) -> None:
    """Write the bundle's files into `dest` (created, must not exist), re-hashing each as it is written: the file
    verified earlier may have changed since (the same bytes must land on disk). Every file is fsynced."""
    where = str(bundle.path)
    dest = Path(dest)
    dest.mkdir(parents=True)
    from edge_runtime.ota.install import halt_point

    with tarfile.open(bundle.path, mode="r:") as tar:
        written = 0
        for member, _top, rel in _members(tar, where):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            fh = tar.extractfile(member)
            with open(target, "wb") as out:
                while block := fh.read(_BLOCK):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            want = bundle.manifest_sha256 if rel == MANIFEST else bundle.files.get(rel)
            if rel != SIGNATURE and h.hexdigest() != want:
                raise BundleError(where, f"file {rel} changed between verification and unpacking; refused")
            written += 1
            if written == 2:
                halt_point("unpacking")  # tests: a crash with the folder half written
    for folder in sorted({p.parent for p in dest.rglob("*")} | {dest}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
