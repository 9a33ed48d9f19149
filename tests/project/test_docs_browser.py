"""The built manual in a real headless browser (Debian's chromium + chromium-driver), opened from
file:// as a reader without a network would: pages render with their navigation, search finds a
page, and nothing is requested from another host. The home page, a guide and the configuration
reference are photographed (PHITUNE_SCREENSHOTS=docs/images writes the manual's pictures)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, headless_chromium

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium("--allow-file-access-from-files", logs={"performance": "ALL"}, height=900)
    yield driver
    driver.quit()


def requested(driver) -> list[str]:
    """Every URL the page asked the network stack for since the last call."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_manual_reads_offline_and_searches(site, browser):
    shots = Path(os.environ.get("PHITUNE_SCREENSHOTS") or site / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    pages = {
        "index.html": ("phitune", "site-home.png"),
        "guides/export.html": ("Export: merged models, ONNX Runtime", "site-guide.png"),
        "reference/config.html": ("Configuration", "site-config-reference.png"),
    }
    seen: list[str] = []
    for page, (title, picture) in pages.items():
        browser.get((site / page).as_uri())
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "nav.md-nav"))
        assert browser.find_element(By.CSS_SELECTOR, "article h1").text.startswith(title)
        if page.startswith("reference/"):  # the generated table, not the prose above it
            browser.execute_script("document.querySelector('article table').scrollIntoView()")
            time.sleep(0.6)  # the header's title swap on scroll is animated
        browser.save_screenshot(str(shots / picture))
        seen += requested(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "table code"), "the configuration table is on the page"
    # Search, from file:// (the offline plugin's inlined index and the vendored iframe-worker shim).
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys("tenant")
    box.send_keys(Keys.SHIFT)  # a keystroke after typing, as a reader's would be
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")]
    assert any("job-options" in (href or "") for href in links), links
    seen += requested(browser)
    assert seen and all(url.startswith(("file://", "data:", "blob:")) for url in seen), [
        u for u in seen if not u.startswith(("file://", "data:", "blob:"))
    ]
