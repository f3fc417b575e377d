"""The operators' status page in a real headless Chromium, against the running fabric."""

import io
import re
import shutil
import time

import httpx
import pytest
from PIL import Image

from tests.support.jobs import job, quick_job, slow_job, submit, wait_for


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


def _history(fabric, model: str) -> dict:
    found = httpx.get(f"{fabric.url}/status/history.json", timeout=30).json()
    return next(m for m in found["models"] if m["name"] == model)


def _remember(seen: list[dict], history: dict) -> dict:
    seen.append(history)
    return history


def _ended_after(history: dict, t0: float) -> float:
    """Jobs ended after the sample at t0, as the samples' rates times their intervals add up."""
    t, rate = history["t"], history["jobs_per_s"]
    return sum(rate[i] * (t[i] - t[i - 1]) for i in range(1, len(t)) if t[i] > t0 and rate[i] is not None)


def _isolated(values: list) -> int:
    padded = [None, *values, None]
    return sum(1 for i in range(1, len(padded) - 1) if padded[i] is not None and padded[i - 1] is padded[i + 1] is None)


# Every series of every chart of one model: its data points and the path actually drawn.
READ_CHARTS = """
const section = document.querySelector(`section.history[data-model="${arguments[0]}"]`);
if (!section) return null;
return [...section.querySelectorAll("figure.chart")].map(fig => ({
  chart: fig.dataset.chart,
  dots: fig.querySelectorAll("circle.dot").length,
  series: [...fig.querySelectorAll("path.series")].map(p => ({
    name: p.dataset.series, points: JSON.parse(p.dataset.points), d: p.getAttribute("d")})),
}));"""


def test_status_page_charts_hold_the_history_of_the_jobs_the_test_ran(fabric, browser, tmp_path):
    model = "tiny-gpt2"
    # t0: a sample taken after every earlier job had ended (a sample taken before our start but
    # written after it may not yet count a job that ended just before).
    begun = httpx.get(f"{fabric.url}/status/history.json", timeout=30).json()["now"]
    t0 = wait_for(lambda: [t for t in _history(fabric, model)["t"] if t > begun][:1], 30, "a fresh sample")[0]
    # A slow job holds the replica while quick ones queue behind it and leave in batches.
    ids = [submit(fabric, slow_job(steps=40))] + [submit(fabric, quick_job()) for _ in range(7)]
    records = [wait_for(lambda i=i: (r := job(fabric, i))["state"] == "completed" and r, 120, "jobs") for i in ids]
    runs = [r["finished"] - r["started"] for r in records]
    waits = [r["started"] - r["created"] for r in records]
    # Oracle: the samples after t0 count exactly the test's jobs (nothing else runs on this model).
    seen: list[dict] = []
    wait_for(lambda: abs(_ended_after(_remember(seen, _history(fabric, model)), t0) - len(ids)) < 1e-6, 60,
             lambda: f"the jobs in the history: {_ended_after(seen[-1], t0)} ended after {t0} in {seen[-1]}")  # fmt: skip

    browser.get(fabric.url + "/")

    def page_has_them():  # the page redraws as it polls: read every chart in one script call
        charts = browser.execute_script(READ_CHARTS, model)
        if not charts:
            return None
        (jobs_per_s,) = next(c for c in charts if c["chart"] == "jobs_per_s")["series"]
        points = jobs_per_s["points"]
        history = {"t": [t for t, _ in points], "jobs_per_s": [v for _, v in points]}
        return abs(_ended_after(history, t0) - len(ids)) < 1e-6 and charts

    charts = wait_for(page_has_them, 30, "the charts to show the jobs")
    truth = _history(fabric, model)  # read after the page: it holds every sample the page drew
    by_t = {t: i for i, t in enumerate(truth["t"])}
    assert {c["chart"] for c in charts} == {"queue_depth", "jobs_per_s", "wait", "run", "batch_size", "replicas"}
    for figure in charts:
        for series in figure["series"]:
            column = truth[series["name"]]
            kept = [(t, v) for t, v in series["points"] if t in by_t]  # the oldest may be trimmed since
            assert kept and kept == [(t, column[by_t[t]]) for t, _ in kept], series["name"]
            assert all(t in by_t for t, _ in series["points"] if t > t0), series["name"]
            # One vertex drawn per measured point (a gap where nothing was measured).
            drawn = len(re.findall(r"[ML]", series["d"])) if any(v is not None for _, v in series["points"]) else 0
            assert drawn == sum(v is not None for _, v in series["points"]), series["name"]
        # A measured point alone between gaps is a dot (a path of one vertex draws nothing).
        alone = sum(_isolated([v for _, v in series["points"]]) for series in figure["series"])
        assert figure["dots"] == alone, figure["chart"]
    after = [i for i, t in enumerate(truth["t"]) if t > t0]
    # The test's own jobs bound what the samples after t0 measured.
    for name, values in (("run", runs), ("wait", waits)):
        measured = [truth[f"{name}_{q}_s"][i] for i in after for q in ("p50", "p95")]
        measured = [v for v in measured if v is not None]
        assert measured and all(min(values) - 1e-3 <= v <= max(values) + 1e-3 for v in measured), (name, measured)
    sizes = [truth["batch_size"][i] for i in after if truth["batch_size"][i] is not None]
    assert sizes and all(1 <= s <= 4 for s in sizes)  # the model's max_batch
    assert all(truth["replicas"][i] == 1 for i in after)
    assert max(truth["queue_depth"][i] for i in after) <= len(ids)

    # The screenshot shows the charts: the jobs/s line is drawn in its blue inside its chart.
    box = browser.execute_script(
        """const s = document.querySelector(`section.history[data-model="${arguments[0]}"]`);
           s.scrollIntoView(); const r = s.querySelector('figure[data-chart="jobs_per_s"] svg').getBoundingClientRect();
           return {x: r.x, y: r.y, w: r.width, h: r.height, ratio: window.devicePixelRatio};""",
        model,
    )
    shot_png = browser.get_screenshot_as_png()
    (tmp_path / "status-history.png").write_bytes(shot_png)
    shot = Image.open(io.BytesIO(shot_png)).convert("RGB")
    colors = shot.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 20, "the screenshot is blank"
    k = box["ratio"]
    chart = shot.crop((int(box["x"] * k), int(box["y"] * k), int((box["x"] + box["w"]) * k),
                       int((box["y"] + box["h"]) * k)))  # fmt: skip
    blue = sum(1 for r, g, b in chart.getdata() if b > 150 and r < 90 and 60 < g < 160)
    assert blue > 20, f"{blue} blue pixels in the jobs/s chart"
