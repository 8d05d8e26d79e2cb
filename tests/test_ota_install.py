"""Install, self-test, activation, rollback and the kill test: SIGKILL at every step, then a restart, always
leaves a verified, loadable version (the old or the new one, never a mix)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, classifier_onnx, make_model_folder, sha256
from ota_helpers import copy_model, keypair

from edge_runtime.cli import engine_options, make_registry
from edge_runtime.config import load_config
from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.selftest import load_vectors
from edge_runtime.ota.store import BUNDLED, ModelStore, version_key
from edge_runtime.ota.wiring import installer_from_config
from edge_runtime.registry import verify_variant


@pytest.fixture
def device(tmp_path):
    """A device whose shipped models are tiny-cls 0.0.1 (in models.paths), a hub key pair, a config."""
    private, public = keypair(tmp_path / "keys")
    shipped = make_model_folder(tmp_path / "shipped", "tiny-cls")
    config = tmp_path / "edge.toml"
    config.write_text(f'[device]\nid = "dev"\nsite = "site"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 0\n'
                      f'[models]\npaths = ["{shipped.parent}"]\n')
    return {"tmp": tmp_path, "private": private, "public": public, "shipped": shipped, "config": config}


def new_version(device, version: str, weight: float | None = None, vectors_from: Path | None = None) -> Path:
    """A bundle of tiny-cls `version` (optionally other weights, or the self-test vectors of another folder)."""
    built = device.setdefault("built", [])
    built.append(version)
    root = device["tmp"] / f"build-{len(built)}"
    folder = copy_model(device["shipped"], root, version)
    if weight is not None:
        classifier_onnx(folder / "model.onnx", weight=weight)
        text = (folder / "manifest.toml").read_text().splitlines(keepends=True)
        text = [f'sha256 = "{sha256(folder / "model.onnx")}"\n' if t.startswith("sha256 = ") else t for t in text]
        (folder / "manifest.toml").write_text("".join(text))
    vectors = None
    if vectors_from is not None:
        from edge_runtime.ota.selftest import make_vectors
        from edge_runtime.registry import parse_manifest

        vectors = make_vectors(parse_manifest(vectors_from / "manifest.toml"))
    out = device["tmp"] / f"tiny-cls-{version}-{len(built)}.bundle"
    bundles.pack(folder, device["private"], out, vectors=vectors)
    return out


def installer(device, with_key: bool = True):
    config = load_config(device["config"])
    inst = installer_from_config(config, lambda kind: engine_options(config, kind))
    inst.public_key = device["public"] if with_key else None
    return inst


def running_version(device) -> str:
    return make_registry(load_config(device["config"])).get("tiny-cls").version


def test_install_activates_keeps_the_previous_and_the_registry_loads_it(device):
    inst = installer(device)
    out = inst.install(new_version(device, "0.0.2"))
    assert out.result == "activated", out.reason
    assert "self-test passed: fp32 on onnxruntime" in out.reason
    assert running_version(device) == "0.0.2"
    st = inst.store.state("tiny-cls")
    assert (st.active, st.previous) == ("0.0.2", BUNDLED)
    out = inst.install(new_version(device, "0.0.10"))
    assert out.result == "activated" and running_version(device) == "0.0.10"
    assert inst.store.state("tiny-cls").previous == "0.0.2" and inst.store.installed("tiny-cls") == ["0.0.2", "0.0.10"]
    rolled = inst.rollback("tiny-cls", "by hand")
    assert rolled.result == "rolled-back" and running_version(device) == "0.0.2"
    assert inst.store.installed("tiny-cls") == ["0.0.2"]  # the rolled-back version is gone, its hash kept
    again = inst.install(new_version(device, "0.0.10"))
    assert again.result == "refused" and "was rolled back on this device" in again.reason
    inst.rollback("tiny-cls", "by hand")  # 0.0.2 -> the shipped version
    assert running_version(device) == "0.0.1" and inst.store.linked_version("tiny-cls") is None


def test_a_failing_self_test_is_refused_and_the_old_version_keeps_running(device):
    inst = installer(device)
    bundle = new_version(device, "0.0.2", weight=4.5, vectors_from=device["shipped"])  # vectors of other weights
    out = inst.install(bundle)
    assert out.result == "failed" and "self-test failed: fp32 on onnxruntime" in out.reason, out.reason
    assert running_version(device) == "0.0.1" and inst.store.installed("tiny-cls") == []
    assert inst.store.state("tiny-cls").last["result"] == "failed"
    assert not any(inst.store.staging_dir.iterdir()) and not any(inst.store.jobs_dir.iterdir())


def test_self_test_vectors_hold_each_variants_outputs(device):
    bundle = new_version(device, "0.0.2")
    vb = bundles.verify(bundle, device["public"])
    dest = device["tmp"] / "unpacked"
    bundles.unpack(vb, dest)
    vectors = load_vectors(dest / "selftest.npz")
    assert {k for k in vectors if k.startswith("input_")} == {f"input_{i}" for i in range(4)}
    for i in range(4):  # the tiny classifier: logits [0, 4 * (mean - 0.5)]
        x = vectors[f"input_{i}"]
        np.testing.assert_allclose(vectors[f"out_fp32_{i}_0"], [[0.0, 4.0 * (x.mean() - 0.5)]], atol=1e-5)
    assert vectors["out_fp32_1_0"][0, 1] > 1.0  # the bright flat is far from the boundary


def test_one_version_never_gets_other_contents_and_downgrades_need_the_flag(device):
    inst = installer(device)
    assert inst.install(new_version(device, "0.0.3")).ok
    assert inst.install(new_version(device, "0.0.3")).result == "unchanged"  # a re-pack of the same contents
    clash = inst.install(new_version(device, "0.0.3", weight=5.0))
    assert clash.result == "refused" and "installed before with other contents" in clash.reason, clash.reason
    assert inst.install(new_version(device, "0.0.4")).ok
    clash = inst.install(new_version(device, "0.0.3", weight=5.0))
    assert clash.result == "refused" and "installed before with other contents" in clash.reason, clash.reason
    shipped_clash = inst.install(new_version(device, "0.0.1", weight=5.0), allow_downgrade=True)
    assert shipped_clash.result == "refused" and "other contents" in shipped_clash.reason
    down = inst.install(new_version(device, "0.0.2"))
    assert down.result == "refused" and "downgrade refused" in down.reason
    assert inst.install(new_version(device, "0.0.2"), remote=True, allow_downgrade=True).result == "refused"
    assert inst.install(new_version(device, "0.0.2"), allow_downgrade=True).result == "activated"
    assert running_version(device) == "0.0.2"


def test_remote_installs_need_a_public_key_and_local_ones_say_the_signature_was_not_checked(device):
    inst = installer(device, with_key=False)
    out = inst.install(new_version(device, "0.0.2"), remote=True)
    assert out.result == "refused" and "no models.public_key" in out.reason
    out = inst.install(new_version(device, "0.0.2"))
    assert out.result == "activated" and "signature NOT checked" in out.reason


def test_a_bundle_for_another_model_than_announced_is_refused(device):
    inst = installer(device)
    out = inst.install(new_version(device, "0.0.2"), expect_name="cxr-pneumonia", remote=True)
    assert out.result == "refused" and "is for model 'tiny-cls', not 'cxr-pneumonia'" in out.reason, out.reason
    assert running_version(device) == "0.0.1"
    assert inst.store.state("tiny-cls").last["result"] == "refused"  # reported under the name it claims


def test_version_order():
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9.2-rc1")
    assert version_key("2026.12.1") > version_key("2026.2.9")


def edge(device, *args: str, halt: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EDGE_RUNTIME_OTA_HALT", None)
    if halt:
        env["EDGE_RUNTIME_OTA_HALT"] = halt
    return subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(device["config"]), "models", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def assert_whole(device, allowed: set[str]) -> str:
    """What a (re)started daemon would load: one of the allowed versions, every file matching its manifest."""
    config = load_config(device["config"])
    manifest = make_registry(config).get("tiny-cls")
    assert manifest.version in allowed
    for variant in manifest.variants:
        verify_variant(manifest, variant)
    known = ModelStore(config.state_dir).state("tiny-cls").versions
    if manifest.version in known:  # the folder holds exactly the contents that were verified and self-tested
        assert bundles.folder_content_id(manifest.folder) == known[manifest.version]
    return manifest.version


@pytest.mark.parametrize("step", ["receiving", "verifying", "unpacking", "selftest", "activating", "activated"])
def test_sigkill_at_each_step_then_restart_leaves_a_whole_version(device, step):
    key = f'public_key = "{device["public"]}"\n'
    device["config"].write_text(device["config"].read_text() + key)
    # The device runs a signed 0.0.2 (with a key, every model that runs must be signed); 0.0.3 comes in.
    assert installer(device).install(new_version(device, "0.0.2")).result == "activated"
    bundle = new_version(device, "0.0.3")
    killed = edge(device, "install", str(bundle), halt=step)  # the real CLI process, SIGKILLed at the step
    assert killed.returncode == -9, killed.stdout + killed.stderr
    before = assert_whole(device, {"0.0.2", "0.0.3"})
    assert before == ("0.0.3" if step == "activated" else "0.0.2")
    inst = installer(device)
    resumed = inst.recover()  # what the next daemon start (or CLI install) does first
    assert [o.result for o in resumed] == (["unchanged"] if step == "activated" else ["activated"]), resumed
    assert assert_whole(device, {"0.0.3"}) == "0.0.3"
    store = ModelStore(load_config(device["config"]).state_dir)
    st = store.state("tiny-cls")
    assert (st.active, st.previous) == ("0.0.3", "0.0.2"), st
    assert not any(store.staging_dir.iterdir()) and not any(store.jobs_dir.iterdir())
    assert [p.name for p in store.active_dir.iterdir()] == ["tiny-cls"]  # no half-made link left


def test_cli_install_rollback_and_status(device):
    p = edge(device, "install", str(new_version(device, "0.0.2")))
    assert p.returncode == 0 and "activated" in p.stdout, p.stderr
    p = edge(device, "status")
    assert "active 0.0.2, previous bundled" in p.stdout, p.stdout
    doctor = subprocess.run([sys.executable, "-m", "edge_runtime", "--config", str(device["config"]), "doctor",
                             "--quick", "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    (section,) = [s for s in json.loads(doctor.stdout)["sections"] if s["title"] == "Installed model versions"]
    assert section["checks"][0]["name"] == "tiny-cls" and "active 0.0.2, previous bundled" in section["checks"][0]["detail"]
    bad = device["tmp"] / "bad.bundle"
    bad.write_bytes(b"garbage")
    p = edge(device, "install", str(bad))
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "bad.bundle: not a model bundle" in p.stderr, p.stderr
    p = edge(device, "rollback", "tiny-cls")
    assert p.returncode == 0 and "now running bundled" in p.stdout
    p = edge(device, "rollback", "tiny-cls")
    assert p.returncode != 0 and "nothing to roll back" in p.stderr


def test_a_job_whose_bundle_never_arrived_whole_is_discarded(device):
    inst = installer(device)
    job = inst.store.jobs_dir / "interrupted"
    job.mkdir(parents=True)
    (job / "job.json").write_text('{"step": "receiving", "origin": "local"}')
    (job / "bundle.tar.part").write_bytes(new_version(device, "0.0.2").read_bytes()[:5000])  # the copy was cut
    assert inst.recover() == [] and not job.exists()
    assert running_version(device) == "0.0.1" and inst.store.installed("tiny-cls") == []


def test_without_a_public_key_the_daemon_refuses_bundles_from_mqtt_without_storing_them(device):
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.ota.chunks import split
    from edge_runtime.ota.wiring import agent_from_config

    config = load_config(device["config"])  # no models.public_key
    agent = agent_from_config(config, DeviceIdentity("dev", "site"), lambda kind: engine_options(config, kind))
    sent = []
    agent.publish = lambda topic, body, retain: sent.append((topic, json.loads(body), retain))
    for payload in split(new_version(device, "0.0.2").read_bytes(), 4096)[:3]:
        agent.on_bundle_message(payload)
    assert agent.receiver.partials() == []
    assert len(sent) == 1 and sent[0][0] == "edge/v1/site/dev/models/status" and sent[0][2] is True
    assert sent[0][1]["event"]["result"] == "refused" and "no models.public_key" in sent[0][1]["event"]["reason"]
    assert running_version(device) == "0.0.1"


def test_check_and_the_daemon_name_a_bad_public_key_and_bad_limits(device):
    from edge_runtime.check import run_all
    from edge_runtime.errors import ConfigError
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.ota.wiring import agent_from_config

    not_a_key = device["tmp"] / "not-a-key.pem"
    not_a_key.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    device["config"].write_text(device["config"].read_text() + f'public_key = "{not_a_key}"\nhealth_min_frames = 0\n')
    config = load_config(device["config"])
    problems, _ = run_all(config, make_registry(config))
    keys = {p.key for p in problems}
    assert {"models.public_key", "models.health_min_frames"} <= keys, problems
    with pytest.raises(ConfigError, match="models.public_key"):
        agent_from_config(config, DeviceIdentity("dev", "site"), lambda kind: engine_options(config, kind))
