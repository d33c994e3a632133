"""The report renders in headless Chromium: screenshot, expected sections, no broken images.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import matplotlib.image
import pytest

from sapguard.interpret.report import SECTIONS, build_report
from tests.test_interpret_report import BENCH_MD, METRICS
from tests.test_interpret_specialisation import synthetic_featureset, synthetic_polytope

pytestmark = pytest.mark.slow

# Added to a copy of the report only (the report itself has no scripts): records what the browser made of it.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.sections = [...document.querySelectorAll('section')].map(s => s.id).join(',');
});</script>"""


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(tmp_path):
    out, _ = build_report(
        synthetic_polytope(),
        synthetic_featureset(),
        tmp_path / "report.html",
        metrics=METRICS,
        bench=BENCH_MD,
    )
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri())
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2400, 1200) and image[..., :3].std() > 0.05

    probed = tmp_path / "probed.html"
    probed.write_text(out.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs["sections"].split(",") == [*SECTIONS, "steering"]
    assert int(attrs["images"]) == 4 + 2 + 3  # facet histograms, MI heatmaps, usage / similarity / projection
    assert attrs["broken"] == "0"
    assert "Facet specialisation" in dom and "Detection metrics and baselines" in dom
