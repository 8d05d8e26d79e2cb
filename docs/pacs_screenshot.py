"""Re-make the README screenshots: a private Orthanc with the shared chest CR and its report, shown by Orthanc's explorer
in headless chromium. Run from the repository root: .venv/bin/python docs/pacs_screenshot.py (needs orthanc, chromium
and ../shared/data; writes docs/pacs-orthanc-study.png and docs/pacs-orthanc-instance.png)."""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from orthanc_helpers import Orthanc
from test_pacs import finding, reference, CR
from edge_runtime.pacs.sr import build_sr, sop_instance_uid
root = Path(tempfile.mkdtemp(prefix="edge-pacs-shot-"))
docs = Path(__file__).resolve().parent
o = Orthanc(root / "orthanc").start()
o.upload(CR)
f = finding("normal"); f["device_id"] = "scanner-07"
sr = build_sr(f, reference(CR)); sr.save_as(root / "sr.dcm", enforce_file_format=True)
o.upload(root / "sr.dcm")
inst = o.find_instance(sop_instance_uid(f["finding_id"]))

study = o.study_of(inst)
for name, frag in (("study", f"study?uuid={study}"), ("instance", f"instance?uuid={inst}")):
    url = f"{o.url}/app/explorer.html#{frag}"
    out = root / f"{name}.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={root / ('profile-' + name)}",
           "--window-size=1280,900", "--virtual-time-budget=8000", f"--screenshot={out}", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed: {r.stderr[-500:]}")
    shutil.copy(out, docs / f"pacs-orthanc-{name}.png")
o.stop()
shutil.rmtree(root, ignore_errors=True)
