"""Remake the docs' pictures from a folder where the README's quick start was run.

    python docs/make_pictures.py QUICKSTART_DIR

writes ``docs/demo_panels.png`` (three of the demo's test panels: photo, heat map,
true mask) and ``docs/compare_page.png`` (the top of ``compare.html`` in Debian's
chromium, driven by Playwright).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parent


def demo_panels(quick_start: Path, out: Path) -> None:
    """One panel per defect type, stacked: what a newcomer sees first."""
    panels = quick_start / "demo_run" / "run" / "panels"
    picked = [Image.open(panels / kind / "001.png").convert("RGB")
              for kind in ("scratch", "hole", "stain")]
    width = max(p.width for p in picked)
    sheet = Image.new("RGB", (width, sum(p.height for p in picked)), "white")
    top = 0
    for panel in picked:
        sheet.paste(panel, (0, top))
        top += panel.height
    sheet.save(out, optimize=True)


def compare_page(quick_start: Path, out: Path, height: int = 1400) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": height})
        page.goto((quick_start / "compare.html").resolve().as_uri())
        page.screenshot(path=str(out))
        browser.close()
    Image.open(out).convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quick_start", type=Path, help="where the quick start was run")
    args = parser.parse_args()
    demo_panels(args.quick_start, DOCS / "demo_panels.png")
    compare_page(args.quick_start, DOCS / "compare_page.png")


if __name__ == "__main__":
    main()
