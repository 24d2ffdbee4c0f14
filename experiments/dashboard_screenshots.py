"""Screenshots of a run's TensorBoard pages, for docs/monitoring.md.

Starts TensorBoard on ``--logdir``, opens each page in headless Chromium (``apt install chromium``;
not a Python dependency) and saves PNGs into ``--out``. The demo's logs:

    lightning-moo fit --config configs/demo.yaml
    python experiments/dashboard_screenshots.py --logdir runs/demo/tensorboard --out docs/img
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# page file name → TensorBoard URL fragment (the Angular app reads its state from it); forceSVG: Time Series draws with SVG, which a headless browser without a GPU renders
PAGES = {
    "dashboard_time_series.png": "timeseries",  # the page TensorBoard opens on
    "dashboard_scalars.png": "scalars",
    "dashboard_languages.png": "custom_scalars",
    "dashboard_images.png": "images&tagFilter=bucket_pair",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {seconds:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--size", default="1400,1000", help="browser window in pixels, WIDTH,HEIGHT")
    p.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = p.parse_args()
    if not args.logdir.is_dir():
        sys.exit(f"--logdir {args.logdir} does not exist: train first (lightning-moo fit --config configs/demo.yaml)")
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/data/runs")
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            for name, fragment in PAGES.items():
                subprocess.run(
                    [args.browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-unsafe-swiftshader",
                     f"--user-data-dir={profile}",
                     f"--window-size={args.size}", "--virtual-time-budget=20000", f"--screenshot={args.out / name}",
                     f"http://127.0.0.1:{port}/?darkMode=false&forceSVG=true#{fragment}"],
                    check=True, capture_output=True, timeout=120,
                )
                print(f"saved {args.out / name}")
    finally:
        board.terminate()
        board.wait(timeout=30)


if __name__ == "__main__":
    main()
