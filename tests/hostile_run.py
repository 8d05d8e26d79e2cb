"""Run a hostile corpus (tests/hostile_corpus.py) through `edge-runtime infer` and the daemon's inbox, and account
for every file: a finding or a one-line reason, the processes alive, peak RSS. Used by tests/test_hostile.py and by
`python tests/hostile_corpus.py --run`."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import CLASSIFIER_MANIFEST, classifier_onnx, sha256  # noqa: E402
from hostile_corpus import klass  # noqa: E402

# What a reason must never show: Python internals instead of something a technician can act on.
INTERNALS = re.compile(r"Traceback|NoneType|object has no attribute|unpack_from|requires a buffer|Alias '|"
                       r"broadcast|RecursionError|maximum recursion|internal error|KeyError|IndexError")


def any_modality_model(root: Path) -> Path:
    """A tiny classifier that reads every modality, so each corpus file reaches the decoder."""
    folder = root / "tiny-any"
    folder.mkdir(parents=True, exist_ok=True)
    classifier_onnx(folder / "model.onnx")
    text = CLASSIFIER_MANIFEST.format(name="tiny-any", sha=sha256(folder / "model.onnx"))
    (folder / "manifest.toml").write_text(text.replace('modality = ["CR", "DX"]', "modality = []"))
    return root


def write_config(tmp: Path, inbox: Path | None = None) -> Path:
    models = any_modality_model(tmp / "models")
    text = (f'[device]\nid = "hostile"\nsite = "lab"\nstate_dir = "{tmp / "state"}"\n\n'
            f'[models]\npaths = ["{models}"]\n\n[engine]\nkind = "onnxruntime"\nthreads = 1\nwarmup_runs = 1\n\n'
            '[service]\nmetrics_port = 0\nlog_format = "json"\n')
    if inbox is not None:
        text += f'\n[[sources]]\nname = "inbox"\nkind = "dicom-folder"\nmodel = "tiny-any"\ninbox = "{inbox}"\n'
    path = tmp / "hostile.toml"
    path.write_text(text)
    return path




def run_infer(files: list[Path], tmp: Path, timeout_s: float = 1800) -> dict:
    """All files through one `infer` process: its exit status, peak RSS and each file's outcome."""
    config = write_config(tmp / "infer")
    cmd = [sys.executable, "-m", "edge_runtime", "--config", str(config), "infer", "--model", "tiny-any",
           *map(str, files)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout_s)
    proc.wait()
    rc = proc.returncode
    peak = _peak_children_rss()
    outcomes: dict[str, list] = {str(f): [] for f in files}
    for line in out.splitlines():
        finding = json.loads(line)
        outcomes[finding["source"]["name"]].append(("finding", finding["result"].get("label", "")))
    prefix = "edge-runtime: "
    stray = []
    for line in err.splitlines():
        if not line.startswith(prefix):
            stray.append(line)
            continue
        name, _, reason = line[len(prefix):].partition(": ")
        if name in outcomes:
            outcomes[name].append(("error", reason))
        else:
            stray.append(line)
    return {"rc": rc, "peak_rss": peak, "outcomes": outcomes, "stray_stderr": stray}


