from __future__ import annotations

import pytest

from edge_runtime.config import load_config
from edge_runtime.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    cfg = load_config(write(tmp_path, '[device]\nid = "scanner-7"\n[engine]\nthreads = 2\nkind = "openvino"\n'))
    assert cfg.device.id == "scanner-7" and cfg.device.site == "unassigned"
    assert cfg.engine.threads == 2 and cfg.engine.kind == "openvino"
    assert cfg.engine.openvino_precision == "f32"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[engine]\nthread = 2\n", "unknown key 'engine.thread'; allowed: allow_spinning, cache_dir"),
        ("[engine]\nthreads = \"two\"\n", "key 'engine.threads' must be integer, got str 'two'"),
        ("[engine]\nthreads = true\n", "key 'engine.threads' must be integer"),
        ("[engine]\nkind = \"tensorrt\"\n", "key 'engine.kind' must be one of auto, onnxruntime, openvino"),
        ("[models]\npaths = [1]\n", "key 'models.paths' must be list of string"),
        ("[gpu]\nx = 1\n", "unknown key 'gpu'"),
        ("engine = 3\n", "key 'engine' must be a table"),
        ("[engine\n", "invalid TOML"),
    ],
)
def test_errors_name_file_key_and_expected(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


SOURCES = """
[[sources]]
name = "probe"
kind = "video"
model = "fetal-head"
device = "/dev/video0"
fps = 30

[[sources]]
name = "xray"
kind = "dicom-scp"
model = "cxr-pneumonia"
inbox = "/var/lib/edge-runtime/inbox"
allowed_callers = ["DETECTOR"]
"""


def test_sources_parse(tmp_path):
    cfg = load_config(write(tmp_path, SOURCES))
    assert [(s.name, s.kind, s.model) for s in cfg.sources] == [("probe", "video", "fetal-head"), ("xray", "dicom-scp", "cxr-pneumonia")]
    assert cfg.sources[1].allowed_callers == ["DETECTOR"] and cfg.sources[0].fps == 30.0


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('kind = "video"', 'kind = "webcam"'), "key 'sources[0].kind' must be one of phantom, video, cine"),
        (lambda t: t.replace('device = "/dev/video0"\n', ""), "key 'sources[0].device' is required for a video source"),
        (lambda t: t.replace("fps = 30", 'fps = "fast"'), "key 'sources[0].fps' must be number, got str"),
        (lambda t: t.replace('name = "xray"', 'name = "probe"'), "key 'sources[1].name' repeats the source name 'probe'"),
        (lambda t: t.replace("allowed_callers", "allowed_caller"), "unknown key 'sources[1].allowed_caller'"),
        (lambda t: t.replace('model = "cxr-pneumonia"\n', ""), "key 'sources[1].model' is missing"),
    ],
)
def test_source_errors_name_the_key(tmp_path, edit, message):
    path = write(tmp_path, edit(SOURCES))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)
