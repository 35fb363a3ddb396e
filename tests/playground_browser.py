"""Headless Chromium driven by Selenium, for the playground's browser tests.

Finds Debian's Chromium and its chromedriver on PATH (`apt-get install chromium chromium-driver`,
what scripts/setup.sh does as root) or unpacked into .venv/opt/chromium (setup.sh without root),
and FAILS with what to run when neither is there: a browser test that skips would pass on a
machine that never ran it.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNPACKED = ROOT / ".venv" / "opt" / "chromium"
HOW = (
    "the playground's browser tests need headless Chromium and chromedriver: run ./scripts/setup.sh "
    "(as root it runs `apt-get install chromium chromium-driver`; otherwise it unpacks Debian's packages "
    "into .venv/opt/chromium), or set EFT_CHROMIUM and EFT_CHROMEDRIVER"
)


def find_chromium() -> tuple[str, str, dict[str, str]] | None:
    """(browser binary, chromedriver, extra environment), or None."""
    browser = os.environ.get("EFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("EFT_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser and driver:
        return browser, driver, {}
    real = UNPACKED / "usr" / "lib" / "chromium" / "chromium"
    unpacked_driver = UNPACKED / "usr" / "bin" / "chromedriver"
    if real.is_file() and unpacked_driver.is_file():
        libs = [UNPACKED / "usr" / "lib" / "x86_64-linux-gnu", UNPACKED / "lib" / "x86_64-linux-gnu", real.parent]
        path = ":".join(str(p) for p in libs if p.is_dir())
        current = os.environ.get("LD_LIBRARY_PATH")
        return str(real), str(unpacked_driver), {"LD_LIBRARY_PATH": f"{path}:{current}" if current else path}
    return None


def start_chrome(profile_dir: Path, width: int = 1500, height: int = 1000) -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `.venv/bin/python -m pip install -e '.[dev]'`; " + HOW)
    found = find_chromium()
    if found is None:
        pytest.fail(HOW)
    browser, driver, env = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # offline machine: no update or safe-browsing calls
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=driver, env={**os.environ, **env})
    return webdriver.Chrome(options=options, service=service)


def wait_for(what: Callable[[], Any], timeout_s: float = 60.0, message: str = "") -> Any:
    """Poll `what` until it returns something truthy (its value), failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = what()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {message or what}; last value: {last!r}")


# Records, at every change of the columns, each running pane's token count and text: what was on
# screen while the stream was still open.
WATCH_STREAMING = """
window.seenWhileRunning = [];
new MutationObserver(() => {
  for (const p of document.querySelectorAll('#columns .pane.running')) {
    window.seenWhileRunning.push([p.dataset.recipe, p.querySelectorAll('.tok').length, p.querySelector('.out').textContent]);
  }
}).observe(document.getElementById('columns'), {childList: true, subtree: true, characterData: true});
"""

# The hover card's tables: title -> [(text as shown, logprob as shown)].
READ_TIP = """
return Object.fromEntries([...document.querySelectorAll('#tip .alts')].map((box) => [
  box.querySelector('.alts-title').textContent,
  [...box.querySelectorAll('tr')].map((tr) => [tr.children[0].textContent, tr.children[1].textContent]),
]));
"""

# The API's requests the page made so far (the Resource Timing entries of this origin's routes).
API_CALLS = "return performance.getEntriesByType('resource').map((e) => e.name).filter((n) => n.includes('/v1/'));"


def shown(text: str, lp: float) -> list[str]:
    """A row as the page's inspector prints it (tokens.js: visible() and fmt())."""
    visible = text.replace(" ", "\u2423").replace("\n", "\u23ce")
    return [visible, f"{lp:.2f} ({100 * math.exp(lp):.1f}%)" if lp > -9999 else "\u2014"]


def hover_tables(d, css: str) -> dict:
    """Hover the first token matching `css` and read the card's tables, then move off it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    span = d.find_element(By.CSS_SELECTOR, css)
    ActionChains(d).move_to_element(span).perform()
    wait_for(lambda: d.find_element(By.ID, "tip").is_displayed(), 10, "the hover card")
    tables = d.execute_script(READ_TIP)
    ActionChains(d).move_by_offset(0, 400).perform()  # off the token: the card goes
    return tables
