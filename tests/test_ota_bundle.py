"""Signed bundles: pack and verify round trip, and every bad bundle the issue names refused with one line."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from conftest import REPO, make_model_folder
from ota_helpers import copy_model, file_info, keypair, link_info, rewrite

from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.bundle import BundleError
from edge_runtime.registry import verify_signature


@pytest.fixture
def packed(tmp_path):
    private, public = keypair(tmp_path / "keys")
    folder = make_model_folder(tmp_path / "src", "tiny-cls")
    (folder / "CARD.md").write_text("card\n")
    out = bundles.pack(folder, private, tmp_path / "tiny-cls-0.0.1.bundle")
    return out, public, private, folder


def test_pack_then_verify_lists_every_file_and_the_signature_covers_the_manifest(packed, tmp_path):
    vb, public, _, folder = packed
    got = bundles.verify(vb.path, public)
    assert (got.name, got.version, got.signed) == ("tiny-cls", "0.0.1", True)
    assert set(got.files) == {"model.onnx", "CARD.md", "selftest.npz"}
    assert got.content_id == bundles.folder_content_id(folder)  # packing details are not "contents"
    dest = tmp_path / "unpacked"
    bundles.unpack(got, dest)
    raw = tomllib.loads((dest / "manifest.toml").read_text())
    assert raw["bundle"]["files"]["model.onnx"] == got.files["model.onnx"]
    assert raw["selftest"]["tolerance"]["int8"]["atol"] > raw["selftest"]["tolerance"]["fp32"]["atol"]
    verify_signature(dest, public)  # the installed folder passes the registry's own signature check
    assert not (folder / "manifest.toml.sig").exists() and "[bundle]" not in (folder / "manifest.toml").read_text()


def test_repacking_an_unpacked_folder_replaces_the_pack_block(packed, tmp_path):
    vb, public, private, _ = packed
    dest = tmp_path / "tiny-cls"
    bundles.unpack(bundles.verify(vb.path, public), dest)
    again = bundles.pack(dest, private, tmp_path / "again.bundle")
    assert again.content_id == vb.content_id
    assert bundles.verify(again.path, public).manifest_sha256 != ""


def refused(path, public, match: str, **kw) -> str:
    with pytest.raises(BundleError) as info:
        bundles.verify(path, public, **kw)
    line = str(info.value)
    assert "\n" not in line and match in line, line
    return line


def test_a_bundle_signed_with_another_key_is_refused(packed, tmp_path):
    vb, _, _, _ = packed
    _, other_public = keypair(tmp_path / "keys", "intruder")
    refused(vb.path, other_public, "bad signature")


def test_a_changed_file_is_refused(packed, tmp_path):
    vb, public, _, _ = packed

    def flip(items):
        return [(i, d[:-1] + bytes([d[-1] ^ 1]) if i.name.endswith("model.onnx") else d) for i, d in items]

    refused(rewrite(vb.path, tmp_path / "changed.bundle", flip), public, "changed file: model.onnx")


def test_a_changed_manifest_is_a_bad_signature(packed, tmp_path):
    vb, public, _, _ = packed

    def edit(items):
        return [(i, d.replace(b"threshold = 0.5", b"threshold = 0.1") if i.name.endswith("manifest.toml") else d)
                for i, d in items]

    refused(rewrite(vb.path, tmp_path / "edited.bundle", edit), public, "bad signature")


def test_an_extra_file_and_a_missing_file_are_refused(packed, tmp_path):
    vb, public, _, _ = packed
    extra = rewrite(vb.path, tmp_path / "extra.bundle", lambda items: items + [file_info("tiny-cls/evil.py", b"x")])
    refused(extra, public, "evil.py is in the tar but not in the signed manifest")
    short = rewrite(vb.path, tmp_path / "short.bundle",
                    lambda items: [(i, d) for i, d in items if not i.name.endswith("CARD.md")])
    refused(short, public, "CARD.md is listed in the manifest but missing")


@pytest.mark.parametrize("name, match", [
    ("../evil", "outside its folder"), ("/etc/evil", "outside its folder"), ("tiny-cls/../../evil", "outside its folder"),
    ("other/model.onnx", "two folders"), ("toplevel", "outside a model folder"),
])
def test_paths_outside_the_folder_are_refused(packed, tmp_path, name, match):
    vb, public, _, _ = packed
    bad = rewrite(vb.path, tmp_path / "bad.bundle", lambda items: items + [file_info(name, b"x")])
    refused(bad, public, match)


@pytest.mark.parametrize("hard", [False, True])
def test_links_in_the_tar_are_refused(packed, tmp_path, hard):
    vb, public, _, _ = packed
    bad = rewrite(vb.path, tmp_path / "link.bundle",
                  lambda items: items + [link_info("tiny-cls/passwd", "/etc/passwd", hard)])
    refused(bad, public, "holds a link")


def test_a_manifest_for_another_model_name_is_refused(packed, tmp_path):
    vb, public, private, _ = packed
    renamed = copy_model(make_model_folder(tmp_path / "src2", "tiny-seg", "segmenter"), tmp_path / "src3")
    other = bundles.pack(renamed, private, tmp_path / "seg.bundle")
    refused(other.path, public, "is for model 'tiny-seg', not 'tiny-cls'", expect_name="tiny-cls")

    def move(items):  # the signed manifest says tiny-cls, the folder says something else
        for info, _ in items:
            info.name = info.name.replace("tiny-cls/", "cxr-pneumonia/", 1)
        return items

    refused(rewrite(vb.path, tmp_path / "moved.bundle", move), public, "is for model 'tiny-cls' but the bundle's folder")


def test_a_bundle_over_the_size_cap_is_refused_before_it_is_read(packed):
    vb, public, _, _ = packed
    refused(vb.path, public, "over the cap of 1000 bytes", max_bytes=1000)


def test_not_a_tar_and_unsigned_are_refused(packed, tmp_path):
    vb, public, _, _ = packed
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x00" * 10 + b"not a tar" * 100)
    refused(junk, public, "not a model bundle")
    unsigned = rewrite(vb.path, tmp_path / "unsigned.bundle",
                       lambda items: [(i, d) for i, d in items if not i.name.endswith(".sig")])
    refused(unsigned, public, "not signed")


def test_a_folder_with_a_symlink_is_not_packed(tmp_path):
    private, _ = keypair(tmp_path / "keys")
    folder = make_model_folder(tmp_path / "src", "tiny-cls")
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="symbolic link"):
        bundles.pack(folder, private, tmp_path / "x.bundle")


def test_cli_pack_and_verify(tmp_path):
    private, public = keypair(tmp_path / "keys")
    folder = make_model_folder(tmp_path / "src", "tiny-cls")
    out = tmp_path / "b.bundle"
    run = lambda *a: subprocess.run([sys.executable, "-m", "edge_runtime", "models", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=REPO, timeout=120)
    p = run("pack", str(folder), "--key", str(private), "--out", str(out))
    assert p.returncode == 0, p.stderr
    p = run("verify", str(out), "--public-key", str(public))
    assert p.returncode == 0 and "signature verified" in p.stdout, p.stdout + p.stderr
    _, other = keypair(tmp_path / "keys", "other")
    p = run("verify", str(out), "--public-key", str(other))
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "bad signature" in p.stderr, p.stderr
