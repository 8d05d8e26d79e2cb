"""`edge-runtime check --config FILE`: is this configuration going to work on this device, before a restart?

Every check gives zero or more problems, each naming the file, the key and what to do. Nothing is started and
nothing is written (folders are judged by their permissions). The checks that touch the
outside world (open the video device, bind the ports, connect to the broker) are short and bounded. A daemon
already running on the same state directory holds its own ports: those are reported as held by it, not as
problems. `doctor --config` reuses the source and broker checks; `run` refuses to start on a model problem.
"""
from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.config import Config, SourceSection
from edge_runtime.errors import ConfigError, EdgeError
from edge_runtime.exams import resolve_results
from edge_runtime.registry import ModelRegistry
from edge_runtime.sources.dicom_folder import folder_problem
from edge_runtime.statelock import holder_pid

BROKER_TIMEOUT_S = 3.0
MIN_FREE_BYTES = 256 << 20  # below this the outbox soon refuses findings (a full disk is not a file's fault)


@dataclass(frozen=True)
class Problem:
    file: str
    key: str
    problem: str
    fix: str

    def line(self) -> str:
        """The one line `run` prints when it refuses to start."""
        return f"{self.file}: key '{self.key}': {self.problem}; {self.fix}"


@dataclass(frozen=True)
class Note:
    """Something checked that is fine but worth saying (a port held by the running daemon)."""

    key: str
    text: str


def _where(config: Config) -> str:
    return config.source_path or "configuration"


def _src_key(i: int, key: str) -> str:
    return f"sources[{i}].{key}"


# ------------------------------------------------------------------ models and engines
def engine_kind(config: Config) -> str:
    from edge_runtime.engines import resolve_auto

    return resolve_auto() if config.engine.kind == "auto" else config.engine.kind


