"""Screenshot the asset graph of a running Dagster web UI with headless Chromium (README image).

Needs Playwright and a Chromium (``pip install playwright``; Debian's ``chromium`` works:
``--chromium /usr/bin/chromium``); not a project dependency. With the demo instance served:

    make dev &   # or dagster-webserver -w workspace.yaml -p 3000
    python scripts/screenshot_ui.py --url http://127.0.0.1:3000 --out docs/asset_graph.png \
        --width 2400 --height 900 --zoom-out 3 --pan-x 780 --pan-y -190 --clip-height 800
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--out", default="docs/asset_graph.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument(
        "--path",
        default="/asset-groups",
        help="UI page to capture (default: the global asset lineage)",
    )
    parser.add_argument("--width", type=int, default=1700)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--zoom-out", type=int, default=3, help="zoom-out clicks")
    parser.add_argument("--pan-x", type=int, default=0, help="drag the graph right (px)")
    parser.add_argument("--pan-y", type=int, default=0, help="drag the graph down (px)")
    parser.add_argument("--clip-height", type=int, default=0, help="keep the top rows only")
    args = parser.parse_args()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as play:
        browser = play.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.url + args.path, wait_until="networkidle")
        skip = page.get_by_role("button", name="Skip")
        with contextlib.suppress(PlaywrightTimeout):  # the sign-up dialog of a new profile
            skip.first.click(timeout=15000)
        hide = page.get_by_text("Hide navigation", exact=True)
        if hide.count():
            hide.first.click()
        for group in ("catalog", "corpus", "model", "cleaning"):  # groups start collapsed
            toggle = page.get_by_text(group, exact=True)
            if toggle.count():
                toggle.last.click()
                time.sleep(1)
        # the group tree beside the graph: the button right of "Jump to..."
        jump = page.get_by_placeholder("Jump to…")
        if jump.count():
            box = jump.first.bounding_box()
            page.mouse.click(box["x"] + box["width"] + 20, box["y"] + box["height"] / 2)
            time.sleep(1)
        # zoom out until the whole graph fits: the lower magnifier beside the zoom slider
        slider = page.locator("input[type=range], [role=slider]").last
        box = slider.bounding_box() if slider.count() else None
        for _ in range(args.zoom_out if box else 0):
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] + 22)
            time.sleep(0.3)
        if args.pan_x or args.pan_y:  # drag the canvas by its empty top-left corner
            x0, y0 = args.width * 0.45, 150
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + args.pan_x, y0 + args.pan_y, steps=20)
            page.mouse.up()
        time.sleep(2)
        page.screenshot(
            path=args.out,
            clip={"x": 0, "y": 0, "width": args.width, "height": args.clip_height or args.height},
        )
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
