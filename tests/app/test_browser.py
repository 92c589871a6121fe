"""A real browser: the dashboard served on 127.0.0.1, loaded in headless Chromium, the Plotly
chart rendered with its points drawn, and a screenshot saved (docs/dashboard.png when asked)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("streamlit")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian chromium and chromium-driver are needed (installed by .ci/run)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()  # on the committed results of the full experiment (docs/reproduction.md)
    env = os.environ | {"DORA_DASHBOARD_TABLE": str(ROOT / "docs" / "reproduction" / "table.csv")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
         "--server.headless", "true", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1500,1700"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for: {script}")


def test_figure_page_draws_the_points(server, browser, tmp_path):
    browser.get(server + "/figures")
    points = wait_for(browser, "return document.querySelectorAll("
                               "'.js-plotly-plot .scatterlayer .point').length")
    assert points >= 3 * 4 * 6  # 3 methods x 4 steps x 6 layers of query matrices
    titles = browser.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot .annotation-text')]"
        ".map(e => e.textContent)")
    assert any("r = " in t for t in titles)
    time.sleep(1.0)  # let the last layout pass settle before the picture
    shot = Path(os.environ.get("DORA_SCREENSHOT", tmp_path / "dashboard.png"))
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_data_page_offers_the_demo(server, browser):
    browser.get(server + "/")
    text = wait_for(browser, "const t = document.body.innerText; "
                             "return t.includes('Load the demo data') ? t : ''")
    assert "Loaded:" in text and "Traceback" not in text
