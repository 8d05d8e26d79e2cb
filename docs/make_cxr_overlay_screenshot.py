"""Re-make docs/cxr-overlay-view.png, the chest model card's picture of an explanation on the local view (issue 15):
the daemon with one dicom-folder inbox for cxr-pneumonia and the view on, two Kermany images of the train split
dropped in (a pneumonia and a normal one), the findings list in headless chromium, cropped to the two findings at 2x scale.
The urgent pneumonia finding carries the class activation map overlay as its thumbnail; the routine one has none.

    .venv/bin/python docs/make_cxr_overlay_screenshot.py [--out docs/cxr-overlay-view.png]

Needs chromium and ../shared/data (the images are CC BY 4.0, Kermany, Zhang, Goldbaum, doi:10.17632/rscbjbr9sj.2;
the PNG is a derivative).
"""
from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from cdp import Browser  # noqa: E402

KERMANY = ROOT.parent / "shared" / "data" / "cxr-kermany" / "train"
IMAGES = (KERMANY / "PNEUMONIA" / "person1_bacteria_1.jpeg", KERMANY / "NORMAL" / "IM-0115-0001.jpeg")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "cxr-overlay-view.png")
    args = p.parse_args()
    missing = [str(i) for i in IMAGES if not i.is_file()]
    if missing:
        raise SystemExit(f"needs ../shared/data: {', '.join(missing)} not found")

    from edge_runtime.config import load_config
    from edge_runtime.service import Service

    root = Path(tempfile.mkdtemp(prefix="edge-cxr-shot-"))
    inbox = root / "inbox"
    inbox.mkdir()
    cfg = root / "edge.toml"
    cfg.write_text(
        f'[device]\nid = "scanner-07"\nsite = "demo-clinic"\nstate_dir = "{root / "state"}"\n\n'
        '[engine]\nkind = "onnxruntime"\nthreads = 1\n\n[service]\nmetrics_port = 0\n\n[view]\nport = 0\n\n'
        f'[[sources]]\nname = "xray"\nkind = "dicom-folder"\nmodel = "cxr-pneumonia"\ninbox = "{inbox}"\n')
    service = Service(load_config(cfg))
    service.start()
    try:
        token = (root / "state" / "view.token").read_text().strip()
        with Browser.start() as b:
            b.send("Emulation.setDeviceMetricsOverride", {"width": 900, "height": 700, "deviceScaleFactor": 1,
                                                          "mobile": False})
            b.navigate(f"http://127.0.0.1:{service.view.port}/?token={token}")
            for i, src in enumerate(IMAGES):
                shutil.copy(src, inbox / f"chest-{i:04d}{src.suffix}")
            b.wait_for("document.querySelectorAll('li.finding').length >= 2", 60, what="two chest findings")
            b.wait_for("document.querySelector('li.finding img.thumb')?.complete", 30, what="the overlay drawn")
            box = b.evaluate("(() => { const ul = document.querySelector('li.finding').parentElement;"
                             " ul.scrollIntoView(); const r = ul.getBoundingClientRect();"
                             " return [r.x + window.scrollX, r.y + window.scrollY, r.width, r.height]; })()")
            x, y, w, h = box
            data = b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
                "x": x, "y": y, "width": w, "height": min(h, 400), "scale": 2}})["data"]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_bytes(base64.b64decode(data))
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
