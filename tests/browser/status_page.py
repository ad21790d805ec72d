"""Drives the status page in headless Chromium (Debian's chromium and chromium-driver) for
tests/tests/status_page.rs: signs in, reads what the page shows, clicks one button, and prints
what it saw as JSON. The Rust test compares it with the API; this script only drives."""

import argparse
import json
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
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


def seen(driver, instance):
    """What the page shows now."""
    value = lambda css: driver.find_element(By.CSS_SELECTOR, css).get_attribute("data-value")
    row = driver.find_elements(By.CSS_SELECTOR, f'tr[data-instance="{instance}"]')
    statuses = {
        tr.get_attribute("data-container"): tr.find_element(By.CSS_SELECTOR, "td.status").text
        for tr in driver.find_elements(By.CSS_SELECTOR, "tr[data-container]")
    }
    return {
        "hourly_price": float(value("#hourly-price")),
        "spent_today": float(value("#spent-today")),
        "instances": int(value("#instance-count")),
        "waiting": int(value("#queue-length")),
        "instance_listed": bool(row),
        "idle_behavior": row[0].find_element(By.CSS_SELECTOR, "td.idle-behavior").text
        if row
        else None,
        "statuses": statuses,
    }


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
            before["chart_lines"] = len(driver.find_elements(By.CSS_SELECTOR, "svg#history polyline"))
            button = driver.find_element(
                By.CSS_SELECTOR, f'tr[data-instance="{args.drain}"] button[data-action="drain"]'
            )
            button.click()
            # The post answers with a redirect to the page, which shows the new behaviour.
            wait.until(
                lambda d: seen(d, args.drain)["idle_behavior"] in ("drain", None)
            )
            after = seen(driver, args.drain)
        finally:
            driver.quit()
    json.dump({"before": before, "after": after}, sys.stdout)


if __name__ == "__main__":
    main()
