"""Open a Snakemake report in headless Chromium (Debian's chromium + chromium-driver) with
selenium, the way a user looks at it: click each category, each item's "eye" button, and
read what the page shows. Used by tests/test_workflow.py on the demo DAG's report."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@contextlib.contextmanager
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scprint-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, timeout: float = 20.0):
    """Poll a JavaScript expression until it is truthy (the report renders with React)."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {script}")
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def click_link(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//nav//a[normalize-space()={text!r}]").click()


def show_item(driver, category: str, label: str):
    """Go to ``category`` from the start page and press the eye button of ``label``."""
    from selenium.webdriver.common.by import By

    home = driver.find_elements(By.XPATH, "//nav//a[normalize-space()='Results']")
    if home:
        home[0].click()
    click_link(driver, category)
    row = driver.find_element(By.XPATH, f"//tr[td[normalize-space()={label!r}]]")
    row.find_element(By.CSS_SELECTOR, "a[iconname=eye]").click()


def shown_images(driver) -> list[dict]:
    """Images of the main panel (not the navigation), once they have loaded."""
    wait_for(driver, "Array.from(document.images).every(i => i.complete)")
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !i.closest('nav'))"
        ".map(i => ({src: i.src.slice(0, 60), width: i.naturalWidth}))"
    )


def iframe_table(driver, table_id: str) -> list[dict[str, str]]:
    """The rows of table ``table_id`` in the shown HTML item, header -> cell text."""
    from selenium.webdriver.common.by import By

    frame = driver.find_element(By.TAG_NAME, "iframe")
    driver.switch_to.frame(frame)
    try:
        return driver.execute_script(
            f"const t = document.getElementById({table_id!r});"
            "const head = Array.from(t.tHead.rows[0].cells).map(c => c.textContent.trim());"
            "return Array.from(t.tBodies[0].rows).map(r => Object.fromEntries("
            "Array.from(r.cells).map((c, i) => [head[i], c.textContent.trim()])));"
        )
    finally:
        driver.switch_to.default_content()


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def remote_resources(driver) -> list[str]:
    """Everything the page fetched from outside the file (it must need no network)."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [u for u in urls if not u.startswith(("data:", "file:", "blob:"))]
