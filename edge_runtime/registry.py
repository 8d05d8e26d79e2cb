"""Model registry: a model is a folder with manifest.toml, its variant files and CARD.md.

Loading a manifest checks every key it needs and names the file and key when one is wrong. Using a variant
verifies its sha256 first. When a public key is configured, the manifest must carry a valid ed25519
signature (manifest.toml.sig, over the manifest's exact bytes); since the manifest holds each variant's
sha256, the signature covers the model files too.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.explain import METHODS as EXPLANATION_METHODS, ExplanationSpec
from edge_runtime.imaging.preprocess import CHANNELS, INTERPOLATIONS, RESIZE_MODES, PreprocessSpec
from edge_runtime.scope import ContentGateSpec, ScopeSpec

MANIFEST = "manifest.toml"
SIGNATURE = "manifest.toml.sig"
TASKS = ("classification", "segmentation")
PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "openvino-ir")
ENGINES = ("onnxruntime", "openvino")
WINDOWINGS = ("voi", "minmax")
ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    layout: str
    channels: str
    dtype: str


@dataclass(frozen=True)
class OutputSpec:
    name: str
    activation: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class DecisionSpec:
    positive_label: str
    threshold: float
    urgent_if_positive: bool
    threshold_rule: str = ""
    temperature: float = 1.0  # logits / temperature before the activation (fitted on held-out data)
    conformal_qhat: float | None = None  # split-conformal score threshold: needs_review when the set is not {label}


@dataclass(frozen=True)
class SegmentationSpec:
    threshold: float
    measurement: str
    gestational_age: str
    min_area_fraction: float
    min_fit_quality: float = 0.0  # IoU of the mask with its fitted ellipse below which nothing is measured


@dataclass(frozen=True)
class Variant:
    id: str
    path: Path
    format: str
    engines: tuple[str, ...]
    precision: str
    sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_path: Path | None = None  # OpenVINO IR .bin beside the .xml
    weights_sha256: str | None = None
    scope_threshold: float | None = None  # this variant's content-gate limit (quantized features drift from FP32's)
    # engine -> CPU capabilities the variant needs there (edge_runtime/engines/cpu.py), e.g. {"openvino": ("vnni",)}
    cpu_requires: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def runs_on(self, engine: str) -> bool:
        """Listed for the engine, and this CPU has what the variant needs on it."""
        return engine in self.engines and not self.cpu_missing(engine)

    def cpu_missing(self, engine: str) -> list[str]:
        from edge_runtime.engines.cpu import missing

        needs = self.cpu_requires.get(engine, ())
        return missing(needs) if needs else []


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    task: str
    modality: tuple[str, ...]
    summary: str
    intended_use: str
    latency_budget_ms: float
    input: InputSpec
    preprocess: PreprocessSpec
    windowing: str
    output: OutputSpec
    decision: DecisionSpec | None
    segmentation: SegmentationSpec | None
    variants: tuple[Variant, ...]
    folder: Path
    raw: dict[str, Any]
    scope: ScopeSpec = ScopeSpec()
    explanation: ExplanationSpec | None = None  # [explanation]: how findings show why (None: they never do)

    def variant(self, engine: str, precision: str) -> Variant:
        """The variant for an engine and precision; OpenVINO prefers its own IR when both exist."""
        matches = [v for v in self.variants if v.runs_on(engine) and v.precision == precision]
        if not matches:
            from edge_runtime.engines.cpu import describe

            lacking = [v for v in self.variants if engine in v.engines and v.precision == precision]
            if lacking:
                needs = ", ".join(describe(c) for c in lacking[0].cpu_missing(engine))
                raise ModelError(self.name, f"no {precision} variant for engine {engine} on this CPU: {lacking[0].id} "
                                            f"needs {needs} there, which this CPU lacks")
            have = ", ".join(f"{v.id} ({v.precision}: {'/'.join(v.engines)})" for v in self.variants)
            raise ModelError(self.name, f"no {precision} variant for engine {engine}; variants: {have}")
        if engine == "openvino":
            matches.sort(key=lambda v: v.format != "openvino-ir")
        return matches[0]

    def precisions_to_load(self, engine: str, precision: str) -> list[str]:
        """What the daemon loads of this model on an engine: the configured precision, then int8 to step down to;
        its fp32 when it has neither there (e.g. an INT8 variant the speed guard withdrew on this engine)."""
        have = {v.precision for v in self.variants if v.runs_on(engine)}
        wanted = [p for p in [precision] + [p for p in ("int8",) if p != precision] if p in have]
        return wanted or (["fp32"] if "fp32" in have else [])


def _cpu_requires(v: "_Reader", engines: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    from edge_runtime.engines.cpu import CAPABILITIES

    table = v.sub("cpu_requires", required=False)
    if table is None:
        return {}
    out = {}
    for engine in table.table:
        if engine not in engines:
            raise table._fail(engine, f"names an engine the variant is not listed for ({', '.join(engines)})")
        caps = table.list_of(engine, str)
        for c in caps:
            if c not in CAPABILITIES:
                raise table._fail(engine, f"has {c!r}; known: {', '.join(CAPABILITIES)}")
        out[engine] = caps
    return out


class _Reader:
    """Typed access to a TOML table that names file and key in every error."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, table, prefix

    def _fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}", f"key '{self.prefix}{key}' {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., allowed: tuple | None = None) -> Any:
        if key not in self.table:
            if default is ...:
                raise self._fail(key, "is missing")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self._fail(key, f"must be {expected}, got {type(value).__name__}")
        if allowed is not None and value not in allowed:
            raise self._fail(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value

    def list_of(self, key: str, kind: type, default: Any = ...) -> tuple:
        values = self.get(key, list, default)
        out = []
        for i, v in enumerate(values):
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind):
                raise self._fail(f"{key}[{i}]", f"must be {kind.__name__}, got {type(v).__name__}")
            out.append(v)
        return tuple(out)

    def sub(self, key: str, required: bool = True) -> _Reader | None:
        if key not in self.table:
            if required:
                raise self._fail(key, "is missing (a [table])")
            return None
        value = self.table[key]
        if not isinstance(value, dict):
            raise self._fail(key, "must be a [table]")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


