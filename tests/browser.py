"""A real browser for the dashboard's tests: Debian's headless Chromium (`chromium`), driven by
Selenium through Debian's chromedriver (`chromium-driver`), so nothing is downloaded.

Without them a test is skipped, saying what to install; in CI (CI=true) it fails instead,
because .ci/run installs them. Screenshots go to var/test-output/dashboard/ in the repository
(ignored by git), at a laptop's and a phone's size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.process import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO_ROOT / "var" / "test-output" / "dashboard"
LAPTOP = (1366, 900)
PHONE = (390, 844)
# Long enough for a loaded test machine; every wait ends as soon as its condition holds.
WAIT_SECONDS = 20.0
# As root, in a container: no sandbox, no GPU; nothing reached beyond the daemon under test.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def missing_browser() -> str | None:
    """What is missing to run the browser tests, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: apt-get install {package}"
    return None


class Browser:
    """One Chromium window on the dashboard, with the waits the tests need."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)

    def log_in(self, base_url: str, token: str) -> None:
        self.open(f"{base_url}/ui/")
        field = self.wait_for("#token")
        field.send_keys(token)
        self.find("form.login button[type=submit]").click()
        self.wait_until(lambda: self.find("#logout").is_displayed(), "logged in")

    def go(self, fragment: str) -> None:
        """Another page of the dashboard, as a click on a link would (no reload)."""
        self.driver.execute_script("location.hash = arguments[0]", fragment)

    def find(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Click the element `css` finds, found again if the page redrew it meanwhile (a live
        update replaces what it shows)."""

        def clicked() -> bool:
            self.find(css).click()
            return True

        self.wait_until(clicked, f"{css} to click")

    def text(self, css: str) -> str:
        return self.find(css).text

    def wait_until(self, condition: Callable[[], Any], what: str) -> Any:
        def check(_driver: Any) -> Any:
            try:
                return condition()
            except (NoSuchElementException, StaleElementReferenceException):
                return False

        wait = WebDriverWait(self.driver, WAIT_SECONDS, poll_frequency=0.1)
        return wait.until(check, f"the page never showed {what}:\n{self.page_text()}")

    def wait_for(self, css: str, text: str | None = None) -> Any:
        def found() -> Any:
            element = self.find(css)
            return element if text is None or text in element.text else None

        return self.wait_until(found, f"{css}" + (f" with {text!r}" if text else ""))

    def page_text(self) -> str:
        try:
            return self.text("body")[:2000]
        except Exception as exc:  # the page itself may be what is broken
            return f"(no page text: {exc})"

    def script(self, source: str, *args: Any) -> Any:
        return self.driver.execute_script(source, *args)

    def screenshot(self, name: str, size: tuple[int, int]) -> Path:
        """Save the page at `size` as <name>.png in SCREENSHOTS; the path."""
        self.driver.set_window_size(*size)
        # From the top of the page, laid out at the new size.
        self.script(
            "window.scrollTo(0, 0);"
            "return new Promise((done) => requestAnimationFrame(() => done()))"
        )
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def script_errors(self) -> list[str]:
        """Errors the page's scripts raised, from the browser's console."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") == "javascript"
        ]


def browser_session() -> Iterator[Browser]:
    """The body of a pytest fixture: a fresh browser profile for each test."""
    missing = missing_browser()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the browser tests, but {missing}")
        pytest.skip(missing)
    profile = tempfile.mkdtemp(prefix="jobwarden-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_window_size(*LAPTOP)
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
