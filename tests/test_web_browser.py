"""A real headless Chromium on the live page: a low-score series appears without a reload."""

from __future__ import annotations

import pytest
from conftest import send_datasets
from dicom_factory import classic_series, phantom
from headless_browser import CHROMIUM, Browser

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")


@pytest.fixture
def browser(tmp_path):
    chromium = Browser(tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def test_live_page_shows_a_low_score_series_without_a_reload(daemon_factory, browser):
    # threshold 1.0: every scored series is "low", whatever the model says
    daemon = daemon_factory(http={"enabled": True, "port": 0}, alerts={"threshold": 1.0})
    browser.open(daemon.web.url + "/")
    assert browser.wait_for("document.getElementById('live').textContent === 'live'", 30), "no event stream"
    assert browser.evaluate("document.querySelectorAll('#results tbody tr').length") == 0

    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)

    banner = browser.wait_for("document.querySelector('#alerts .banner')?.textContent", 60)
    assert banner is not None and "Low score" in banner
    assert "T1 MPRAGE SAG" in banner and "MR_TEST_1" in banner
    link = browser.evaluate("document.querySelector('#alerts .banner a').getAttribute('href')")
    assert link == f"/series/{uid}"
    row = browser.evaluate("document.querySelector('#results tbody tr.alert')?.textContent")
    assert row is not None and "scored" in row
