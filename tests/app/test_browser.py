"""A real browser: the dashboard started as `make dashboard` starts it (`dora-dashboard`, no
address given: the command binds 127.0.0.1), loaded in headless Chromium — unreachable at this
machine's network address —, the Plotly chart rendered with its points drawn, a screenshot saved
(docs/dashboard.png when asked), a run followed while it grows, and an adapter uploaded with
nothing of it left on the server after the analysis and after the server exits."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.keys import Keys

from tests.app.test_app import adapter_files
from tests.app.test_server import free_port, lan_address, start, stop
from tests.common import llama_state, perturb

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("streamlit")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian chromium and chromium-driver are needed (installed by .ci/run)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def temp(tmp_path_factory):
    return tmp_path_factory.mktemp("server-tmp")  # the server's TMPDIR


@pytest.fixture(scope="module")
def server(temp):
    port = free_port()  # on the committed results of the full experiment (docs/reproduction.md)
    proc, lines = start(port, DORA_DASHBOARD_TABLE=str(ROOT / "docs" / "reproduction" /
                                                       "table.csv"), TMPDIR=str(temp))
    proc.lines, proc.port, proc.url = lines, port, f"http://127.0.0.1:{port}"
    yield proc
    if proc.poll() is None:
        stop(proc)


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


def page_text(driver, needle: str, timeout: float = 60.0) -> str:
    return wait_for(driver, f"const t = document.body.innerText; return t.includes({needle!r}) "
                            "? t : ''", timeout)


def screenshot(driver, tmp_path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    return shot


def test_the_default_bind_is_this_machine_only(server, browser, tmp_path):
    urls = [line.strip() for line in server.lines if "URL:" in line]
    assert urls == [f"URL: {server.url}"]  # Streamlit reports no Network URL
    browser.get(server.url + "/")
    page_text(browser, "Load the demo data")
    wait_for(browser, "return document.querySelector(\"input[aria-label='Base checkpoint']\")")
    time.sleep(1.0)
    screenshot(browser, tmp_path, "local.png")
    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no network address besides loopback")
    with pytest.raises(WebDriverException, match="ERR_CONNECTION_REFUSED"):
        browser.get(f"http://{lan}:{server.port}/")


def test_figure_page_draws_the_points(server, browser, tmp_path):
    browser.get(server.url + "/figures")
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
    browser.get(server.url + "/")
    text = page_text(browser, "Load the demo data")
    assert "Loaded:" in text and "Traceback" not in text


def fill(browser, label: str, text: str) -> None:
    selector = f"input[aria-label='{label}']"
    wait_for(browser, f"return document.querySelector({selector!r})")
    field = browser.find_element("css selector", selector)
    field.send_keys(Keys.CONTROL, "a")  # replace, as a user would
    field.send_keys(text)


def click(browser, label: str) -> None:
    button = next(b for b in browser.find_elements("css selector", "button")
                  if b.text.strip() == label)
    button.click()


def test_a_followed_run_refreshes_by_itself(server, browser, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file(llama_state(0), str(base))
    run = tmp_path / "run"
    for step in (10, 20, 30):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file(perturb(llama_state(0), 0.01 * step, seed=step),
                  str(run / f"checkpoint-{step}" / "model.safetensors"))
        if step == 20:  # the page is opened on two checkpoints, the third comes later
            browser.get(server.url + "/live")
            fill(browser, "Run folder", str(run))
            fill(browser, "Base checkpoint (for checkpoint-N/ folders)", str(base))
            fill(browser, "Refresh every (s)", "2")
            click(browser, "Follow")
            page_text(browser, "2 steps (last 20)")
    text = page_text(browser, "3 steps (last 30)", timeout=90)  # no click: the timer re-read it
    assert "Traceback" not in text
    time.sleep(1.0)
    screenshot(browser, tmp_path, "live.png")


def test_an_upload_leaves_nothing_on_the_server(server, browser, temp, tmp_path):
    for name, data, _ in adapter_files():
        (tmp_path / name).write_bytes(data)
    base = tmp_path / "base.safetensors"
    save_file(llama_state(0), str(base))
    browser.get(server.url + "/")
    page_text(browser, "Analyse checkpoints")
    fill(browser, "Base checkpoint", str(base))
    wait_for(browser, "return document.querySelector(\"input[type='file']\")")  # drawn last
    upload = browser.find_element("css selector", "input[type='file']")
    upload.send_keys("\n".join(str(tmp_path / n) for n, _, _ in adapter_files()))
    page_text(browser, "adapter_config.json")
    click(browser, "Run analysis")
    page_text(browser, "checkpoints uploaded adapter", timeout=90)
    (folder,) = temp.glob("dora-dashboard-*")
    assert list(folder.iterdir()) == []  # emptied once analysed
    stop(server)  # as Ctrl-C or a service manager would: SIGTERM
    assert not folder.exists()  # removed at exit
