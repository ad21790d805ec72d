"""Drives the status page in headless Chromium (Debian's chromium and chromium-driver) for
tests/tests/status_page.rs: signs in, reads what the page shows, clicks one button, and prints
what it saw as JSON. The Rust test compares it with the API; this script only drives."""

import argparse
import json
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import (
    JavascriptException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def browser(user_data_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # Without the background-networking flags Chromium keeps dialling Google's hosts, which a
    # machine without network refuses.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data_dir}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


# Everything the test compares, read in one script so a reload cannot fall between reads.
READ_PAGE = """
const value = (css) => document.querySelector(css).getAttribute("data-value");
const row = document.querySelector(`tr[data-instance="${arguments[0]}"]`);
const statuses = {};
for (const tr of document.querySelectorAll("tr[data-container]")) {
  statuses[tr.getAttribute("data-container")] = tr.querySelector("td.status").textContent;
}
return {
  hourly_price: parseFloat(value("#hourly-price")),
  spent_today: parseFloat(value("#spent-today")),
  instances: parseInt(value("#instance-count")),
  waiting: parseInt(value("#queue-length")),
  instance_listed: row !== null,
  idle_behavior: row ? row.querySelector("td.idle-behavior").textContent : null,
  chart_lines: document.querySelectorAll("svg#history polyline").length,
  statuses: statuses,
};
"""

# The page reloads itself every few seconds: a read or click that meets a page being replaced
# is tried again.
PAGE_CHANGING = (StaleElementReferenceException, NoSuchElementException, JavascriptException)


def seen(driver, instance):
    """What the page shows now."""
    return WebDriverWait(driver, 30, ignored_exceptions=PAGE_CHANGING).until(
        lambda d: d.execute_script(READ_PAGE, instance)
    )


def click_drain(driver, instance):
    css = f'tr[data-instance="{instance}"] button[data-action="drain"]'

    def click(d):
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    WebDriverWait(driver, 30, ignored_exceptions=PAGE_CHANGING).until(click)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--drain", required=True, help="the instance whose drain to click")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(args.url + "/")
            field = wait.until(ec.presence_of_element_located((By.NAME, "token")))
            field.send_keys(args.token)
            driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
            wait.until(ec.presence_of_element_located((By.ID, "instance-count")))
            before = seen(driver, args.drain)
            click_drain(driver, args.drain)
            # The post answers with a redirect to the page, which shows the new behaviour.
            WebDriverWait(driver, 30, ignored_exceptions=PAGE_CHANGING).until(
                lambda d: d.execute_script(READ_PAGE, args.drain)["idle_behavior"]
                in ("drain", None)
            )
            after = seen(driver, args.drain)
        finally:
            driver.quit()
    json.dump({"before": before, "after": after}, sys.stdout)


if __name__ == "__main__":
    main()