def _peak_children_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_daemon(files: list[Path], tmp: Path, timeout_s: float = 1800) -> dict:
    """All files dropped into a running daemon's inbox: the daemon alive throughout, each file in done/ or in
    quarantine/ with its reason, the daemon's peak RSS (VmHWM, the worker processes not included)."""
    inbox = tmp / "daemon" / "inbox"
    inbox.mkdir(parents=True)
    config = write_config(tmp / "daemon", inbox)
    log_path = tmp / "daemon" / "log.jsonl"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "--config", str(config), "run"],
                                stdout=log, stderr=log)
    done, quarantine = inbox.parent / "inbox-done", inbox.parent / "inbox-quarantine"
    alive_throughout = True
    peak_worker = 0
    try:
        for f in files:
            shutil.copyfile(f, inbox / f.name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                alive_throughout = False
                break
            left = [p for p in inbox.iterdir() if not p.name.startswith(".")]
            if not left:
                break
            peak_worker = max([peak_worker] + [_vm_hwm(int(c)) for c in _children(proc.pid)])
            time.sleep(0.5)
        peak = _vm_hwm(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    outcomes: dict[str, list] = {f.name: [] for f in files}
    for p in done.iterdir() if done.exists() else []:
        outcomes.setdefault(p.name, []).append(("done", ""))
    for p in quarantine.glob("*.reason.txt") if quarantine.exists() else []:
        name = p.name[: -len(".reason.txt")]
        outcomes.setdefault(name, []).append(("quarantined", p.read_text().split(" ", 1)[1].strip()))
    lines = log_path.read_text().splitlines()
    non_json = [line for line in lines if line.strip() and not line.lstrip().startswith("{")]
    return {"alive": alive_throughout, "rc": proc.returncode, "peak_rss": peak, "peak_worker_rss": peak_worker,
            "outcomes": outcomes,
            "left_in_inbox": sorted(p.name for p in inbox.iterdir() if not p.name.startswith(".")),
            "non_json_log_lines": non_json, "log": lines}


def _children(pid: int) -> list[str]:
    """Child processes of every thread (a decode worker restarted after a crash is the study thread's child)."""
    found: list[str] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += children.read_text().split()
        except OSError:
            continue
    return found


def reason_class(reason: str) -> str:
    """A coarse class of a reason, for the report."""
    for key in ("crashed", "took longer", "too large", "inflates", "impossible header", "inconsistent", "truncated",
                "no pixel data", "corrupt", "failed to decode", "not a DICOM", "empty file", "nests", "unreadable",
                "decoder failed"):
        if key in reason:
            return key
    return "other"


def report(files: list[Path], out: Path) -> str:
    lines = [f"{len(files)} files"]
    t0 = time.monotonic()
    infer = run_infer(files, out)
    lines.append(f"infer: exit {infer['rc']} in {time.monotonic() - t0:.0f} s, peak RSS of infer and its workers "
                 f"{infer['peak_rss'] / 2**20:.0f} MiB")
    unaccounted = [n for n, o in infer["outcomes"].items() if not o]
    leaks = [r for o in infer["outcomes"].values() for k, r in o if k == "error" and INTERNALS.search(r)]
    classes = Counter(reason_class(r) for o in infer["outcomes"].values() for k, r in o if k == "error")
    found = sum(1 for o in infer["outcomes"].values() if o and o[0][0] == "finding")
    lines.append(f"  with a finding {found}, with a reason {sum(classes.values())}, unaccounted {len(unaccounted)}, "
                 f"reasons showing internals {len(leaks)}, stray stderr lines {len(infer['stray_stderr'])}")
    lines.append("  reasons by class: " + ", ".join(f"{k} {v}" for k, v in classes.most_common()))
    wrong = [n for n, o in infer["outcomes"].items() if klass(n) in _refused() and any(k == "finding" for k, _ in o)]
    lines.append(f"  findings for broken-by-construction files: {len(wrong)} {wrong[:5]}")
    t0 = time.monotonic()
    daemon = run_daemon(files, out)
    q = Counter(reason_class(r) for o in daemon["outcomes"].values() for k, r in o if k == "quarantined")
    accounted = sum(1 for f in files if daemon["outcomes"].get(f.name))
    lines.append(f"daemon: alive throughout {daemon['alive']}, {accounted}/{len(files)} accounted for in "
                 f"{time.monotonic() - t0:.0f} s, left in inbox {len(daemon['left_in_inbox'])}, peak RSS "
                 f"{daemon['peak_rss'] / 2**20:.0f} MiB (decode workers: {daemon['peak_worker_rss'] / 2**20:.0f} MiB), "
                 f"non-JSON log lines {len(daemon['non_json_log_lines'])}")
    lines.append("  quarantined by class: " + ", ".join(f"{k} {v}" for k, v in q.most_common()))
    return "\n".join(lines)


def _refused() -> tuple[str, ...]:
    from hostile_corpus import EXPECT_REFUSED

    return EXPECT_REFUSED
