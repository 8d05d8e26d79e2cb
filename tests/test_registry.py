from __future__ import annotations

import base64

import pytest
from conftest import make_model_folder

from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.registry import ModelRegistry, parse_manifest, verify_variant


def test_lists_and_parses(models_root):
    reg = ModelRegistry([models_root])
    assert reg.names() == ["tiny-cls", "tiny-seg"]
    m = reg.get("tiny-cls")
    assert m.task == "classification" and m.input.shape == (1, 1, 32, 32)
    assert m.decision.positive_label == "bright" and m.decision.urgent_if_positive
    assert m.variant("openvino", "fp32").id == "fp32"
    seg = reg.get("tiny-seg")
    assert seg.preprocess.resize == "letterbox" and seg.segmentation.gestational_age == "hadlock-1984-hc"


def test_unknown_model_names_the_installed_ones(models_root):
    with pytest.raises(ModelError, match="unknown model; installed models: tiny-cls, tiny-seg"):
        ModelRegistry([models_root]).get("nope")


def test_missing_variant_precision(models_root):
    m = ModelRegistry([models_root]).get("tiny-cls")
    with pytest.raises(ModelError, match="no int8 variant for engine onnxruntime"):
        m.variant("onnxruntime", "int8")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('task = "classification"\n', ""), "key 'task' is missing"),
        (lambda t: t.replace("shape = [1, 1, 32, 32]", 'shape = "32x32"'), "key 'input.shape' must be list"),
        (lambda t: t.replace('activation = "softmax"', 'activation = "relu"'), "'output.activation' must be one of softmax, sigmoid"),
        (lambda t: t.replace('positive_label = "bright"', 'positive_label = "dark"'), "'decision.positive_label' must be one of"),
        (lambda t: t.replace("threshold = 0.5", 'threshold = "high"'), "'decision.threshold' must be float"),
        (lambda t: t.replace('precision = "fp32"', 'precision = "fp8"'), "'variants[0].precision' must be one of"),
        (lambda t: t.replace("[input]", "[inputs]"), "key 'input' is missing"),
        (lambda t: t + "\n[[[", "invalid TOML"),
    ],
)
def test_manifest_errors_name_file_and_key(models_root, edit, message):
    path = models_root / "tiny-cls" / "manifest.toml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as info:
        parse_manifest(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_hash_mismatch_is_refused(models_root):
    reg = ModelRegistry([models_root])
    m = reg.get("tiny-cls")
    v = m.variant("onnxruntime", "fp32")
    verify_variant(m, v)  # intact
    with open(v.path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256 mismatch for model.onnx"):
        verify_variant(m, v)


def test_missing_file_is_refused(models_root):
    m = ModelRegistry([models_root]).get("tiny-cls")
    v = m.variant("onnxruntime", "fp32")
    v.path.unlink()
    with pytest.raises(ModelError, match="is missing"):
        verify_variant(m, v)


def test_folder_name_must_match_manifest_name(models_root):
    make_model_folder(models_root, "other")
    path = models_root / "other" / "manifest.toml"
    path.write_text(path.read_text().replace('name = "other"', 'name = "tiny-cls"'))
    with pytest.raises(ConfigError, match="'name' is 'tiny-cls' but the folder is 'other'"):
        ModelRegistry([models_root]).get("other")


def test_ed25519_signature(models_root, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pub = tmp_path / "models.pub"
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    folder = models_root / "tiny-cls"
    manifest_bytes = (folder / "manifest.toml").read_bytes()

    # Unsigned: refused once a key is configured, accepted without one.
    with pytest.raises(ModelError, match="unsigned manifest"):
        ModelRegistry([models_root], public_key=pub).get("tiny-cls")
    ModelRegistry([models_root]).get("tiny-cls")

    (folder / "manifest.toml.sig").write_bytes(base64.b64encode(private.sign(manifest_bytes)))
    assert ModelRegistry([models_root], public_key=pub).get("tiny-cls").name == "tiny-cls"

    # Any change to the manifest (say, a swapped sha256) breaks the signature.
    (folder / "manifest.toml").write_bytes(manifest_bytes.replace(b"0.0.1", b"0.0.2"))
    with pytest.raises(ModelError, match="does not verify"):
        ModelRegistry([models_root], public_key=pub).get("tiny-cls")

    other = Ed25519PrivateKey.generate()
    (folder / "manifest.toml").write_bytes(manifest_bytes)
    (folder / "manifest.toml.sig").write_bytes(other.sign(manifest_bytes))
    with pytest.raises(ModelError, match="does not verify"):
        ModelRegistry([models_root], public_key=pub).get("tiny-cls")


def test_a_variant_that_needs_a_cpu_capability_is_refused_where_the_cpu_lacks_it(tmp_path, monkeypatch):
    """A QDQ graph with full-range 8-bit weights needs VNNI on OpenVINO (cxr-pneumonia 1.0.0's int8-qdq did; 1.1.0's
    has 7-bit weights and needs nothing): without it the daemon's fall-back rule gives fp32 and an explicit
    --precision int8 is one line naming what is missing."""
    import shutil

    import edge_runtime.engines.cpu as cpu
    from edge_runtime.errors import ConfigError, EdgeError
    from edge_runtime.registry import ModelRegistry

    assert cpu.missing(("vnni",), frozenset({"avx2", "fma"})) == ["vnni"]
    assert cpu.missing(("vnni",), frozenset({"avx2", "avx512_vnni"})) == []
    assert cpu.missing(("vnni",), frozenset({"amx_int8"})) == []
    shipped = ModelRegistry().get("cxr-pneumonia")
    assert all(not v.cpu_requires for v in shipped.variants)
    folder = tmp_path / "models" / "cxr-pneumonia"
    shutil.copytree(shipped.folder, folder)
    text = (folder / "manifest.toml").read_text()
    assert text.count("\n[training]\n") == 1 and text.rfind("[[variants]]") < text.index("[training]")
    (folder / "manifest.toml").write_text(  # the last variant is int8-qdq: its own sub-table
        text.replace("\n[training]\n", '\n[variants.cpu_requires]\nopenvino = ["vnni"]\n\n[training]\n'))
    manifest = ModelRegistry([tmp_path / "models"]).get("cxr-pneumonia")
    v = next(v for v in manifest.variants if v.id == "int8-qdq")
    assert v.cpu_requires == {"openvino": ("vnni",)}
    for flags, runs in ((frozenset({"avx2"}), False), (frozenset({"avx2", "avx_vnni"}), True)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
        assert v.runs_on("openvino") is runs
        assert manifest.precisions_to_load("openvino", "int8") == (["int8"] if runs else ["fp32"])
        if not runs:
            with pytest.raises(EdgeError, match=r"no int8 variant for engine openvino on this CPU: int8-qdq needs "
                                                r"vnni \(avx512_vnni or avx_vnni or amx_int8\)"):
                manifest.variant("openvino", "int8")
    # A manifest naming an unknown capability, or an engine the variant does not list, is refused when read.
    from edge_runtime.registry import parse_manifest

    text = (v.path.parent / "manifest.toml").read_text()
    for bad in ('openvino = ["avx9"]', 'tensorrt = ["vnni"]'):
        (tmp_path / "manifest.toml").write_text(text.replace('openvino = ["vnni"]', bad))
        with pytest.raises(ConfigError, match="cpu_requires"):
            parse_manifest(tmp_path / "manifest.toml")