def parse_manifest(path: Path) -> ModelManifest:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(str(path.parent.name), f"no {MANIFEST} in {path.parent}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML ({exc})") from None
    r = _Reader(path, raw)
    task = r.get("task", str, allowed=TASKS)
    inp = r.sub("input")
    shape = inp.list_of("shape", int)
    if len(shape) != 4:
        raise ConfigError(str(path), f"key 'input.shape' must have 4 dimensions (N, C, H, W); got {list(shape)}")
    channels = inp.get("channels", str, allowed=CHANNELS)
    input_spec = InputSpec(
        name=inp.get("name", str),
        shape=shape,
        layout=inp.get("layout", str, allowed=("NCHW",)),
        channels=channels,
        dtype=inp.get("dtype", str, allowed=("float32",)),
    )
    pre = r.sub("preprocessing")
    n_ch = 1 if channels == "gray" else 3
    mean = pre.list_of("mean", float, (0.0,) * n_ch)
    std = pre.list_of("std", float, (1.0,) * n_ch)
    if len(mean) != n_ch or len(std) != n_ch or any(s <= 0 for s in std):
        raise ConfigError(str(path), f"keys 'preprocessing.mean'/'std' need {n_ch} value(s), std > 0")
    decode_margin = pre.get("decode_margin", float, 2.0)
    if not 2.0 <= decode_margin <= 64.0:
        raise ConfigError(str(path), f"key 'preprocessing.decode_margin' must be 2 to 64, got {decode_margin}")
    preprocess = PreprocessSpec(
        height=shape[2],
        width=shape[3],
        channels=channels,
        resize=pre.get("resize", str, "stretch", RESIZE_MODES),
        interpolation=pre.get("interpolation", str, "area", tuple(INTERPOLATIONS)),
        mean=mean,
        std=std,
        decode_margin=decode_margin,
    )
    out = r.sub("output")
    output = OutputSpec(
        name=out.get("name", str),
        activation=out.get("activation", str, allowed=ACTIVATIONS),
        labels=out.list_of("labels", str),
    )
    decision = segmentation = None
    if task == "classification":
        d = r.sub("decision")
        decision = DecisionSpec(
            positive_label=d.get("positive_label", str, allowed=output.labels),
            threshold=d.get("threshold", float),
            urgent_if_positive=d.get("urgent_if_positive", bool, False),
            threshold_rule=d.get("threshold_rule", str, ""),
            temperature=d.get("temperature", float, 1.0),
            conformal_qhat=d.get("conformal_qhat", float, None),
        )
        if decision.temperature <= 0 or not 0 <= (decision.conformal_qhat or 0.0) <= 1:
            raise ConfigError(str(path), "key 'decision.temperature' must be > 0 and 'decision.conformal_qhat' in 0..1")
    else:
        s = r.sub("segmentation")
        segmentation = SegmentationSpec(
            threshold=s.get("threshold", float, 0.5),
            measurement=s.get("measurement", str, allowed=("head_circumference",)),
            gestational_age=s.get("gestational_age", str, "none", ("hadlock-1984-hc", "none")),
            min_area_fraction=s.get("min_area_fraction", float, 0.005),
            min_fit_quality=s.get("min_fit_quality", float, 0.0),
        )
    variants_raw = r.get("variants", list)
    if not variants_raw:
        raise ConfigError(str(path), "key 'variants' must list at least one [[variants]] entry")
    variants = []
    for i, table in enumerate(variants_raw):
        if not isinstance(table, dict):
            raise ConfigError(str(path), f"key 'variants[{i}]' must be a table")
        v = _Reader(path, table, f"variants[{i}].")
        fmt = v.get("format", str, allowed=FORMATS)
        engines = v.list_of("engines", str)
        for e in engines:
            if e not in ENGINES:
                raise ConfigError(str(path), f"key 'variants[{i}].engines' has {e!r}; allowed: {', '.join(ENGINES)}")
        weights = v.get("weights", str, None)
        variants.append(
            Variant(
                id=v.get("id", str),
                path=path.parent / v.get("file", str),
                format=fmt,
                engines=engines,
                precision=v.get("precision", str, allowed=PRECISIONS),
                sha256=v.get("sha256", str).lower(),
                metrics=v.get("metrics", dict, {}),
                weights_path=path.parent / weights if weights else None,
                weights_sha256=v.get("weights_sha256", str, None),
                scope_threshold=v.get("scope_threshold", float, None),
                cpu_requires=_cpu_requires(v, engines),
            )
        )
    modality = r.list_of("modality", str)
    return ModelManifest(
        name=r.get("name", str),
        version=r.get("version", str),
        task=task,
        modality=modality,
        summary=r.get("summary", str, ""),
        intended_use=r.get("intended_use", str),
        latency_budget_ms=r.get("latency_budget_ms", float),
        input=input_spec,
        preprocess=preprocess,
        windowing=pre.get("windowing", str, "voi", WINDOWINGS),
        output=output,
        decision=decision,
        segmentation=segmentation,
        variants=tuple(variants),
        folder=path.parent,
        raw=raw,
        scope=parse_scope(path, r, modality),
        explanation=parse_explanation(path, r, task, output, decision),
    )


