"""Debian's chromium driven by Selenium through chromium-driver (both from apt; .ci/run installs them).

No browser is ever downloaded: the binary and the driver are given by path. Without them the
browser tests skip with the reason, unless EXO_REQUIRE_BROWSER=1 (CI), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("EXO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EXO_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(path)):
            return f"{path} not found: apt-get install -y chromium chromium-driver"
    return None


def require_browser() -> None:
    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get("EXO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"EXO_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], timeout: float, what: str
) -> Any:
    """Poll the page until `condition` is truthy; fail naming `what` and the page's console."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition(driver)
        except WebDriverException:
            result = None
        if result:
            return result
        time.sleep(0.05)
    console = "\n".join(str(entry) for entry in driver.get_log("browser"))
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; console:\n{console}")


def js(driver: webdriver.Chrome, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)  # pyright: ignore[reportUnknownMemberType]
