"""TOML configuration -> frozen dataclasses.

Every error names the file, the key and what is allowed. Unknown keys are errors, not silently ignored:
a typo in a field device's config must not quietly fall back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.scope import MAX_PIXEL_SPACING_MM


def default_state_dir() -> Path:
    """systemd's StateDirectory, else $EDGE_RUNTIME_STATE_DIR, else the XDG state directory."""
    for var in ("EDGE_RUNTIME_STATE_DIR", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-runtime"


@dataclass(frozen=True)
class DeviceSection:
    id: str = field(default_factory=socket.gethostname)
    site: str = "unassigned"
    state_dir: str = ""  # "" = default_state_dir()


@dataclass(frozen=True)
class EngineSection:
    kind: str = "auto"  # auto | onnxruntime | openvino
    precision: str = "fp32"  # which variant to run: fp32 | int8
    threads: int = 0  # 0 = engine default
    onnxruntime_devices: list[str] = field(default_factory=lambda: ["TensorRT", "CUDA", "OpenVINO", "CPU"])
    openvino_devices: list[str] = field(default_factory=lambda: ["NPU", "GPU", "CPU"])
    openvino_precision: str = "f32"  # f32 | f16 | bf16 | default
    cache_dir: str = ""  # "" = <state_dir>/cache
    warmup_runs: int = 2
    allow_spinning: bool = False


@dataclass(frozen=True)
class ModelsSection:
    paths: list[str] = field(default_factory=list)  # searched before the bundled models
    public_key: str = ""  # ed25519 key; when set, every manifest must be signed
    # Model updates (edge_runtime/ota): bundles installed into <state_dir>/models, see README "Model updates".
    max_bundle_bytes: int = 256 << 20  # a bundle (file or MQTT chunks) over this is refused
    incoming_ttl_s: float = 7 * 24 * 3600.0  # a half-received MQTT bundle with no new chunk this long is discarded
    health_window_s: float = 300.0  # a new version is watched this long after the switch
    health_max_errors: int = 3  # worker errors on the new version within the window that roll it back
    health_min_frames: int = 20  # findings before the out-of-scope rate of the new version is judged
    health_max_unassessed_increase: float = 0.3  # out-of-scope rate this far above the old version's: roll back


@dataclass(frozen=True)
class ImagingSection:
    max_pixel_bytes: int = 1 << 30
    max_decode_bytes: int = 512 << 20  # estimated peak of decoding one frame (imaging/guard.py); fits a 2 GB board
    decode_workers: int = 1  # processes that decode untrusted files (imaging/isolation.py)
    decode_timeout_s: float = 15.0  # one request (open a file, decode a frame); a hung decoder is killed after it
    # (kept under service.stall_timeout_s, or the watchdog restarts the daemon before the decoder is killed)
    decode_worker_memory_bytes: int = 1 << 30  # address space a decode worker may add to its start-up size
    reduced_decode: bool = True  # decode files no larger than the model needs (imaging/resolution.py); false: whole
    reduced_decode_margin: float = 2.0  # keep >= this x the model input per side (at least 2; more: closer to whole)


@dataclass(frozen=True)
class ServiceSection:
    metrics_host: str = "127.0.0.1"  # Prometheus endpoint; keep it on localhost
    metrics_port: int = 9464  # 0 = no endpoint
    log_format: str = "text"  # text | json
    stop_timeout_s: float = 20.0  # SIGTERM: in-flight work must finish within this
    stall_timeout_s: float = 20.0  # a stage busy this long on one item stops the watchdog pings
    malloc_arenas: int = 2  # glibc malloc arenas (see edge_runtime/malloc.py); 0 = glibc's default, 8 per core
    source_down_alarm_s: float = 60.0  # a source down this long raises an alarm on the telemetry topic; 0 = never


@dataclass(frozen=True)
class OutboxSection:
    """The durable store of findings (see docs/mqtt.md: caps and eviction policy)."""

    path: str = ""  # "" = <state_dir>/outbox.sqlite
    max_rows: int = 1_000_000  # all rows, delivered ones included (they are pruned first)
    max_bytes: int = 1 << 30  # payload bytes of all rows
    max_age_days: float = 90.0  # older rows are pruned (delivered) or evicted (routine); 0 = no age cap


@dataclass(frozen=True)
class MqttSection:
    """The uplink to the MQTT broker (see docs/mqtt.md)."""

    broker: str = ""  # mqtts://host:8883 or mqtt://host:1883; "" = no uplink, findings wait in the outbox
    protocol: str = "5"  # 5 | 3.1.1
    client_id: str = ""  # "" = edge-<device.id>; must be stable: the broker keeps the session under it
    topic_prefix: str = "edge/v1"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5: how long the broker keeps the session while offline
    ca_file: str = ""  # mqtts: CA bundle ("" = system CAs)
    cert_file: str = ""  # mqtts: client certificate for mutual TLS
    key_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""  # read at start-up; keeps the secret out of the config file
    allow_insecure: bool = False  # allow plaintext mqtt:// to a host other than loopback
    inflight: int = 32  # QoS 1 messages awaiting PUBACK at once
    rate_limit: float = 0.0  # messages per second; 0 = no cap
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    connect_timeout_s: float = 10.0
    require_subscriber: bool = True  # MQTT 5: a PUBACK "no matching subscribers" leaves the finding pending
    # The broker had no session for us: re-send what was delivered this long before the last delivery (0 = off).
    resend_on_session_loss_s: float = 600.0
    telemetry_interval_s: float = 60.0  # 0 = no telemetry messages
    # End-to-end delivery (docs/mqtt.md): a row is done only once a collector's receipt says the hub stored it.
    # True is the safe default and the shipped collector sends receipts; a hub that sends none needs false, or
    # sent rows are never pruned (only evicted by the caps, routine ones) and are re-sent now and then.
    require_receipts: bool = True
    receipt_timeout_s: float = 120.0  # sent without a receipt this long: published again (same finding_id)
    reconnect_pending_max_s: float = 3.0  # backoff cap while findings are owed (pending or without a receipt)
    ack_timeout_s: float = 10.0  # no PUBACK for this long with publishes outstanding: the link is dead (half-open)
    drain_on_stop_s: float = 3.0  # clean stop: keep publishing what is pending this long while the link is up


@dataclass(frozen=True)
class PacsSection:
    """The clinic's PACS: a DICOM SR per study finding, by C-STORE from the outbox (README: "Reports to a PACS")."""

    host: str = ""  # "" = no PACS delivery
    port: int = 104
    called_ae: str = ""  # the PACS's AE title (required with host)
    calling_ae: str = "EDGE"  # this device's AE title, as the PACS knows it
    tls: bool = False  # DICOM over TLS (PS3.15 B.1); the PACS's certificate is checked against ca_file
    ca_file: str = ""  # tls: CA bundle ("" = system CAs)
    cert_file: str = ""  # tls: client certificate, for a PACS that requires mutual TLS
    key_file: str = ""
    timeout_s: float = 30.0  # association, DIMSE and network timeouts
    retry_min_s: float = 2.0  # backoff after a failed association or a transient status, doubling to retry_max_s
    retry_max_s: float = 300.0
    max_attempts: int = 5  # a transient failure status (out of resources) this many times: refused
    batch: int = 32  # reports sent per association before the queue is read again
    # Processes that build reports (niced: the live pipeline keeps its CPU; started when reports are owed, ended
    # after a minute with none); 2 reach 50 reports/s on two cores (BENCHMARKS.md); 0 = in the sending thread.
    build_workers: int = 2
    build_nice: int = 10


@dataclass(frozen=True)
class ViewSection:
    """The local web view (edge_runtime/view, README "Local view"): live pictures, findings, health, feedback."""

    enabled: bool = True  # served while the daemon runs (`run`, `demo`); never by one-shot commands
    host: str = "127.0.0.1"  # loopback by default; another address needs TLS or allow_plain_http
    port: int = 8080  # 0 = a free port (logged)
    token_file: str = ""  # "" = <state_dir>/view.token, created 0600 on first start
    cert_file: str = ""  # TLS: serve https with this certificate chain and key
    key_file: str = ""
    allow_plain_http: bool = False  # plain http on a non-loopback address (a trusted, closed network only)
    mjpeg_max_fps: float = 10.0  # /live.mjpeg never sends more than this per viewer
    max_viewers: int = 8  # concurrent /live.mjpeg and /events clients; more get 503


SOURCE_KINDS = ("phantom", "video", "cine", "dicom-folder", "dicom-scp")
LIVE_KINDS = ("phantom", "video", "cine")
RESULTS_MODES = ("exam", "frame", "both")  # "" (unset) = the source kind's default


@dataclass(frozen=True)
class SourceSection:
    name: str = ""
    kind: str = ""
    model: str = ""
    budget_ms: float = 0.0  # 0 = the model manifest's latency budget
    fps: float = 0.0  # live sources: capture rate (0 = the feed's own rate)
    device: str = ""  # video: /dev/videoN, an RTSP URL or a file
    path: str = ""  # cine: the multi-frame DICOM file
    loop: bool = True  # cine and video files: start again at the end
    pixel_spacing_mm: float = 0.0  # video: calibration of the grabbed picture (0 = unknown)
    inbox: str = ""  # dicom-folder / dicom-scp: where study files land
    ae_title: str = "EDGE"  # dicom-scp
    host: str = "0.0.0.0"  # dicom-scp listen address
    port: int = 11112  # dicom-scp
    allowed_callers: list[str] = field(default_factory=list)  # dicom-scp: calling AE titles allowed ([] = any)
    # Live sources (edge_runtime/exams.py): "exam" = one finding per exam, per-frame results stay in memory;
    # "frame" = a finding per frame (the old behaviour); "both". "" = "exam" for a live source of a measuring
    # (segmentation) model, else "frame". Study sources always give a finding per frame.
    results: str = ""
    exam_gap_s: float = 2.0  # an exam ends when its target has been absent this long (probe lifted)
    exam_max_s: float = 600.0  # ... or after this long, whatever the target does
    sweeps: bool = False  # phantom: show a head for a few seconds, lift the probe, come back with another size


# Which keys each source kind needs.
SOURCE_REQUIRED = {"video": ("device",), "cine": ("path",), "dicom-folder": ("inbox",), "dicom-scp": ("inbox",), "phantom": ()}


@dataclass(frozen=True)
class Config:
    device: DeviceSection = field(default_factory=DeviceSection)
    engine: EngineSection = field(default_factory=EngineSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    imaging: ImagingSection = field(default_factory=ImagingSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    pacs: PacsSection = field(default_factory=PacsSection)
    view: ViewSection = field(default_factory=ViewSection)
    sources: list[SourceSection] = field(default_factory=list)
    source_path: str = ""

    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir) if self.device.state_dir else default_state_dir()

    @property
    def cache_dir(self) -> Path:
        return Path(self.engine.cache_dir) if self.engine.cache_dir else self.state_dir / "cache"


_CHOICES: dict[str, tuple[str, ...]] = {
    "engine.kind": ("auto", "onnxruntime", "openvino"),
    "engine.precision": ("fp32", "int8"),
    "engine.openvino_precision": ("f32", "f16", "bf16", "default"),
    "service.log_format": ("text", "json"),
    "mqtt.protocol": ("5", "3.1.1"),
    "kind": SOURCE_KINDS,  # sources[i].kind
    "results": RESULTS_MODES,  # sources[i].results
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "nothing"}.get(tp, str(tp))


def _check(value: Any, tp: Any) -> Any:
    """value converted to tp, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_check(v, typing.get_args(tp)[0]) for v in value]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, tp):
        raise TypeError
    return value


def build(cls: type, table: dict[str, Any], path: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, strictly."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"key '{prefix.rstrip('.')}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_path"}
    for key in table:
        if key not in fields:
            raise ConfigError(path, f"unknown key '{prefix}{key}'; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in table.items():
        tp = hints[name]
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, path, full + ".")
            continue
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item_tp is not None and dataclasses.is_dataclass(item_tp):
            if not isinstance(value, list):
                raise ConfigError(path, f"key '{full}' must be a list of tables ([[{full}]])")
            kwargs[name] = [build(item_tp, v, path, f"{full}[{i}].") for i, v in enumerate(value)]
            continue
        try:
            kwargs[name] = _check(value, tp)
        except TypeError:
            raise ConfigError(path, f"key '{full}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}") from None
        choices = _CHOICES.get(full) or (_CHOICES.get(name) if cls is SourceSection else None)
        if choices and kwargs[name] not in choices:
            raise ConfigError(path, f"key '{full}' must be one of {', '.join(choices)}; got {value!r}")
    return cls(**kwargs)


def check_sources(config: Config) -> None:
    """Per-kind required keys and unique names, named by their position in the file."""
    path = config.source_path or "configuration"
    seen: set[str] = set()
    for i, src in enumerate(config.sources):
        where = f"sources[{i}]"
        for key in ("name", "kind", "model"):
            if not getattr(src, key):
                raise ConfigError(path, f"key '{where}.{key}' is missing")
        for key in SOURCE_REQUIRED[src.kind]:
            if not getattr(src, key):
                raise ConfigError(path, f"key '{where}.{key}' is required for a {src.kind} source")
        spacing = src.pixel_spacing_mm  # 0 = unknown; NaN fails both comparisons
        if spacing != 0 and not 0 < spacing <= MAX_PIXEL_SPACING_MM:
            raise ConfigError(path, f"key '{where}.pixel_spacing_mm' must be 0 (unknown) or > 0 and <= "
                                    f"{MAX_PIXEL_SPACING_MM:g} mm/pixel; got {spacing}")
        check_exam_keys(src, path, where)
        if src.name in seen:
            raise ConfigError(path, f"key '{where}.name' repeats the source name {src.name!r}")
        seen.add(src.name)


def check_exam_keys(src: SourceSection, path: str, where: str) -> None:
    """Exam grouping is for live feeds; its times must be positive and the gap shorter than the longest exam."""
    if src.kind not in LIVE_KINDS and src.results not in ("", "frame"):
        raise ConfigError(path, f"key '{where}.results' = {src.results!r} is for live sources ({', '.join(LIVE_KINDS)}); "
                                f"a {src.kind} source gives a finding per frame (remove the key or set \"frame\")")
    if src.sweeps and src.kind != "phantom":
        raise ConfigError(path, f"key '{where}.sweeps' is for phantom sources only")
    if not 0 < src.exam_gap_s < src.exam_max_s:  # NaN fails too
        raise ConfigError(path, f"keys '{where}.exam_gap_s' and '{where}.exam_max_s' must satisfy 0 < exam_gap_s < "
                                f"exam_max_s; got {src.exam_gap_s} and {src.exam_max_s}")


def check_pacs(config: Config) -> None:
    """A [pacs] with a host needs an AE title to call, valid AE titles (1-16 characters, no backslash) and
    sane limits."""
    path = config.source_path or "configuration"
    p = config.pacs
    if not p.host:
        return
    if not p.called_ae:
        raise ConfigError(path, "key 'pacs.called_ae' is required with pacs.host (the PACS's AE title)")
    for key in ("called_ae", "calling_ae"):
        value = getattr(p, key)
        if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isascii():
            raise ConfigError(path, f"key 'pacs.{key}' must be 1 to 16 ASCII characters without a backslash; "
                                    f"got {value!r}")
    if not 0 < p.port < 65536:
        raise ConfigError(path, f"key 'pacs.port' must be 1..65535; got {p.port}")
    for key in ("timeout_s", "retry_min_s", "retry_max_s"):
        if not getattr(p, key) > 0:
            raise ConfigError(path, f"key 'pacs.{key}' must be above 0; got {getattr(p, key)}")
    if p.retry_max_s < p.retry_min_s:
        raise ConfigError(path, f"key 'pacs.retry_max_s' must be at least pacs.retry_min_s ({p.retry_min_s:g})")
    for key, low in (("max_attempts", 1), ("batch", 1), ("build_workers", 0)):
        if getattr(p, key) < low:
            raise ConfigError(path, f"key 'pacs.{key}' must be at least {low}; got {getattr(p, key)}")
    if not 0 <= p.build_nice <= 19:
        raise ConfigError(path, f"key 'pacs.build_nice' must be 0..19; got {p.build_nice}")
    if (p.cert_file or p.key_file or p.ca_file) and not p.tls:
        raise ConfigError(path, "keys 'pacs.ca_file', 'pacs.cert_file' and 'pacs.key_file' need pacs.tls = true")


def check_view(config: Config) -> None:
    """The view answers on loopback unless TLS (or an explicit allow_plain_http) covers another address."""
    path = config.source_path or "configuration"
    from edge_runtime.transport import is_loopback

    v = config.view
    if not v.enabled:
        return
    if not 0 <= v.port < 65536:
        raise ConfigError(path, f"key 'view.port' must be 0..65535 (0 = a free port); got {v.port}")
    if bool(v.cert_file) != bool(v.key_file):
        raise ConfigError(path, "keys 'view.cert_file' and 'view.key_file' go together (TLS needs both)")
    if not is_loopback(v.host) and not v.cert_file and not v.allow_plain_http:
        raise ConfigError(path, f"key 'view.host' = {v.host!r} is not a loopback address: the page shows patient "
                                "images, so it needs TLS (view.cert_file and view.key_file) or, on a closed "
                                "network, view.allow_plain_http = true")
    if not 0 < v.mjpeg_max_fps <= 60:  # NaN fails too
        raise ConfigError(path, f"key 'view.mjpeg_max_fps' must be above 0 and at most 60; got {v.mjpeg_max_fps}")
    if v.max_viewers < 1:
        raise ConfigError(path, f"key 'view.max_viewers' must be at least 1; got {v.max_viewers}")


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML ({exc})") from None
    config = dataclasses.replace(build(Config, table, str(path)), source_path=str(path))
    check_sources(config)
    check_pacs(config)
    check_view(config)
    return config
