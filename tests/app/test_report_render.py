"""The HTML report renders in a real browser (headless Chromium): every embedded image loads.

Skipped, with the reason, where Chromium, chromedriver or selenium are missing (the Makefile installs them
when it can: Debian packages chromium and chromium-driver, PyPI selenium)."""

import shutil

import numpy as np
import pytest

from linadapt.app import report

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium / chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_images_load_in_headless_chromium(tmp_path):
    rng = np.random.default_rng(0)
    x = np.linspace(-3, 3, 50)
    band = report.regression_band_figure(x, np.sin(x), 0.1 + 0 * x, x[::10], np.sin(x[::10]), {"truth": np.sin(x)})
    proba = rng.dirichlet(np.ones(3), size=200)
    labels = rng.integers(0, 3, 200)
    sections = [
        ("A table", report.table_html(["method", "score"], [["a", 0.5], ["b", 1.25]])),
        ("Bands", report.figure_html(band, "bands")),
        ("Calibration", report.figure_html(report.reliability_figure({"p": proba}, labels), "reliability")),
    ]
    path = tmp_path / "report.html"
    report.write_report(str(path), "render check", sections)
    browser = _browser()
    try:
        browser.get(path.as_uri())
        assert browser.title == "render check"
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 2
        for complete, width, height in images:
            assert complete and width > 300 and height > 200
        assert browser.execute_script("return document.querySelectorAll('table tr').length") == 3
    finally:
        browser.quit()