def model_problems(config: Config, registry: ModelRegistry) -> list[Problem]:
    """Each source's model exists (closest installed name suggested), its manifest is valid, and it has a
    variant for the configured engine and precision."""
    where, out = _where(config), []
    names = registry.names()
    try:
        kind = engine_kind(config)
    except EdgeError as exc:
        return [Problem(where, "engine.kind", exc.reason, "install onnxruntime or openvino")]
    for i, src in enumerate(config.sources):
        key = _src_key(i, "model")
        if src.model not in names:
            close = difflib.get_close_matches(src.model, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "set it to an installed model"
            out.append(Problem(where, key, f"source {src.name!r} names model {src.model!r}, which is not installed "
                                           f"(installed: {', '.join(names) or 'none'})", hint))
            continue
        try:  # the daemon runs a model's fp32 where the configured precision has no variant on this engine
            manifest = registry.get(src.model)
            if not manifest.precisions_to_load(kind, config.engine.precision):
                manifest.variant(kind, config.engine.precision)
        except EdgeError as exc:
            out.append(Problem(where, key, f"source {src.name!r}: {exc}", "fix the model folder, or choose another "
                                                                          "engine.kind / engine.precision"))
            continue
        try:  # exams aggregate a measurement: a classification model's live source cannot ask for them
            resolve_results(src, registry.get(src.model).task, where)
        except ConfigError as exc:
            out.append(Problem(where, _src_key(i, "results"), exc.reason, 'set results = "frame"'))
    return out


def engine_problems(config: Config) -> list[Problem]:
    from edge_runtime.engines import KINDS, available_devices

    where = _where(config)
    kinds = KINDS if config.engine.kind == "auto" else (config.engine.kind,)
    out, installed = [], 0
    for kind in kinds:
        try:
            devices = available_devices(kind)
        except ImportError:
            if config.engine.kind != "auto":
                out.append(Problem(where, "engine.kind", f"engine {kind!r} is not installed", "install it, or set "
                                                                                             "engine.kind = \"auto\""))
            continue
        except Exception as exc:  # a broken driver stack: the engine imports but cannot list devices
            out.append(Problem(where, "engine.kind", f"engine {kind!r} cannot list its devices ({exc})",
                               "check the driver installation (edge-runtime doctor)"))
            continue
        installed += 1
        wanted = config.engine.onnxruntime_devices if kind == "onnxruntime" else config.engine.openvino_devices
        if wanted and not set(wanted) & set(devices):
            out.append(Problem(where, f"engine.{kind}_devices", f"none of {', '.join(wanted)} is available to {kind} "
                                                                f"(it sees {', '.join(devices) or 'none'})",
                               "add one it sees, e.g. \"CPU\""))
    if not installed and config.engine.kind == "auto":
        out.append(Problem(where, "engine.kind", "neither onnxruntime nor openvino is installed", "install one"))
    return out


# ------------------------------------------------------------------ sources
def _bind_problem(host: str, port: int) -> tuple[str, bool]:
    """('', _) when host:port can be bound now; else (why, in_use)."""
    if port == 0:
        return "", False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError as exc:
            return (f"{host}:{port} is already in use" if exc.errno == errno.EADDRINUSE
                    else f"cannot bind {host}:{port} ({exc.strerror})"), exc.errno == errno.EADDRINUSE
    return "", False


def _creatable(folder: Path) -> str:
    """'' when `folder` exists usable or its nearest existing parent lets us create it."""
    if folder.exists():
        return folder_problem(folder, os.R_OK | os.W_OK | os.X_OK)
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    problem = folder_problem(parent, os.W_OK | os.X_OK)
    return f"{folder} does not exist and cannot be created ({problem})" if problem else ""


def _video_problem(device: str) -> str:
    from edge_runtime.sources.video import _capture_target
    from edge_runtime.telemetry import quiet_opencv

    import cv2

    quiet_opencv()
    target = _capture_target(device)
    if isinstance(target, str) and "://" in target:  # a camera on the network: do not wait FFmpeg's 30 s
        capture = cv2.VideoCapture(target, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(BROKER_TIMEOUT_S * 1000)])
    else:
        capture = cv2.VideoCapture(target)
    try:
        return "" if capture.isOpened() else f"cannot open video source {device!r}"
    finally:
        capture.release()


def source_problems(config: Config, daemon_pid: int | None = None) -> tuple[list[Problem], list[Note]]:
    """Open each source briefly: the video device, the cine file, the inbox folder's permissions, the SCP port."""
    where, out, notes = _where(config), [], []
    inboxes: dict[str, int] = {}
    for i, src in enumerate(config.sources):
        if src.kind == "video":
            problem = _video_problem(src.device)
            if problem:
                held = f" (the running daemon, pid {daemon_pid}, may hold it)" if daemon_pid else ""
                out.append(Problem(where, _src_key(i, "device"), f"source {src.name!r}: {problem}{held}",
                                   "plug the grabber in, check /dev/video* and the device's group, or fix the path"))
        elif src.kind == "cine":
            out += _cine_problems(config, i, src)
        elif src.kind in ("dicom-folder", "dicom-scp"):
            out += _inbox_problems(where, i, src, inboxes)
            if src.kind == "dicom-scp":
                problem, in_use = _bind_problem(src.host, src.port)
                if problem and in_use and daemon_pid:
                    echoed = echo_problem(src)  # the daemon holds the port: it must also answer on it
                    if echoed:
                        out.append(Problem(where, _src_key(i, "port"), f"source {src.name!r}: the running daemon "
                                                                        f"(pid {daemon_pid}) holds the port but "
                                                                        f"{echoed}", "see the daemon's log"))
                    else:
                        notes.append(Note(_src_key(i, "port"), f"{src.host}:{src.port} is held by the running daemon "
                                                                f"(pid {daemon_pid}), which answers C-ECHO"))
                elif problem:
                    out.append(Problem(where, _src_key(i, "port"), f"source {src.name!r}: DICOM port {problem}",
                                       "stop what holds it or choose another port"))
        if src.fps < 0 or src.budget_ms < 0 or src.pixel_spacing_mm < 0:
            bad = next(k for k in ("fps", "budget_ms", "pixel_spacing_mm") if getattr(src, k) < 0)
            out.append(Problem(where, _src_key(i, bad), f"must not be negative; got {getattr(src, bad)}", "use 0 for "
                                                                                                     "the default"))
    return out, notes


