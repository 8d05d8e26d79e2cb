"""Training-only helpers shared by the reference model scripts (torch allowed here, never in the runtime)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# One implementation of the evaluation metrics for training, quantization guards and tests.
from quantize.metrics import bootstrap_ci, roc_auc  # noqa: E402,F401

DEFAULT_CACHE = Path(os.environ.get("EDGE_CACHE", "/tmp/edge-cache"))
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def training_parser(description: str, dataset: str, out: Path, epochs: int, batch: int):
    """The command line both training scripts share; data defaults to ../shared/data/<dataset>."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / dataset)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="smoke test: use only this many training images")
    return ap


def tune_malloc() -> None:
    """Keep freed activation buffers in the heap (glibc): avoids mmap/munmap page-fault churn per step (~20 % faster)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD (glibc maximum)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def seed_everything(seed: int, threads: int = 2) -> None:
    import torch

    tune_malloc()

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def export_onnx(model, example, path: Path) -> None:
    """Static batch-1 ONNX, opset 17, input "image", output "logits" (legacy exporter: requested opset)."""
    import torch

    model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            do_constant_folding=True,
        )
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m)


def ort_session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_check(model, path: Path, inputs: Sequence[np.ndarray]) -> float:
    """Max |ORT - torch| over the given (1,C,H,W) inputs."""
    import torch

    sess = ort_session(path)
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            a = model(torch.from_numpy(x)).numpy()
            b = sess.run(["logits"], {"image": x})[0]
            if a.shape != b.shape:
                raise RuntimeError(f"shape mismatch torch {a.shape} vs ORT {b.shape}")
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def ort_latency_ms(path: Path, shape: Sequence[int], runs: int = 300, warmup: int = 30, threads: int = 2) -> dict:
    """Batch-1 ORT FP32 latency on this CPU: median and p90 of `runs` timed runs after warm-up."""
    sess = ort_session(path, threads)
    x = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    for _ in range(warmup):
        sess.run(["logits"], {"image": x})
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["logits"], {"image": x})
        t.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(t)
    return {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90)), "min": float(t.min())}


def today() -> str:
    return _dt.date.today().isoformat()


class Timer:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self) -> float:
        return time.time() - self.t0


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)
