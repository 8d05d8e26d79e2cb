"""`edge-runtime check --config FILE`, run as a technician runs it before a restart: each mistake is one line
naming the file and the key with what to do, exit 1; a good configuration passes with exit 0."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from mqtt_helpers import Broker, free_port, make_pki, needs_mosquitto

ABSENT_VIDEO = "/dev/video9"


def edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def write(tmp_path: Path, models_root: Path, sources: str, extra: str = "") -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "dev-check"\nsite = "site-check"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[models]\npaths = ["{models_root}"]\n\n[engine]\nkind = "onnxruntime"\nthreads = 1\n\n'
        f"[service]\nmetrics_port = {free_port()}\n\n[view]\nport = 0\n\n" + extra + "\n" + sources)
    return path


def folder(name: str, inbox: Path, model: str = "tiny-cls") -> str:
    return f'[[sources]]\nname = "{name}"\nkind = "dicom-folder"\nmodel = "{model}"\ninbox = "{inbox}"\n'


def problem_lines(stdout: str) -> list[str]:
    """The table's rows: everything between the header and the count line."""
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("FILE") and "KEY" in lines[0] and "FIX" in lines[0], stdout
    assert lines[-1].endswith("problem(s)"), stdout
    return lines[1:-1]


@needs_mosquitto
def test_a_good_configuration_passes(tmp_path, models_root):
    broker = Broker(tmp_path / "broker").start()
    try:
        config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox"),
                       extra=f'[mqtt]\nbroker = "{broker.url}"\n')
        r = edge("check", "--config", str(config))
    finally:
        broker.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"{config}: configuration ok"


def test_a_model_typo_is_one_line_with_the_closest_name(tmp_path, models_root):
    config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox", model="tiny-clss"))
    r = edge("check", "--config", str(config))
    assert r.returncode == 1
    (line,) = problem_lines(r.stdout)
    assert line.startswith(str(config)) and "sources[0].model" in line
    assert "'tiny-clss'" in line and "xray" in line and "did you mean 'tiny-cls'?" in line


@pytest.mark.skipif(os.path.exists(ABSENT_VIDEO), reason=f"{ABSENT_VIDEO} exists on this machine")
def test_an_unopenable_video_device_is_one_line(tmp_path, models_root):
    source = f'[[sources]]\nname = "probe"\nkind = "video"\nmodel = "tiny-seg"\ndevice = "{ABSENT_VIDEO}"\n'
    config = write(tmp_path, models_root, source)
    r = edge("--config", str(config), "check")  # the option before the subcommand works too
    assert r.returncode == 1
    (line,) = problem_lines(r.stdout)
    assert line.startswith(str(config)) and "sources[0].device" in line and ABSENT_VIDEO in line
    assert "[ WARN" not in r.stdout + r.stderr  # OpenCV's own log lines are silenced


def test_a_closed_broker_port_is_one_line(tmp_path, models_root):
    port = free_port()  # nothing listens there
    config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox"),
                   extra=f'[mqtt]\nbroker = "mqtt://127.0.0.1:{port}"\n')
    r = edge("check", "--config", str(config))
    assert r.returncode == 1
    (line,) = problem_lines(r.stdout)
    assert line.startswith(str(config)) and "mqtt.broker" in line and f"127.0.0.1:{port} not reachable" in line


def test_several_mistakes_give_one_line_each(tmp_path, models_root):
    (tmp_path / "not-a-folder").write_text("a file where the inbox should be")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        scp_port = taken.getsockname()[1]
        sources = (folder("xray", tmp_path / "not-a-folder", model="tiny-seh")
                   + f'\n[[sources]]\nname = "pacs"\nkind = "dicom-scp"\nmodel = "tiny-cls"\n'
                   f'inbox = "{tmp_path / "scp"}"\nhost = "127.0.0.1"\nport = {scp_port}\n')
        config = write(tmp_path, models_root, sources)
        r = edge("check", "--config", str(config))
    assert r.returncode == 1
    lines = problem_lines(r.stdout)
    assert len(lines) == 3, r.stdout
    assert "sources[0].model" in lines[0] and "did you mean 'tiny-seg'?" in lines[0]
    assert "sources[0].inbox" in lines[1] and "is not a directory" in lines[1]
    assert "sources[1].port" in lines[2] and f"127.0.0.1:{scp_port} is already in use" in lines[2]


def test_tls_files_that_do_not_belong_together(tmp_path, models_root):
    pki = make_pki(tmp_path / "pki")
    mqtt = (f'[mqtt]\nbroker = "mqtts://127.0.0.1:{free_port()}"\nca_file = "{pki["ca"]}"\n'
            f'cert_file = "{pki["client_cert"]}"\nkey_file = "{pki["server_key"]}"\n')  # the wrong key
    config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox"), extra=mqtt)
    r = edge("check", "--config", str(config))
    assert r.returncode == 1
    lines = problem_lines(r.stdout)
    assert any("mqtt.key_file" in line and "TLS files do not load" in line for line in lines), r.stdout


def test_a_configuration_that_does_not_load_is_a_problem_line(tmp_path, models_root):
    config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox"), extra="[engine]\n")  # a second [engine]
    config.write_text(config.read_text().replace("[engine]\n\n", "").replace("threads = 1", "threads = 1\ntreads = 2"))
    r = edge("check", "--config", str(config))
    assert r.returncode == 1
    (line,) = problem_lines(r.stdout)
    assert line.startswith(str(config)) and "engine.treads" in line and "unknown key" in line


def test_check_needs_a_configuration():
    r = edge("check")
    assert r.returncode == 2
    assert r.stderr.strip() == "edge-runtime: check: needs --config FILE (the configuration to check)"


def test_an_scp_port_held_by_the_running_daemon_must_answer_c_echo(tmp_path):
    """With the daemon running, check does not report its own SCP port as taken, but the SCP on it must answer."""
    from edge_runtime.check import source_problems
    from edge_runtime.config import Config, SourceSection
    from edge_runtime.sources.dicom_scp import DicomScp

    scp = DicomScp("xray", tmp_path / "inbox", ae_title="EDGE", host="127.0.0.1", port=0, allowed_callers=["DETECTOR"])
    scp.start()
    try:
        def config(callers: list[str]) -> Config:
            src = SourceSection(name="xray", kind="dicom-scp", model="tiny-cls", inbox=str(tmp_path / "inbox"),
                                ae_title="EDGE", host="127.0.0.1", port=scp.port, allowed_callers=callers)
            return Config(sources=[src], source_path=str(tmp_path / "edge.toml"))

        problems, notes = source_problems(config(["DETECTOR"]), daemon_pid=os.getpid())
        assert problems == [] and len(notes) == 1 and "answers C-ECHO" in notes[0].text
        problems, _ = source_problems(config(["STRANGER"]), daemon_pid=os.getpid())  # the SCP refuses this caller
        assert len(problems) == 1 and problems[0].key == "sources[0].port"
        assert "holds the port but association rejected" in problems[0].problem
    finally:
        scp.stop()


def test_imaging_limits_must_be_positive_and_a_decode_must_time_out_before_the_watchdog(tmp_path, models_root):
    config = write(tmp_path, models_root, folder("xray", tmp_path / "inbox"),
                   extra="[imaging]\ndecode_workers = 0\ndecode_timeout_s = 30\n")
    r = edge("check", "--config", str(config))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = problem_lines(r.stdout)
    assert any("imaging.decode_workers" in line and "must be above 0" in line for line in lines), r.stdout
    assert any("imaging.decode_timeout_s" in line and "stall_timeout_s" in line for line in lines), r.stdout