def scp_address(src: SourceSection) -> tuple[str, str]:
    """Where a local client reaches this SCP, and the calling AE title it uses (the first allowed caller)."""
    host = "127.0.0.1" if src.host in ("0.0.0.0", "", "::") else src.host
    return host, src.allowed_callers[0] if src.allowed_callers else "EDGE-CHECK"


def echo_problem(src: SourceSection) -> str:
    """C-ECHO the SCP as its first allowed caller would; '' when it answers."""
    from edge_runtime.sources.dicom_scp import echo

    host, calling = scp_address(src)
    return echo(host, src.port, src.ae_title, calling, timeout=5.0)


def _cine_problems(config: Config, i: int, src: SourceSection) -> list[Problem]:
    from edge_runtime.imaging.dicom import DicomImage

    try:
        DicomImage(src.path, config.imaging.max_pixel_bytes)
    except EdgeError as exc:
        return [Problem(_where(config), _src_key(i, "path"), f"source {src.name!r}: {exc.reason}",
                        "point it at a readable multi-frame DICOM")]
    except OSError as exc:
        return [Problem(_where(config), _src_key(i, "path"), f"source {src.name!r}: cannot read {src.path!r} "
                                                             f"({exc.strerror})", "fix the path or its permissions")]
    return []


def _inbox_problems(where: str, i: int, src: SourceSection, inboxes: dict[str, int]) -> list[Problem]:
    inbox = Path(src.inbox)
    out = []
    resolved = str(inbox.resolve())
    if resolved in inboxes:
        out.append(Problem(where, _src_key(i, "inbox"), f"source {src.name!r} shares its inbox with "
                                                        f"sources[{inboxes[resolved]}]", "give each source its own "
                                                                                          "inbox"))
    inboxes[resolved] = i
    for folder in (inbox, inbox.parent / f"{inbox.name}-done", inbox.parent / f"{inbox.name}-quarantine"):
        problem = _creatable(folder)
        if problem:
            out.append(Problem(where, _src_key(i, "inbox"), f"source {src.name!r}: {problem}",
                               "create the folder and give the daemon's user read/write access (chown/chmod)"))
    return out


# ------------------------------------------------------------------ broker
def broker_problems(config: Config) -> list[Problem]:
    """The [mqtt] settings as the uplink reads them, the TLS files as ssl loads them, and a short TCP connect."""
    from edge_runtime.findings import DeviceIdentity
    from edge_runtime.uplink import Uplink

    where, mqtt = _where(config), config.mqtt
    if not mqtt.broker:
        return []
    try:
        identity = DeviceIdentity(config.device.id, config.device.site)
        uplink = Uplink(None, mqtt, identity, where=where)  # type: ignore[arg-type]  # validates only
    except ConfigError as exc:
        return [_from_config_error(exc, "mqtt.broker")]
    target = uplink.target
    out = []
    if target.tls:
        try:
            context = ssl.create_default_context(cafile=mqtt.ca_file or None)
            if mqtt.cert_file:
                context.load_cert_chain(mqtt.cert_file, mqtt.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            key = "mqtt.cert_file" if mqtt.cert_file and "PEM" not in str(exc).upper() else "mqtt.ca_file"
            if mqtt.cert_file and isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc).upper():
                key = "mqtt.key_file"
            out.append(Problem(where, key, f"TLS files do not load ({exc})", "use the PEM files issued for this "
                                                                               "device; the key must match the "
                                                                               "certificate"))
    try:
        with socket.create_connection((target.host, target.port), timeout=BROKER_TIMEOUT_S):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        out.append(Problem(where, "mqtt.broker", f"broker {target.host}:{target.port} not reachable ({why})",
                           "check the URL, the network and that the broker runs (findings wait in the outbox "
                           "meanwhile)"))
    return out


