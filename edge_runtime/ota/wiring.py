"""Building the OTA parts from a Config (used by the CLI and the service; nothing here imports cli)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edge_runtime.config import Config
from edge_runtime.engines import EngineOptions, resolve_auto
from edge_runtime.findings import DeviceIdentity
from edge_runtime.ota.chunks import Receiver
from edge_runtime.ota.health import HealthRule, HealthWatch
from edge_runtime.ota.install import Installer, manifest_sha, targets_for
from edge_runtime.ota.store import ModelStore
from edge_runtime.registry import MANIFEST, ModelRegistry, bundled_models_dir, parse_manifest


def public_key(config: Config) -> Path | None:
    return Path(config.models.public_key) if config.models.public_key else None


def baseline_for(config: Config) -> Callable[[str], "tuple[str, str] | None"]:
    """What runs for a model when no installed version is active: models.paths, then the bundled models.
    Read without the signature check (only its version and manifest hash are wanted)."""
    roots = [Path(p) for p in config.models.paths] + [bundled_models_dir()]
    registry = ModelRegistry(roots)
    cache: dict[tuple[Path, int], tuple[str, str] | None] = {}  # hashing the folder at every status scrape: no

    def baseline(name: str) -> tuple[str, str] | None:
        folder = registry.folders().get(name)
        if folder is None:
            return None
        try:
            key = (folder, (folder / MANIFEST).stat().st_mtime_ns)
            if key not in cache:
                cache[key] = parse_manifest(folder / MANIFEST).version, manifest_sha(folder)
            return cache[key]
        except Exception:  # noqa: BLE001 - an unreadable shipped manifest simply is no baseline
            return None

    return baseline


def installer_from_config(config: Config, options_for: Callable[[str], EngineOptions]) -> Installer:
    kind = resolve_auto() if config.engine.kind == "auto" else config.engine.kind
    return Installer(ModelStore(config.state_dir), public_key=public_key(config),
                     targets=targets_for(kind, config.engine.precision), options_for=options_for,
                     baseline=baseline_for(config), max_bytes=config.models.max_bundle_bytes)


def agent_from_config(config: Config, identity: DeviceIdentity, options_for: Callable[[str], EngineOptions]):
    from edge_runtime.errors import ConfigError
    from edge_runtime.ota.agent import OtaAgent

    problems = settings_problems(config)
    if problems:
        key, problem, fix = problems[0]
        raise ConfigError(config.source_path or "configuration", f"key '{key}' {problem}; {fix}")

    installer = installer_from_config(config, options_for)
    m = config.models
    health = HealthWatch(HealthRule(m.health_window_s, m.health_max_errors, m.health_min_frames,
                                    m.health_max_unassessed_increase))
    receiver = Receiver(installer.store.incoming_dir, m.max_bundle_bytes, m.incoming_ttl_s)
    return OtaAgent(installer.store, installer, receiver, health, identity, config.mqtt.topic_prefix,
                    installer.baseline)


def installed_source_keys(config: Config) -> set[str]:
    """`sources[i].model` keys whose model runs a version installed from a bundle (check.py's key format)."""
    store = ModelStore(config.state_dir)
    return {f"sources[{i}].model" for i, src in enumerate(config.sources) if store.linked_version(src.model)}


def settings_problems(config: Config) -> list[tuple[str, str, str]]:
    """(key, problem, fix) for the [models] keys of model updates; `check` lists them, the daemon refuses them."""
    m, out = config.models, []
    if m.public_key:
        from edge_runtime.errors import EdgeError
        from edge_runtime.ota.bundle import load_public_key

        try:
            load_public_key(Path(m.public_key))
        except EdgeError as exc:
            out.append(("models.public_key", exc.reason, "point it at the hub's PEM public key (models keygen --out)"))
    for key, value, ok in (("max_bundle_bytes", m.max_bundle_bytes, m.max_bundle_bytes > 0),
                           ("incoming_ttl_s", m.incoming_ttl_s, m.incoming_ttl_s > 0),
                           ("health_window_s", m.health_window_s, m.health_window_s >= 0),
                           ("health_max_errors", m.health_max_errors, m.health_max_errors >= 1),
                           ("health_min_frames", m.health_min_frames, m.health_min_frames >= 1),
                           ("health_max_unassessed_increase", m.health_max_unassessed_increase,
                            0 <= m.health_max_unassessed_increase <= 1)):
        if not ok:
            out.append((f"models.{key}", f"is {value}", "use a positive value (see README: Configuration)"))
    return out
