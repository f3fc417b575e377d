"""The operators' status page in a real headless Chromium, against the running fabric."""

import io
import shutil
import time

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "apt-get install chromium chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1200,800"):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def test_status_page_shows_the_model_ready_and_recent_job_counts(fabric, alice, browser, tmp_path):
    with alice.trace("The Eiffel Tower is in", remote=True) as tracer:
        alice.lm_head.output.save()
    browser.get(fabric.url + "/")
    # The page redraws its rows every 2 s, so read text and position in one script call.
    read = """const b = document.querySelector(arguments[0]); if (!b) return null;
              const r = b.getBoundingClientRect();
              return {text: b.textContent, x: r.x, y: r.y, w: r.width, h: r.height,
                      ratio: window.devicePixelRatio, page: document.body.textContent};"""
    deadline = time.monotonic() + 20
    badge = None
    while time.monotonic() < deadline:
        found = browser.execute_script(read, 'tr[data-model="tiny-gpt2"] .state')
        jobs = browser.execute_script(read, "#jobs .by-state")
        if found and found["text"] == "ready" and jobs and "completed" in jobs["text"]:
            badge = found
            break
        time.sleep(0.2)
    assert badge is not None, browser.page_source
    assert browser.execute_script(read, 'tr[data-model="not-deployed"] .state')["text"] == "not started"
    # A public page: aggregates only, never a job id or a user.
    assert tracer.job.id[:8] not in badge["page"] and "alice" not in badge["page"]

    # The screenshot itself shows the state: the badge is drawn in the "ready" green.
    page = browser.get_screenshot_as_png()
    (tmp_path / "status.png").write_bytes(page)
    shot = Image.open(io.BytesIO(page)).convert("RGB")
    assert shot.size[0] >= 1000
    k = badge["ratio"]
    box = (
        int(badge["x"] * k),
        int(badge["y"] * k),
        int((badge["x"] + badge["w"]) * k),
        int((badge["y"] + badge["h"]) * k),
    )
    pixels = list(shot.crop(box).getdata())
    green = sum(1 for r, g, b in pixels if g > 100 and r < 60 and b < 90)
    assert pixels and green > len(pixels) * 0.3, f"{green} of {len(pixels)} pixels are green"
