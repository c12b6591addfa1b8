"""Debian's Chromium, headless, driven by Selenium through Debian's chromedriver."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium (``make test`` installs it: scripts/ensure-system-deps.sh)."""
    chromedriver = shutil.which("chromedriver")
    assert chromedriver, "chromedriver is missing: scripts/ensure-system-deps.sh --browser"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # The driver is named explicitly: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_log_in(driver: WebDriver, url: str, token: str, who: str) -> None:
    """Open the approvals console at ``url`` and log in with ``token``."""
    driver.get(url)
    wait = WebDriverWait(driver, 10)
    wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))
    assert who in driver.find_element(By.ID, "who").text
