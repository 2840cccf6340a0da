"""Report-site benchmark (`imzarr report`): a synthetic 1,000-class run × (16 real + 16 generated) thumbnails
(`quick`: 100 classes) and a 10-class run the size of the embedded sample (100 samples per class per side).

For each: the time to write the site, its size on disk (goal < 60 MB at 1,000 classes), and in headless Chromium
(Debian's, through Playwright) the first view's time to interactive (goal < 2 s): from the start of navigation of
`file://…/index.html` to the page's ready mark (table built, handlers attached), measured both as the page's own
`performance.now()` at the mark and as wall time around `goto` (the larger is the row's value); then the time
to sort 1,000 rows by FD, to scroll the table to its end (checking FD order at both ends) and to open one class (its detail script and three grid JPEGs). The runs are made with
`tests.support.synthetic.write_compare_run` (photo-like 64-px images, 18 stand-in features), reused between runs.
With `data/compare-own.zarr` from `make compare` present, its site is measured too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tests.benchmarks.run import QuietGate, Row, make_row

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INTERACTIVE_GOAL_S = 2.0
SITE_GOAL_MB = 60.0
MB = 1e6
from tests.support.locations import REPO  # noqa: E402


def _compare_run(workdir: Path, classes: int, per_class: int) -> str:
    from tests.support.synthetic import write_compare_run

    root = workdir / f"run-{classes}x{per_class}"
    marker = root / "ready.json"
    recipe = {"classes": classes, "per_class": per_class, "recipe": 1}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return str(root / "compare.zarr")
    shutil.rmtree(root, ignore_errors=True)
    urls = write_compare_run(root, classes, per_class, copies=1)
    marker.write_text(json.dumps(recipe))
    return urls["compare"]


def _site_bytes(site: Path) -> int:
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file())


def _measure_browser(browser, site: Path, classes: int, fd: dict[int, float]) -> dict[str, float]:
    """Times, and checks that the virtual table holds every class in FD order from top to bottom."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(r.url))
    started = time.perf_counter()
    page.goto(site.resolve().as_uri() + "/index.html")
    page.wait_for_function("window.imzarrReady !== undefined", polling=10)
    wall = time.perf_counter() - started
    in_page = page.evaluate("window.imzarrReady") / 1000.0
    shown = page.inner_text("#shown")
    sort_s = page.evaluate(
        """() => { const t = performance.now(); document.querySelector("#class-table th[data-key='fd']").click();
                   document.body.offsetHeight; return (performance.now() - t) / 1000; }"""
    )
    top = int(page.eval_on_selector("#class-table tbody tr[data-label]", "t => t.dataset.label"))
    scroll_s = page.evaluate(
        """() => new Promise(done => { const w = document.querySelector('.table-wrap'), t = performance.now();
                 w.scrollTop = w.scrollHeight; requestAnimationFrame(() => requestAnimationFrame(() => {
                 document.body.offsetHeight; done((performance.now() - t) / 1000); })); })"""
    )
    bottom = int(page.eval_on_selector_all("#class-table tbody tr[data-label]", "ts => ts[ts.length - 1].dataset.label"))
    defined = {c: v for c, v in fd.items() if v == v}
    in_order = top == max(defined, key=defined.get) and (bottom == min(defined, key=defined.get) if len(defined) == len(fd) else fd[bottom] != fd[bottom])
    started = time.perf_counter()
    page.click("#class-table tbody tr[data-label]")
    page.wait_for_selector(".pairs .pair")
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)", polling=10)
    open_s = time.perf_counter() - started
    page.close()
    if errors or shown != f"{classes} of {classes} classes" or not in_order:
        raise RuntimeError(f"{site}: table shows {shown!r} for {classes} classes, FD order top/bottom {top}/{bottom} ok={in_order}; errors {errors[:3]}")
    return {"wall": wall, "in_page": in_page, "sort": sort_s, "scroll": scroll_s, "open": open_s}


def _rows(label: str, compare_url: str, workdir: Path, classes: int, browser, goal_size: bool) -> list[Row]:
    from extractor.analysis.report import open_compare, write_report_site

    ds, _ = open_compare(compare_url)
    fd = dict(zip(ds["label"].values.tolist(), ds["fd"].values.tolist()))
    site = workdir / f"site-{label.split()[0]}"
    QuietGate().wait()
    result = write_report_site(compare_url, str(site))
    size = _site_bytes(site)
    t = _measure_browser(browser, site, classes, fd)
    interactive = max(t["wall"], t["in_page"])
    return [
        make_row("report", f"report site {label}: write", result.seconds, "s", note=f"{result.files:,} files"),
        make_row(
            "report", f"report site {label}: size", size / MB, "MB",
            goal=f"< {SITE_GOAL_MB:.0f} MB" if goal_size else "", met=(size / MB < SITE_GOAL_MB) if goal_size else None,
            note=f"{size / max(classes, 1) / 1e3:.0f} kB per class (3 grid JPEGs + detail script)",
        ),
        make_row(
            "report", f"report site {label}: first view interactive (headless Chromium)", interactive, "s",
            goal=f"< {INTERACTIVE_GOAL_S:.0f} s", met=interactive < INTERACTIVE_GOAL_S,
            note=f"page's ready mark {t['in_page'] * 1e3:.0f} ms after navigation start; wall around goto {t['wall'] * 1e3:.0f} ms",
        ),
        make_row("report", f"report site {label}: sort by FD", t["sort"] * 1e3, "ms", note="click to re-ordered rows, layout forced"),
        make_row("report", f"report site {label}: scroll to the last row", t["scroll"] * 1e3, "ms", note="two frames: rows in view re-drawn"),
        make_row("report", f"report site {label}: open a class", t["open"] * 1e3, "ms", note="detail script, 3 grids and the neighbour pairs loaded"),
    ]  # fmt: skip


def run(workdir: Path, quick: bool = False) -> list[Row]:
    from playwright.sync_api import sync_playwright

    classes = 100 if quick else 1000
    runs = [(f"{classes:,} classes × (16 + 16)", _compare_run(workdir, classes, 16), classes, True), ("10 classes × (100 + 100)", _compare_run(workdir, 10, 100), 10, False)]
    own = REPO / "data" / "compare-own.zarr"
    if own.exists():
        from extractor.analysis.report import open_compare

        runs.append(("make-compare sample", str(own), int(open_compare(str(own))[0].sizes["label"]), False))
    rows: list[Row] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for label, url, n, goal_size in runs:
                rows += _rows(label, url, workdir, n, browser, goal_size)
        finally:
            browser.close()
    return rows