def parse_explanation(path: Path, r: _Reader, task: str, output: OutputSpec,
                      decision: DecisionSpec | None) -> ExplanationSpec | None:
    """[explanation]: method "cam" (classification; names the graph output and the label whose map is shown) or
    "segmentation" (the head mask and ellipse; no graph output)."""
    e = r.sub("explanation", required=False)
    if e is None:
        return None
    method = e.get("method", str, allowed=EXPLANATION_METHODS)
    wanted = "classification" if method == "cam" else "segmentation"
    if task != wanted:
        raise ConfigError(str(path), f"key 'explanation.method' {method!r} needs task {wanted!r}; the model's task is {task!r}")
    top_mass = e.get("top_mass", float, 0.2)
    if not 0.0 < top_mass <= 1.0:
        raise ConfigError(str(path), f"key 'explanation.top_mass' must be in (0, 1]; got {top_mass}")
    if method == "segmentation":
        return ExplanationSpec(method, label=output.labels[0], top_mass=top_mass)
    default_label = decision.positive_label if decision is not None else output.labels[-1]
    return ExplanationSpec(method, output=e.get("output", str, "cam"),
                           label=e.get("label", str, default_label, output.labels), top_mass=top_mass)


def parse_scope(path: Path, r: _Reader, modality: tuple[str, ...]) -> ScopeSpec:
    """[scope]: allowed header values (upper case, as DICOM writes them) and the [scope.content] gate file."""
    s = r.sub("scope", required=False)
    if s is None:
        return ScopeSpec(modality=tuple(m.upper() for m in modality))

    def values(key: str) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in s.list_of(key, str, ()))

    content = None
    c = s.sub("content", required=False)
    if c is not None:
        threshold = c.get("threshold", float)
        if not threshold > 0:
            raise ConfigError(str(path), f"key 'scope.content.threshold' must be > 0; got {threshold}")
        content = ContentGateSpec(
            path=path.parent / c.get("file", str),
            sha256=c.get("sha256", str).lower(),
            threshold=threshold,
            method=c.get("method", str, "mahalanobis", ("mahalanobis",)),
            header_confirmed_threshold=c.get("header_confirmed_threshold", float, None),
        )
        if content.header_confirmed_threshold is not None and content.header_confirmed_threshold < threshold:
            raise ConfigError(str(path), "key 'scope.content.header_confirmed_threshold' must be >= 'threshold'")
    return ScopeSpec(
        modality=tuple(m.upper() for m in modality),
        body_part=values("body_part"),
        view_position=values("view_position"),
        photometric=values("photometric"),
        content=content,
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_variant(manifest: ModelManifest, variant: Variant) -> None:
    """Refuse a variant whose file is missing or whose bytes differ from the manifest's sha256."""
    for file, expected in ((variant.path, variant.sha256), (variant.weights_path, variant.weights_sha256)):
        if file is None:
            continue
        if not file.is_file():
            raise ModelError(manifest.name, f"variant {variant.id}: file {file} is missing")
        if expected is None:
            raise ModelError(manifest.name, f"variant {variant.id}: no sha256 recorded for {file.name}")
        actual = sha256_file(file)
        if actual != expected:
            raise ModelError(
                manifest.name,
                f"variant {variant.id}: sha256 mismatch for {file.name} (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the file is corrupt or was replaced: reinstall the model",
            )


def verify_signature(folder: Path, public_key_path: Path) -> None:
    """Check manifest.toml.sig (raw 64 bytes or base64) against an ed25519 public key (PEM or raw 32 bytes)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    name = folder.name
    try:  # a damaged or wrong key file is one line naming it, not a traceback
        key_bytes = Path(public_key_path).read_bytes()
        if b"BEGIN PUBLIC KEY" in key_bytes:
            key = load_pem_public_key(key_bytes)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(str(public_key_path), "public key is not an ed25519 key")
        else:
            key = Ed25519PublicKey.from_public_bytes(key_bytes[:32])
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not a PEM public key or 32 raw bytes"
        raise ConfigError(str(public_key_path), f"key 'models.public_key': cannot read an ed25519 public key "
                                                f"({why})") from None
    sig_path = folder / SIGNATURE
    if not sig_path.is_file():
        raise ModelError(name, f"unsigned manifest: {sig_path} is missing and a model public key is configured")
    sig = sig_path.read_bytes()
    if len(sig) != 64:
        try:
            sig = base64.b64decode(sig.strip(), validate=True)
        except ValueError:
            raise ModelError(name, f"signature {sig_path} is neither 64 raw bytes nor base64") from None
    try:
        key.verify(sig, (folder / MANIFEST).read_bytes())
    except InvalidSignature:
        raise ModelError(name, "manifest signature does not verify against the configured public key") from None


def bundled_models_dir() -> Path:
    """models/ of a source checkout, or the copy packed into the wheel."""
    here = Path(__file__).resolve().parent
    packed = here / "bundled_models"
    checkout = here.parent / "models"
    if not packed.is_dir() and (here.parent / "pyproject.toml").is_file():
        return checkout  # running from a source checkout (editable install or tests)
    return packed


class ModelRegistry:
    """Model folders found under one or more roots (first root wins on a name clash)."""

    def __init__(self, roots: list[Path] | None = None, public_key: Path | None = None) -> None:
        if roots is None:
            env = os.environ.get("EDGE_RUNTIME_MODELS")
            roots = [Path(p) for p in env.split(os.pathsep) if p] if env else []
            roots.append(bundled_models_dir())
        self.roots = [Path(r) for r in roots]
        self.public_key = Path(public_key) if public_key else None
        self._cache: dict[str, ModelManifest] = {}

    def folders(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for manifest in sorted(root.glob(f"*/{MANIFEST}")):
                # Resolved: an installed version is a link (state dir models/active/<name>), and a manifest
                # read must keep naming that version's files after the link is switched to another.
                found.setdefault(manifest.parent.name, manifest.parent.resolve())
        return found

    def names(self) -> list[str]:
        return sorted(self.folders())

    def forget(self, name: str) -> None:
        """Drop a cached manifest: the next get() reads the model folder again (after an install or rollback)."""
        self._cache.pop(name, None)

    def get(self, name: str) -> ModelManifest:
        if name in self._cache:
            return self._cache[name]
        folders = self.folders()
        if name not in folders:
            known = ", ".join(sorted(folders)) or "none"
            raise ModelError(name, f"unknown model; installed models: {known}")
        folder = folders[name]
        if self.public_key is not None:
            verify_signature(folder, self.public_key)
        manifest = parse_manifest(folder / MANIFEST)
        if manifest.name != name:
            raise ConfigError(str(folder / MANIFEST), f"key 'name' is {manifest.name!r} but the folder is {name!r}")
        self._cache[name] = manifest
        return manifest


def registry_from_config(config) -> ModelRegistry:
    """The registry a configuration names (config: edge_runtime.config.Config). Versions installed from bundles
    (edge_runtime/ota) come first: they are what the hub rolled out; then models.paths, then the shipped models."""
    roots = [config.state_dir / "models" / "active"] + [Path(p) for p in config.models.paths] + [bundled_models_dir()]
    return ModelRegistry(roots, Path(config.models.public_key) if config.models.public_key else None)