def pacs_problems(config: Config) -> list[Problem]:
    """[pacs]: the TLS files load, and the PACS accepts our AE title for SR storage and answers a C-ECHO."""
    p = config.pacs
    if not p.host:
        return []
    from edge_runtime.pacs.delivery import probe

    where = _where(config)
    try:
        # the PACS's own timeout, at most 10 s: a busy board answered a rejection later than the broker's 3 s
        problem = probe(p, min(p.timeout_s, 10.0))
    except (ssl.SSLError, OSError) as exc:
        return [Problem(where, "pacs.cert_file" if p.cert_file else "pacs.ca_file", f"TLS files do not load ({exc})",
                        "use the PEM files issued for this device")]
    if not problem:
        return []
    key = "pacs.calling_ae" if "rejects" in problem or "accepts no" in problem else "pacs.host"
    if "Called AE" in problem:
        key = "pacs.called_ae"
    return [Problem(where, key, problem, "register this device's AE title, host and port on the PACS and enable "
                                         "Comprehensive SR Storage there (reports wait in the outbox meanwhile)")]


def _from_config_error(exc: ConfigError, default_key: str) -> Problem:
    found = re.search(r"key '([^']+)'", exc.reason)
    return Problem(exc.subject, found.group(1) if found else default_key, exc.reason, "correct the value as the "
                                                                                      "message says")


# ------------------------------------------------------------------ service, state directory, disk
def service_problems(config: Config, daemon_pid: int | None) -> tuple[list[Problem], list[Note]]:
    where, svc, out, notes = _where(config), config.service, [], []
    if svc.metrics_port:
        problem, in_use = _bind_problem(svc.metrics_host, svc.metrics_port)
        if problem and in_use and daemon_pid:
            notes.append(Note("service.metrics_port", f"{svc.metrics_host}:{svc.metrics_port} is held by the running "
                                                      f"daemon (pid {daemon_pid})"))
        elif problem:
            out.append(Problem(where, "service.metrics_port", f"metrics port {problem}", "stop what holds it or "
                                                                                         "choose another port"))
    for i, src in enumerate(config.sources):
        if src.kind == "dicom-scp" and svc.metrics_port and src.port == svc.metrics_port:
            out.append(Problem(where, _src_key(i, "port"), f"same port as service.metrics_port ({src.port})",
                               "use two different ports"))
    for key in ("stall_timeout_s", "stop_timeout_s"):
        if getattr(svc, key) <= 0:
            out.append(Problem(where, f"service.{key}", f"must be above 0; got {getattr(svc, key)}", "e.g. 20"))
    imaging = config.imaging
    for key in ("max_pixel_bytes", "max_decode_bytes", "decode_workers", "decode_timeout_s",
                "decode_worker_memory_bytes"):
        if getattr(imaging, key) <= 0:
            out.append(Problem(where, f"imaging.{key}", f"must be above 0; got {getattr(imaging, key)}",
                               "remove the key for its default"))
    if imaging.reduced_decode_margin < 2:
        out.append(Problem(where, "imaging.reduced_decode_margin", f"must be at least 2; got "
                                                                   f"{imaging.reduced_decode_margin:g}",
                           "2 keeps twice the model input on each side; remove the key for it"))
    if 0 < svc.stall_timeout_s <= imaging.decode_timeout_s:
        out.append(Problem(where, "imaging.decode_timeout_s", f"{imaging.decode_timeout_s:g} s is not under "
                                                              f"service.stall_timeout_s ({svc.stall_timeout_s:g} s): a "
                                                              "hung decoder would get the daemon restarted instead of "
                                                              "the file quarantined", "keep it below stall_timeout_s"))
    if svc.source_down_alarm_s < 0:
        out.append(Problem(where, "service.source_down_alarm_s", f"must be >= 0; got {svc.source_down_alarm_s}",
                           "0 turns the alarm off"))
    state = config.state_dir
    problem = _creatable(state)
    if problem:
        out.append(Problem(where, "device.state_dir", problem, "create it for the daemon's user, or point "
                                                               "device.state_dir elsewhere"))
    else:
        existing = state if state.exists() else next(p for p in state.parents if p.exists())
        free = shutil.disk_usage(existing).free
        if free < MIN_FREE_BYTES:
            out.append(Problem(where, "device.state_dir", f"only {free >> 20} MiB free on {existing}",
                               f"free space (at least {MIN_FREE_BYTES >> 20} MiB) or move the state directory"))
    return out, notes


