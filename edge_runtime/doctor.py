"""`edge-runtime doctor`: what a field technician checks after installing or moving a device."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from edge_runtime.config import Config
from edge_runtime.errors import EdgeError
from edge_runtime.registry import ModelRegistry, verify_variant
from edge_runtime.statelock import holder_pid

# Transfer syntaxes a scanner or detector is likely to send, by name.
TRANSFER_SYNTAXES = (
    "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian", "RLELossless",
    "JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless",
    "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000", "HTJ2KLossless", "HTJ2K",
)
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "openvino", "numpy", "opencv-python-headless", "pydicom",
            "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm", "imagecodecs", "pillow", "pynetdicom", "paho-mqtt",
            "prometheus-client", "cryptography")


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}


def system_checks(config: Config) -> list[dict[str, str]]:
    checks = [_check("platform", "ok", f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs")]
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    checks.append(_check("packages", "ok", ", ".join(versions)))
    state = config.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".doctor-probe"
        probe.write_text("ok")
        probe.unlink()
        checks.append(_check("state directory", "ok", f"{state} writable"))
    except OSError as exc:
        checks.append(_check("state directory", "fail", f"{state} not writable ({exc.strerror})"))
    return checks


def engine_checks() -> list[dict[str, str]]:
    from edge_runtime.engines import KINDS, available_devices, resolve_auto

    checks = []
    for kind in KINDS:
        try:
            devices = available_devices(kind)
            checks.append(_check(kind, "ok", "devices: " + ", ".join(devices)))
        except ImportError as exc:
            checks.append(_check(kind, "warn", f"not installed ({exc})"))
        except Exception as exc:
            checks.append(_check(kind, "fail", f"failed to enumerate devices ({exc})"))
    try:
        checks.append(_check("auto", "ok", f"engine 'auto' selects {resolve_auto()}"))
    except EdgeError as exc:
        checks.append(_check("auto", "fail", exc.reason))
    return checks


def decoder_checks() -> list[dict[str, str]]:
    import pydicom.pixels
    import pydicom.uid

    checks = []
    for name in TRANSFER_SYNTAXES:
        uid = getattr(pydicom.uid, name)
        try:
            decoder = pydicom.pixels.get_decoder(uid)
        except NotImplementedError:
            checks.append(_check(uid.name, "warn", "no decoder"))
            continue
        plugins = list(decoder.available_plugins)
        if uid == pydicom.uid.JPEGExtended12Bit:
            try:
                import imagecodecs  # noqa: F401

                plugins.append("imagecodecs (12-bit)")
            except ImportError:
                pass
        if decoder.is_native or plugins:
            checks.append(_check(uid.name, "ok", ", ".join(plugins) if plugins else "built in"))
        else:
            checks.append(_check(uid.name, "warn", "no decoder plugin installed"))
    from edge_runtime.imaging import openjpeg

    if openjpeg.available():  # imaging.reduced_decode: JPEG 2000 at 1/2, 1/4, ... of its size
        checks.append(_check("JPEG 2000 resolution levels", "ok", f"OpenJPEG {openjpeg.version()} (libopenjp2)"))
    else:
        checks.append(_check("JPEG 2000 resolution levels", "warn", "no libopenjp2: JPEG 2000 studies are decoded whole "
                                                                     "(install libopenjp2-7)"))
    return checks


def model_checks(config: Config, registry: ModelRegistry, load_models: bool) -> list[dict[str, str]]:
    from edge_runtime.engines import options_from_config as engine_options
    from edge_runtime.engines import available_devices, load_engine

    checks = []
    names = registry.names()
    if not names:
        return [_check("models", "fail", f"no models found in {', '.join(map(str, registry.roots))}")]
    for name in names:
        try:
            manifest = registry.get(name)
        except EdgeError as exc:
            checks.append(_check(name, "fail", str(exc)))
            continue
        signed = "signature verified" if registry.public_key else "signature not enforced (no public key configured)"
        checks.append(_check(name, "ok", f"v{manifest.version} {manifest.task}, manifest valid, {signed}"))
        for variant in manifest.variants:
            label = f"{name}/{variant.id}"
            try:
                verify_variant(manifest, variant)
            except EdgeError as exc:
                checks.append(_check(label, "fail", exc.reason))
                continue
            detail = f"sha256 ok ({variant.sha256[:12]}...)"
            status = "ok"
            if load_models:
                loaded = []
                for kind in variant.engines:
                    try:
                        available_devices(kind)
                    except ImportError:
                        continue
                    try:
                        options = engine_options(config, kind)
                        engine = load_engine(kind, variant.path, manifest.input.shape, options)
                        loaded.append(f"{kind} on {engine.device} ({engine.load_ms:.0f} ms)")
                        engine.close()
                    except EdgeError as exc:
                        status = "fail"
                        loaded.append(f"{kind} FAILED: {exc.reason}")
                detail += "; loads: " + "; ".join(loaded)
            checks.append(_check(label, status, detail))
    return checks


def installed_model_checks(config: Config) -> list[dict[str, str]]:
    """Versions installed from bundles (edge_runtime/ota): what is active, what a rollback returns to, the last
    install's result. A last result that refused or failed is a warning: the hub should know why."""
    from edge_runtime.ota.commands import status_rows

    try:
        rows = status_rows(config)
    except EdgeError as exc:
        return [_check("installed versions", "fail", str(exc))]
    if not rows:
        return [_check("installed versions", "ok", "none installed from bundles; the bundled models run")]
    checks = []
    for r in rows:
        bad = r["last"].split(" ", 1)[0] in ("refused", "failed", "rolled-back")
        checks.append(_check(r["name"], "warn" if bad else "ok",
                             f"active {r['active']}, previous {r['previous']}, installed {r['installed']}, "
                             f"rolled back {r['rolled_back']}; last: {r['last']}"))
    return checks


