"""`imzarr report`: the static site in a real browser (Debian's chromium through Playwright), from file:// and
from a static HTTP server: clean console, no failed or off-host requests, images that load, the table (one row
per class, sorting, filtering), a class's grids and nearest neighbours against a brute-force reference, numbers
equal to the compare store's, and the untrained banner. Screenshots go to the pytest temporary folder
(`report-screenshots*`, path printed)."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from extractor.analysis.report import ReportSiteError, format_number, write_report_site
from schemas.classes import class_table
from schemas.image_store import validate_image_store
from schemas.output_paths import OutputOverlapsInputError, OutputPathError
from tests.support.commands import run_imzarr
from tests.support.store_edits import copy_with_group_attrs
from tests.support.synthetic import image_features, write_compare_run

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NUM_CLASSES, PER_CLASS, SHOWN = 5, 20, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small compare run (untrained model) with its report site, and a second site of the same run as if trained."""
    root = tmp_path_factory.mktemp("report")
    urls = write_compare_run(root, NUM_CLASSES, PER_CLASS, trained=False, copies=1)
    write_report_site(urls["compare"], str(root / "site"))
    trained = xr.open_zarr(urls["compare"]).load()
    trained.attrs |= {"trained": True, "model": "preset synthetic, sha256 5e5e5e5e5e5e, trained"}
    write_report_site(trained, str(root / "site-trained"))
    return {**urls, "site": root / "site", "site_trained": root / "site-trained", "shots": tmp_path_factory.mktemp("report-screenshots")}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def http_root(run):
    """A static HTTP server on 127.0.0.1 over the site's folder."""
    handler = functools.partial(_QuietHandler, directory=str(run["site"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Watched:
    """A page with every console message, page error and request recorded."""

    def __init__(self, browser, allowed_prefix: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.allowed_prefix = allowed_prefix
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def open(self, url: str):
        self.page.goto(url)
        self.page.wait_for_function("window.imzarrReady !== undefined")
        return self.page

    def check_clean(self):
        assert self.errors == [] and self.failed == []
        off_host = [u for u in self.requests if not (u.startswith(self.allowed_prefix) or u.startswith("data:"))]
        assert off_host == [], off_host

    def close(self):
        self.page.close()


def file_url(site: Path) -> str:
    return site.resolve().as_uri() + "/index.html"


def visible_images_loaded(page) -> tuple[int, list[str]]:
    """How many visible <img> there are, and the sources of those that did not load."""
    return page.evaluate(
        """() => { const imgs = [...document.images].filter(i => i.offsetParent !== null);
                   return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)]; }"""
    )


def open_class(page, label: int):
    page.click(f"#class-table tbody tr[data-label='{label}']")
    page.wait_for_selector(".pairs .pair")
    page.wait_for_function("[...document.images].every(i => i.complete)")


@pytest.mark.parametrize("how", ["file", "http"])
def test_page_is_clean_complete_and_offline(run, browser, http_root, how):
    url, prefix = (file_url(run["site"]), run["site"].resolve().as_uri()) if how == "file" else (http_root + "index.html", http_root)
    w = Watched(browser, prefix)
    page = w.open(url)
    assert page.locator("#class-table tbody tr[data-label]").count() == NUM_CLASSES
    open_class(page, 2)
    count, broken = visible_images_loaded(page)
    assert count == 2 + 2 * SHOWN and broken == []  # two grids, plus a generated/real crop pair per generated sample
    page.screenshot(path=str(run["shots"] / f"class-{how}.png"), full_page=True)
    print(f"screenshots: {run['shots']}")
    w.check_clean()
    w.close()


def test_numbers_equal_the_compare_store(run, browser):
    ds = xr.open_zarr(run["compare"]).load()
    w = Watched(browser, run["site"].resolve().as_uri())
    page = w.open(file_url(run["site"]))
    shown = {el.get_attribute("data-key"): (el.get_attribute("data-value"), el.inner_text()) for el in page.query_selector_all("#overall [data-key]")}
    for key in ("fd", "precision", "recall", "density", "coverage"):
        value, text = shown[key]
        assert float(value) == ds.attrs[key] and text == format_number(ds.attrs[key])
    assert [int(shown[k][0]) for k in ("n_real", "n_fake", "classes")] == [ds.attrs["n_real"], ds.attrs["n_fake"], NUM_CLASSES]
    keys = page.eval_on_selector_all("#class-table thead th", "ths => ths.map(t => t.dataset.key)")
    rows = page.eval_on_selector_all("#class-table tbody tr[data-label]", "trs => trs.map(tr => [...tr.cells].map(c => [c.dataset.value ?? null, c.textContent]))")
    for i, row in enumerate(rows):
        for key, (value, text) in zip(keys, row):
            expected = ds[key].values[i]
            if isinstance(expected, (float, np.floating)):
                assert (math.isnan(expected) and value == "NaN") or float(value) == expected, (key, i)
                assert text == format_number(None if math.isnan(expected) else float(expected)), (key, i)  # as the page's JS shows it
            elif isinstance(expected, (int, np.integer)):
                assert int(value) == expected and text == format_number(int(expected)), (key, i)
            else:
                assert text == str(expected), (key, i)
    assert set(keys) >= {"label", "synset", "class_name", "n_real", "n_fake", "fd", "precision", "recall", "density", "coverage", "note"}
    w.check_clean()
    w.close()


def test_sorting_by_fd_puts_the_largest_first_and_the_filter_finds_a_class(run, browser):
    ds = xr.open_zarr(run["compare"]).load()
    w = Watched(browser, run["site"].resolve().as_uri())
    page = w.open(file_url(run["site"]))
    page.click("#class-table th[data-key='fd']")
    labels = [int(x) for x in page.eval_on_selector_all("#class-table tbody tr[data-label]", "trs => trs.map(t => t.dataset.label)")]
    fd = dict(zip(ds["label"].values.tolist(), ds["fd"].values.tolist()))
    assert labels == sorted(fd, key=lambda c: -fd[c])
    page.click("#class-table th[data-key='fd']")  # a second click reverses
    assert int(page.eval_on_selector("#class-table tbody tr[data-label]", "t => t.dataset.label")) == min(fd, key=fd.get)
    name, wnid = str(ds["class_name"].values[3]), str(ds["synset"].values[3])
    for query in (name.split(",")[0].upper(), wnid):
        page.fill("#filter", query)
        page.wait_for_function(f"document.getElementById('shown').textContent.startsWith('1 of')")
        visible = page.eval_on_selector_all("#class-table tbody tr[data-label]", "trs => trs.map(t => t.dataset.label)")
        assert visible == [str(ds["label"].values[3])]
    page.fill("#filter", "")
    page.wait_for_function(f"document.getElementById('shown').textContent.startsWith('{NUM_CLASSES} of')")
    w.check_clean()
    w.close()


def test_a_class_shows_its_grids_and_each_generated_samples_nearest_real_one(run, browser):
    label = 1
    w = Watched(browser, run["site"].resolve().as_uri())
    page = w.open(file_url(run["site"]) + f"#class={label}")  # a link opens the class directly
    page.wait_for_selector(".pairs .pair")
    page.wait_for_function("[...document.images].every(i => i.complete)")
    assert page.inner_text("#detail figure.real figcaption") == f"real: {SHOWN} of {PER_CLASS}"
    assert page.inner_text("#detail figure.fake figcaption") == f"generated: {SHOWN} of {PER_CLASS}"
    assert page.locator("#detail .class-plot svg > circle.real").count() == PER_CLASS  # the legend's sits in a <g>
    shown = sorted(float(x) for x in page.eval_on_selector_all(".pairs .dist", "els => els.map(e => e.dataset.value)"))
    # Reference: brute force over the class's real features, from the image stores themselves.
    real, fake = validate_image_store(run["real_images"]), validate_image_store(run["fake_images"])
    r_lab, f_lab = np.asarray(real.coordinate("label")), np.asarray(fake.coordinate("label"))
    r_idx, f_idx = np.flatnonzero(r_lab == label), np.flatnonzero(f_lab == label)[:SHOWN]
    x_r, x_f = image_features(real.take(r_idx)), image_features(fake.take(f_idx))
    d = np.sqrt(((x_f[:, None, :].astype(np.float64) - x_r[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(shown, np.sort(d.min(axis=1)), rtol=1e-5, atol=1e-6)
    detail = _class_detail(run["site"], label)
    assert detail["near"]["sample"] == r_idx[d.argmin(axis=1)].tolist()
    copied = int(np.flatnonzero(np.asarray(detail["fake"]["sample"]) == f_idx[0])[0])  # write_compare_run copies a real image here
    assert detail["near"]["distance"][copied] == pytest.approx(0, abs=1e-6) and page.locator(".pair.close").count() >= 1
    count, broken = visible_images_loaded(page)
    assert count == 2 + 2 * SHOWN and broken == []
    page.screenshot(path=str(run["shots"] / "class-link.png"), full_page=True)
    page.evaluate("location.hash = '#class=3'")  # an edited address opens that class in the open page
    page.wait_for_function("document.querySelector('#class-table tbody tr.selected')?.dataset.label === '3'")
    page.wait_for_function("document.querySelector('#detail h2 small')?.textContent.endsWith('label 3')")
    assert page.url.endswith("#class=3")
    w.check_clean()
    w.close()


def test_banner_exactly_when_untrained(run, browser):
    for site, untrained in ((run["site"], True), (run["site_trained"], False)):
        w = Watched(browser, site.resolve().as_uri())
        page = w.open(file_url(site))
        assert page.locator("#untrained-banner").count() == int(untrained)
        if untrained:
            assert "UNTRAINED" in page.inner_text("#untrained-banner") and page.is_visible("#untrained-banner")
        page.screenshot(path=str(run["shots"] / f"top-{'untrained' if untrained else 'trained'}.png"))
        w.check_clean()
        w.close()


def test_the_table_draws_only_rows_in_view_and_reaches_every_class(browser, tmp_path_factory):
    """60 classes in a 720-pixel table: the DOM holds the rows in view; scrolling reaches the last class in order."""
    root = tmp_path_factory.mktemp("report-many")
    urls = write_compare_run(root, 60, 2)
    write_report_site(urls["compare"], str(root / "site"), per_class=1)
    w = Watched(browser, (root / "site").resolve().as_uri())
    page = w.open(file_url(root / "site"))
    assert page.inner_text("#shown") == "60 of 60 classes"
    drawn = lambda: [int(x) for x in page.eval_on_selector_all("#class-table tbody tr[data-label]", "ts => ts.map(t => t.dataset.label)")]  # noqa: E731
    assert drawn()[0] == 0 and len(drawn()) < 60
    page.click("#class-table th[data-key='label']")  # numbers: largest first
    assert drawn()[0] == 59
    page.eval_on_selector(".table-wrap", "w => { w.scrollTop = w.scrollHeight; }")
    page.wait_for_function("[...document.querySelectorAll('#class-table tr[data-label]')].pop().dataset.label === '0'")
    page.click("#class-table tbody tr[data-label='0']")
    page.wait_for_selector(".pairs .pair")
    assert page.inner_text("#detail h2").startswith("tench")
    page.fill("#filter", "n015")
    page.wait_for_function("document.getElementById('shown').textContent !== '60 of 60 classes'")
    expected = [c for c, wnid in enumerate(class_table().synsets_of(np.arange(60))) if str(wnid).startswith("n015")]
    assert sorted(drawn()) == expected and page.inner_text("#shown") == f"{len(expected)} of 60 classes"
    w.check_clean()
    w.close()


def _class_detail(site: Path, label: int) -> dict:
    text = (site / "classes" / f"c{label:04d}.js").read_text()
    return json.loads(text[text.index(",") + 1 : text.rindex(")")])


def _run_data(site: Path) -> dict:
    text = (site / "data" / "run.js").read_text()
    return json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))


# ---------------------------------------------------------------- without a browser


def test_older_class_dimension_and_new_metrics_appear_without_code_changes(run, tmp_path):
    ds = xr.open_zarr(run["compare"]).load().rename({"label": "class"})  # reports written before were on `class`
    ds["kid"] = ("class", np.arange(NUM_CLASSES, dtype=np.float64) / 10, {"long_name": "kernel inception distance"})
    ds.attrs["kid"] = 0.25
    write_report_site(ds, str(tmp_path / "site"))
    data = _run_data(tmp_path / "site")
    assert "kid" in [c["key"] for c in data["columns"]] and data["values"]["kid"] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert {m["key"]: m["value"] for m in data["overall"]}["kid"] == 0.25
    assert data["values"]["label"] == list(range(NUM_CLASSES)) and len(data["means"]["label"]) == NUM_CLASSES


def test_runs_on_threads_beside_a_client(run, tmp_path):
    """A notebook's default dask.distributed Client does not get the site's reads (its workers lack this process's
    credentials and memory:// stores): every writer runs locally on threads."""
    from distributed import Client, get_task_stream

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client, get_task_stream(client) as tasks:
        write_report_site(run["compare"], str(tmp_path / "site"), per_class=1)
    assert tasks.data == [] and (tmp_path / "site" / "index.html").exists()


def test_missing_inputs_are_named(run, tmp_path):
    ds = xr.open_zarr(run["compare"]).load()
    with pytest.raises(ReportSiteError, match=r"nowhere/acts\.zarr: real activation store not found"):
        write_report_site(ds.assign_attrs(real_store=str(tmp_path / "nowhere" / "acts.zarr")), str(tmp_path / "a"))
    with pytest.raises(ReportSiteError, match=r"^data/acts\.zarr: real activation store not found \(named by the compare report the compare result; a path relative to the folder it was made from, not found from .*: run from that folder\)"):
        write_report_site(ds.assign_attrs(real_store="data/acts.zarr"), str(tmp_path / "a"))
    with pytest.raises(ReportSiteError, match="compare report not found"):
        write_report_site(str(tmp_path / "missing.zarr"), str(tmp_path / "b"))
    source = zarr.open_group(run["fake_acts"], mode="r").attrs["source"]
    moved = copy_with_group_attrs(run["fake_acts"], tmp_path / "fake_acts.zarr", {"source": {**source, "url": str(tmp_path / "gone_images.zarr")}})
    with pytest.raises(ReportSiteError, match=r"gone_images\.zarr: generated image store not found \(the source of activation store"):
        write_report_site(ds.assign_attrs(fake_store=str(moved)), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_inputs_rewritten_since_the_compare_are_refused(run, tmp_path):
    """The report shows the stores the comparison was made from, or nothing: an activation store rewritten since
    (another generation), or an image store that is not the one the activations were computed from."""
    ds = xr.open_zarr(run["compare"]).load()
    assert ds.attrs["real_store_generation"] == zarr.open_group(run["real_acts"], mode="r").attrs["generation"]
    with pytest.raises(ReportSiteError, match=r"real_acts?\.zarr: rewritten \(another generation\) since the compare result was made from it: re-run compare, then report$"):
        write_report_site(ds.assign_attrs(real_store_generation="0" * 32), str(tmp_path / "a"))
    source = zarr.open_group(run["fake_acts"], mode="r").attrs["source"]
    moved = copy_with_group_attrs(run["fake_acts"], tmp_path / "fake_acts.zarr", {"source": {**source, "fingerprint": "f" * 64}})
    with pytest.raises(ReportSiteError, match=r": not the image store activation store .*fake_acts\.zarr was computed from \(its settings fingerprint differs from the recorded one\)"):
        write_report_site(ds.assign_attrs(fake_store=str(moved)), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_output_rules(run, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(ReportSiteError, match="is not an imzarr report site"):
        write_report_site(run["compare"], str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    with pytest.raises(OutputOverlapsInputError, match="lies inside the input"):
        write_report_site(run["compare"], str(Path(run["real_acts"]) / "site"))
    with pytest.raises(OutputPathError, match="lies inside the Zarr store"):  # any store: the image stores too
        write_report_site(run["compare"], str(Path(run["real_images"]) / "site"))
    write_report_site(run["compare"], str(tmp_path / "site"), per_class=4)
    (tmp_path / "site" / "classes" / "stale.js").write_text("")
    write_report_site(run["compare"], str(tmp_path / "site"), per_class=3)  # an earlier site is replaced
    assert not (tmp_path / "site" / "classes" / "stale.js").exists()
    assert len(_class_detail(tmp_path / "site", 0)["fake"]["sample"]) == 3


def test_cli_report_and_compare_report(run, tmp_path):
    missing = run_imzarr("report", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.zarr: compare report not found" in missing.stderr
    made = run_imzarr("compare", run["real_acts"], run["fake_acts"], "--layer", "feat", "-k", "3", "--report", str(tmp_path / "site"), "--per-class-thumbnails", "4")
    assert made.returncode == 0 and f"open {tmp_path / 'site' / 'index.html'}" in made.stdout, made.stderr
    assert _run_data(tmp_path / "site")["values"]["fd"] == [float(v) for v in xr.open_zarr(run["compare"])["fd"].values]
    assert len(_class_detail(tmp_path / "site", 0)["fake"]["sample"]) == 4


def test_site_on_object_storage(run, s3, monkeypatch):
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3.storage_options))
    result = write_report_site(run["compare"], s3.url("site"))
    fs = fsspec.filesystem("s3", **s3.storage_options)
    remote = sorted(p.split("/site/", 1)[1] for p in fs.find(f"{s3.bucket}/site"))
    local = sorted(str(p.relative_to(run["site"])) for p in run["site"].rglob("*") if p.is_file())
    assert remote == local and result.files == len(local)
    assert fs.cat_file(f"{s3.bucket}/site/classes/c0001-real.jpg") == (run["site"] / "classes" / "c0001-real.jpg").read_bytes()
    fs.invalidate_cache()  # the listing above cached entries without content types
    types = {name: fs.info(f"{s3.bucket}/site/{name}")["ContentType"] for name in ("index.html", "assets/report.js", "classes/c0001-real.jpg")}
    assert types["index.html"] == "text/html" and types["classes/c0001-real.jpg"] == "image/jpeg"  # a static bucket serves these
    assert types["assets/report.js"] in ("text/javascript", "application/javascript")  # by Python version and /etc/mime.types


def test_thumbnails_without_a_site_are_refused_by_the_library_and_the_cli(run, tmp_path, capsys):
    from extractor.analysis.report import claim_site_output
    from schemas.cli.dispatch import main

    with pytest.raises(ReportSiteError, match=r"^--per-class-thumbnails needs --report") as raised:
        claim_site_output(None, [run["real_acts"]], per_class=4)
    code = main(["compare", run["real_acts"], run["fake_acts"], "--layer", "feat", "--per-class-thumbnails", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"imzarr compare: error: {raised.value}"]