def view_problems(config: Config, daemon_pid: int | None) -> tuple[list[Problem], list[Note]]:
    """The local page: its port free (or held by the running daemon), its TLS files and token file usable."""
    where, v, out, notes = _where(config), config.view, [], []
    if not v.enabled:
        return out, notes
    problem, in_use = _bind_problem(v.host, v.port)
    if problem and in_use and daemon_pid:
        notes.append(Note("view.port", f"{v.host}:{v.port} is held by the running daemon (pid {daemon_pid})"))
    elif problem:
        out.append(Problem(where, "view.port", f"view port {problem}", "stop what holds it or choose another port "
                                                                       "(the daemon would run without its page)"))
    if v.port and v.port == config.service.metrics_port:
        out.append(Problem(where, "view.port", f"same port as service.metrics_port ({v.port})", "use two ports"))
    for key in ("cert_file", "key_file"):
        path = getattr(v, key)
        if path and not os.access(path, os.R_OK):
            out.append(Problem(where, f"view.{key}", f"cannot read {path}", "point it at a readable PEM file"))
    token = Path(v.token_file) if v.token_file else config.state_dir / "view.token"
    if token.exists():
        if token.stat().st_mode & 0o077:
            out.append(Problem(where, "view.token_file", f"{token} is readable by others", f"chmod 600 {token}"))
    else:
        problem = _creatable(token.parent)
        if problem:
            out.append(Problem(where, "view.token_file", problem, "create the folder for the daemon's user"))
    return out, notes


# ------------------------------------------------------------------ all together
def run_all(config: Config, registry: ModelRegistry) -> tuple[list[Problem], list[Note]]:
    pid = holder_pid(config.state_dir)
    problems = model_problems(config, registry) + engine_problems(config)
    found, notes = source_problems(config, pid)
    problems += found
    problems += broker_problems(config)
    problems += pacs_problems(config)
    found, more = service_problems(config, pid)
    view_found, view_notes = view_problems(config, pid)
    found += view_found
    more += view_notes
    from edge_runtime.ota.wiring import settings_problems  # model updates: key and limits

    found += [Problem(_where(config), key, problem, fix) for key, problem, fix in settings_problems(config)]
    if pid:
        more.insert(0, Note("device.state_dir", f"a daemon is running on this state directory (pid {pid})"))
    return problems + found, notes + more


def print_problems(problems: list[Problem], notes: list[Note], where: str) -> None:
    for note in notes:
        print(f"note: {note.key}: {note.text}")
    if not problems:
        print(f"{where}: configuration ok")
        return
    rows = [{"file": p.file, "key": p.key, "problem": p.problem, "fix": p.fix} for p in problems]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in ("file", "key", "problem")}
    print("  ".join(c.upper().ljust(widths[c]) for c in ("file", "key", "problem")) + "  FIX")
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in ("file", "key", "problem")) + "  " + r["fix"])
    print(f"{len(problems)} problem(s)")
