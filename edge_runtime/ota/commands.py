"""`edge-runtime models pack|verify|install|rollback|status|keygen|publish` (the CLI passes engine_options in)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from edge_runtime.config import Config
from edge_runtime.engines import EngineOptions
from edge_runtime.errors import EdgeError
from edge_runtime.ota import bundle as bundles
from edge_runtime.ota.store import BUNDLED, ModelStore

ACTIONS = ("pack", "verify", "install", "rollback", "status", "keygen", "publish")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", metavar="FOLDER|BUNDLE|NAME",
                   help="pack: model folder; verify/install/publish: bundle file; rollback: model name")
    p.add_argument("--key", metavar="PEM", help="pack: the ed25519 private key (PEM PKCS#8); keygen: where to write it")
    p.add_argument("--out", metavar="FILE", help="pack: the bundle to write; keygen: the public key to write")
    p.add_argument("--public-key", metavar="PEM", help="verify/install: check against this key instead of "
                                                       "models.public_key")
    p.add_argument("--allow-downgrade", action="store_true", help="install: allow a version older than the running one")
    p.add_argument("--model", metavar="NAME", help="install/publish: the model the bundle must be for (publish: "
                                                   "announced to the devices, which refuse a bundle for another)")
    p.add_argument("--vectors", metavar="NPZ", help="pack: self-test vectors made elsewhere (default: made here)")
    p.add_argument("--atol", action="append", default=[], metavar="PRECISION=ATOL[,RTOL]",
                   help="pack: self-test tolerance for a precision, e.g. int8=0.5,0.05 (repeatable)")
    p.add_argument("--broker", metavar="URL", help="publish: broker (default mqtt.broker)")
    p.add_argument("--site", help="publish: site (default device.site)")
    p.add_argument("--device", help="publish: one device id; without it, every device of the site")
    p.add_argument("--chunk-bytes", type=int, default=256 << 10, help="publish: bytes per MQTT message")


def run(args: argparse.Namespace, config: Config, options_for: Callable[[str], EngineOptions]) -> int:
    import logging

    action = args.action
    if not getattr(args, "verbose", 0):  # the command prints the one line itself; -v shows the steps
        logging.getLogger("edge_runtime.ota").setLevel(logging.CRITICAL)
    if action not in ("status", "keygen") and not args.target:
        raise EdgeError(f"models {action}", "needs a FOLDER, BUNDLE or NAME argument")
    return {"pack": _pack, "verify": _verify, "install": _install, "rollback": _rollback, "status": _status,
            "keygen": _keygen, "publish": _publish}[action](args, config, options_for)


def _key(args, config: Config) -> Path | None:
    key = args.public_key or config.models.public_key
    return Path(key) if key else None


def _tolerances(values: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for v in values:
        try:
            precision, _, rest = v.partition("=")
            atol, _, rtol = rest.partition(",")
            out[precision.strip()] = (float(atol), float(rtol or 0.0))
        except ValueError:
            raise EdgeError("--atol", f"expected PRECISION=ATOL[,RTOL], got {v!r}") from None
    return out


def _pack(args, config: Config, options_for) -> int:
    if not args.key or not args.out:
        raise EdgeError("models pack", "needs --key PRIVATE_KEY.pem and --out BUNDLE")
    vectors = Path(args.vectors).read_bytes() if args.vectors else None
    vb = bundles.pack(Path(args.target), Path(args.key), Path(args.out), vectors=vectors,
                      tolerances=_tolerances(args.atol), max_bytes=config.models.max_bundle_bytes)
    print(f"{vb.path}: {vb.name} {vb.version}, {len(vb.files)} files, {vb.size} bytes, manifest sha256 "
          f"{vb.manifest_sha256[:16]}..., signed")
    return 0


def _verify(args, config: Config, options_for) -> int:
    key = _key(args, config)
    vb = bundles.verify(Path(args.target), key, max_bytes=config.models.max_bundle_bytes)
    how = "signature verified" if vb.signed else "signature NOT checked (no --public-key or models.public_key)"
    print(f"{vb.path}: {vb.name} {vb.version}, {len(vb.files)} files verified, {how}")
    return 0 if vb.signed else 1


def _installer(args, config: Config, options_for):
    from edge_runtime.ota.wiring import installer_from_config

    installer = installer_from_config(config, options_for)
    if args.public_key:
        installer.public_key = Path(args.public_key)
    return installer


def _daemon_note(config: Config) -> str:
    from edge_runtime.statelock import holder_pid

    pid = holder_pid(config.state_dir)
    return f"; the running daemon (pid {pid}) uses it after a restart" if pid else ""


def _install(args, config: Config, options_for) -> int:
    installer = _installer(args, config, options_for)
    for outcome in installer.recover():
        print(f"resumed an interrupted install: {outcome.line()}", file=sys.stderr)
    outcome = installer.install(Path(args.target), origin="local", allow_downgrade=args.allow_downgrade,
                                expect_name=args.model)
    if outcome.ok:
        print(outcome.line() + (_daemon_note(config) if outcome.result == "activated" else ""))
        return 0
    print(f"edge-runtime: {outcome.reason}" if outcome.result == "refused" else
          f"edge-runtime: {outcome.line()}; the active version is untouched", file=sys.stderr)
    return 1


def _rollback(args, config: Config, options_for) -> int:
    installer = _installer(args, config, options_for)
    installer.recover()
    outcome = installer.rollback(args.target, "rolled back by hand (edge-runtime models rollback)")
    print(outcome.line() + _daemon_note(config))
    return 0


def status_rows(config: Config) -> list[dict]:
    """One row per model with installed versions, for `models status` and `doctor`."""
    from edge_runtime.ota.wiring import baseline_for

    store = ModelStore(config.state_dir)
    baseline = baseline_for(config)
    rows = []
    for name in store.names():
        st = store.state(name)
        base = baseline(name)
        active = st.active or (f"{base[0]} ({BUNDLED})" if base else "-")
        last = st.last
        rows.append({"name": name, "active": active, "previous": st.previous or "-",
                     "installed": ", ".join(store.installed(name)) or "-",
                     "rolled_back": ", ".join(st.rolled_back) or "-",
                     "last": (f"{last.get('result')} {last.get('version') or ''} at {last.get('at')}: "
                              f"{last.get('reason', '')}" if last else "-")})
    return rows


def _status(args, config: Config, options_for) -> int:
    rows = status_rows(config)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    elif rows:
        for r in rows:
            print(f"{r['name']}: active {r['active']}, previous {r['previous']}, installed {r['installed']}, "
                  f"rolled back {r['rolled_back']}\n  last: {r['last']}")
    else:
        print("no model versions installed from bundles (the bundled models run)")
    return 0


def _keygen(args, config: Config, options_for) -> int:
    if not args.key or not args.out:
        raise EdgeError("models keygen", "needs --key PRIVATE_OUT.pem and --out PUBLIC_OUT.pem")
    try:
        bundles.generate_keypair(Path(args.key), Path(args.out))
    except FileExistsError:
        raise EdgeError(args.key, "exists already; a signing key is never overwritten") from None
    print(f"private key {args.key} (keep it on the hub, offline if possible); public key {args.out} "
          "(models.public_key on every device)")
    return 0


def _publish(args, config: Config, options_for) -> int:
    """The hub side: publish a bundle in chunks (QoS 1) and wait for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_runtime.ota.chunks import split
    from edge_runtime.uplink import parse_broker_url

    vb = bundles.verify(Path(args.target), _key(args, config), max_bytes=config.models.max_bundle_bytes,
                        expect_name=args.model)
    url = args.broker or config.mqtt.broker
    if not url:
        raise EdgeError("models publish", "needs --broker URL (or mqtt.broker in --config)")
    target = parse_broker_url(url, "--broker", "--broker")
    site = args.site or config.device.site
    prefix = config.mqtt.topic_prefix.rstrip("/")
    topic = f"{prefix}/{site}/{args.device}/models/bundle" if args.device else f"{prefix}/{site}/models/bundle"
    payloads = split(Path(args.target).read_bytes(), args.chunk_bytes, model=vb.name)
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"edge-publish-{time.time_ns()}",
                         protocol=mqtt.MQTTv5)
    if target.tls:
        client.tls_set(ca_certs=config.mqtt.ca_file or None, certfile=config.mqtt.cert_file or None,
                       keyfile=config.mqtt.key_file or None)
    if config.mqtt.username:
        client.username_pw_set(config.mqtt.username, config.mqtt.password or None)
    try:
        client.connect(target.host, target.port, 30)
    except OSError as exc:
        raise EdgeError(url, f"cannot connect: {exc}") from None
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        deadline = time.monotonic() + 60 + len(payloads)
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not all(i.is_published() for i in infos):
            raise EdgeError(url, "not every chunk was acknowledged by the broker; publish again (chunks already "
                                 "received are skipped)")
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"published {vb.name} {vb.version} to {topic} in {len(payloads)} message(s)")
    return 0