def configuration_checks(config: Config, registry: ModelRegistry) -> list[dict[str, str]]:
    """With --config: each source opened briefly and the broker reached, as `edge-runtime check` does; a source
    that cannot work fails doctor (a dead video device must not read as 'all checks passed')."""
    from edge_runtime.check import broker_problems, model_problems, source_problems

    pid = holder_pid(config.state_dir)
    problems, notes = source_problems(config, pid)
    problems = model_problems(config, registry) + problems + broker_problems(config)
    checks = [_check(p.key, "fail", f"{p.problem}; {p.fix}") for p in problems]
    checks += [_check(n.key, "ok", n.text) for n in notes]
    if pid:
        checks.append(_check("daemon", "ok", f"running on this state directory (pid {pid})"))
    if not problems:
        names = ", ".join(f"{s.name} ({s.kind})" for s in config.sources)
        opened = [f"{names} can be opened"] if names else []
        reached = ["broker reachable"] if config.mqtt.broker else []
        checks.insert(0, _check("sources", "ok", "; ".join(opened + reached)))
    return checks


def scp_checks(config: Config) -> list[dict[str, str]]:
    """C-ECHO each configured DICOM SCP as one of its allowed callers would: a daemon that is not running is a
    warning (doctor also runs before the first start), a refusal or a bad status is a failure."""
    from edge_runtime.check import echo_problem, scp_address

    checks = []
    for src in config.sources:
        if src.kind != "dicom-scp":
            continue
        host, calling = scp_address(src)
        problem = echo_problem(src)
        if not problem:
            detail = f"{src.ae_title} at {host}:{src.port} answered as {calling}"
            checks.append(_check(f"{src.name} C-ECHO", "ok", detail))
        else:
            status = "warn" if problem.startswith("no DICOM association") else "fail"
            checks.append(_check(f"{src.name} C-ECHO", status, problem + ("; is the daemon running?" if status == "warn"
                                                                          else "")))
    return checks


def run_checks(config: Config, registry: ModelRegistry, load_models: bool = True) -> dict[str, Any]:
    sections = [
        {"title": "System", "checks": system_checks(config)},
        {"title": "Engines and devices", "checks": engine_checks()},
        {"title": "DICOM decoders", "checks": decoder_checks()},
        {"title": "Models", "checks": model_checks(config, registry, load_models)},
        {"title": "Installed model versions", "checks": installed_model_checks(config)},
    ]
    echoed = False  # with the daemon running, the configuration checks already C-ECHO its SCPs
    if config.source_path and (config.sources or config.mqtt.broker):
        sections.append({"title": "Configuration", "checks": configuration_checks(config, registry)})
        echoed = holder_pid(config.state_dir) is not None
    scp = [] if echoed else scp_checks(config)
    if scp:
        sections.append({"title": "DICOM network", "checks": scp})
    failures = [c for s in sections for c in s["checks"] if c["status"] == "fail"]
    warnings = [c for s in sections for c in s["checks"] if c["status"] == "warn"]
    summary = f"{len(failures)} problem(s), {len(warnings)} warning(s)" if failures else f"all checks passed ({len(warnings)} warning(s))"
    return {"ok": not failures, "summary": summary, "sections": sections}
