"""A headless Chromium for the console's browser tests: the system's ``chromium`` + ``chromedriver``
(Debian's packages; ``make browser`` installs them), driven by Selenium, plus keyboard helpers.

Outside CI a machine without Chromium skips the browser tests and says why; with ``CI=true`` a
missing browser is a failure, so CI can never pass them by skipping. Screenshots go to
:data:`ARTIFACTS` (``$RAYDB_TEST_ARTIFACTS/console``, default ``test-artifacts/console`` in the
repository), which the test session names at its end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RAYDB_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--force-device-scale-factor=1", "--hide-scrollbars"]


def find_browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths; skips (fails under ``CI=true``) when either is missing."""
    browser = os.environ.get("RAYDB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("RAYDB_CHROMEDRIVER") or shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    why = ("no Chromium + chromedriver + selenium found (install them with `make browser`, or point "
           "RAYDB_CHROMIUM / RAYDB_CHROMEDRIVER at them)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: the browser tests must run, but {why}")
    pytest.skip(why)


@contextmanager
def chromium(width: int = 1280, height: int = 900, downloads: Path | None = None) -> Iterator[object]:
    """A fresh headless Chromium session (own profile, no network beyond what the page asks)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    profile = tempfile.mkdtemp(prefix="raydb-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    # performance: the Network events, so a test can read what the API answered (response_bodies)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str) -> Path:
    """The whole page (not just the viewport) as ``ARTIFACTS/<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    saved = driver.get_window_size()
    driver.set_window_size(max(width, saved["width"]), max(height + 120, saved["height"]))
    path = ARTIFACTS / f"{name}.png"
    try:
        driver.find_element("tag name", "body").screenshot(str(path))
    finally:
        driver.set_window_size(saved["width"], saved["height"])
    return path


def active(driver) -> dict:
    """What has the keyboard focus: ``{id, tag, type, name}`` (``name``: its accessible label)."""
    return driver.execute_script(DESCRIBE_ACTIVE)


DESCRIBE_ACTIVE = """
const el = document.activeElement;
const labelled = el.getAttribute('aria-labelledby');
const name = el.getAttribute('aria-label')
  || (el.labels && el.labels.length ? Array.from(el.labels).map((l) => l.textContent).join(' ') : '')
  || (labelled ? labelled.split(' ').map((i) => document.getElementById(i)?.textContent || '').join(' ') : '')
  || (['BUTTON', 'A'].includes(el.tagName) ? el.textContent : '');
return {id: el.id, tag: el.tagName.toLowerCase(), type: el.getAttribute('type') || '', name: name.trim()};
"""


def press(driver, *keys: str) -> None:
    """Keys as the keyboard sends them, to whatever has the focus."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def retype(driver, text: str) -> None:
    """Ctrl+A, then ``text``: replace the focused field's content as a person would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(text).perform()


def tab_to(driver, wanted, limit: int = 40, backwards: bool = False) -> list[dict]:
    """Press Tab (Shift+Tab) until ``wanted(active(driver))`` holds; the focus stops visited on the way.
    Fails when it is not reached in ``limit`` presses (unreachable by keyboard)."""
    from selenium.webdriver.common.keys import Keys

    seen = []
    for _ in range(limit):
        if backwards:
            press(driver, Keys.SHIFT, Keys.TAB, Keys.SHIFT)
        else:
            press(driver, Keys.TAB)
        now = active(driver)
        seen.append(now)
        if wanted(now):
            return seen
    raise AssertionError(f"not reachable with {'Shift+' if backwards else ''}Tab: {seen}")


class NetworkLog:
    """What the server sent the page, read from the browser itself (DevTools' Network domain, through
    chromedriver's performance log, which each read drains — so this keeps what it has seen).

    A response the page read with ``.json()`` / ``.text()`` keeps its body; one read with ``.blob()``
    does not, but the image an ``<img>`` then loads from that blob's ``blob:`` URL does.
    """

    def __init__(self, driver) -> None:
        self.driver = driver
        self.seen: list[tuple[str, str]] = []  # (url, request id), oldest first

    def bodies(self, url_pattern: str) -> list[tuple[str, bytes]]:
        """``(url, body)`` of every response so far whose URL matches the regex, oldest first."""
        import base64
        import json
        import re

        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.responseReceived":
                self.seen.append((message["params"]["response"]["url"], message["params"]["requestId"]))
        out = []
        for url, request_id in self.seen:
            if re.search(url_pattern, url):
                body = self.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})
                data = body["body"]
                out.append((url, base64.b64decode(data) if body["base64Encoded"] else data.encode()))
        return out

    def image(self, img) -> bytes:
        """The bytes an ``<img>`` element loaded (its ``src``; the console's are ``blob:`` URLs)."""
        import re

        src = img.get_attribute("src")
        [(_, data)] = self.bodies("^" + re.escape(src) + "$")
        return data


def image_pixels(driver, img) -> dict:
    """An ``<img>`` element as the page decoded it: ``{width, height, rgba}`` (``rgba``: bytes, from a
    canvas), or ``{error}`` when it did not decode."""
    found = driver.execute_async_script(PIXELS, img)
    if "rgba" in found:
        found["rgba"] = bytes(found["rgba"])
    return found


PIXELS = """
const [img, done] = [arguments[0], arguments[arguments.length - 1]];
img.decode().then(() => {
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  done({width: img.naturalWidth, height: img.naturalHeight,
        rgba: Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)});
}).catch((err) => done({error: String(err)}));
"""


def csp_violations(driver) -> list[str]:
    """Browser console messages about the Content-Security-Policy or uncaught script errors."""
    out = []
    for entry in driver.get_log("browser"):
        text = entry.get("message", "")
        if "Content Security Policy" in text or "Uncaught" in text:
            out.append(text)
    return out
