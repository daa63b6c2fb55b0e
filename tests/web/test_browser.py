"""One real-browser test: `chattune web` on 127.0.0.1, driven by headless Debian Chromium through chromedriver."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the web extra (streamlit) is not installed")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from chattune.data.formats import read_samples  # noqa: E402
from chattune.label.store import LabelStore  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="Debian chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
)
WAIT_S = 90  # the first page load imports torch and transformers on a busy machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the web server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the web server did not come up")


@pytest.fixture()
def server(tmp_path: Path):
    """`chattune web` (run_web) on a free loopback port, serving a workspace with one file to import."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    rows = [{"instruction": "Capital of France?", "input": "", "output": "Paris"}]
    (ws / "data" / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = _free_port()
    code = f"from pathlib import Path; from chattune.web.launch import run_web; run_web(Path({str(ws)!r}), port={port})"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, ws
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()


@pytest.fixture()
def browser(tmp_path: Path):
    """Headless Chromium with a fresh profile and nothing that phones home."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
    ]:
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _button(driver, label: str):
    # buttons, and the <summary> that opens an expander
    xpath = f"//*[self::button or self::summary][.//*[normalize-space()='{label}']]"
    return WebDriverWait(driver, WAIT_S).until(ec.element_to_be_clickable((By.XPATH, xpath)))


def _type(driver, label: str, text: str) -> None:
    box = WebDriverWait(driver, WAIT_S).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f"input[aria-label='{label}']"))
    )
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text, Keys.ENTER)  # Streamlit commits a text input on Enter


def _wait_text(driver, text: str) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def _shots_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CHATTUNE_SCREENSHOTS") or tmp_path / "shots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_label_export_and_screenshot_pages(server, browser, tmp_path: Path) -> None:
    shots = _shots_dir(tmp_path)
    try:
        _label_export_and_screenshot(server, browser, shots)
    except Exception:
        browser.save_screenshot(str(shots / "failure.png"))  # what the page showed when it went wrong
        raise


def _label_export_and_screenshot(server, browser, shots: Path) -> None:
    url, ws = server
    browser.get(url)  # the default page lives at the root
    _wait_text(browser, "Labeling")
    _type(browser, "Your name", "tester")
    _button(browser, "Import records").click()  # the expander
    _type(browser, "File in the workspace", "data/in.jsonl")
    _button(browser, "Import").click()
    _wait_text(browser, "imported 1 records")
    _button(browser, "Accept").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: LabelStore(ws / "labels.sqlite").counts()["accepted"] == 1)
    _button(browser, "Export").click()
    _wait_text(browser, "exported 1 records")
    samples = [s for _, s in read_samples(ws / "data" / "labels-conversations.jsonl")]
    assert samples[0].messages[-1].content == "Paris"
    assert LabelStore(ws / "labels.sqlite").get(1).author == "tester"
    browser.save_screenshot(str(shots / "labeling.png"))

    for page, title in [("monitor", "Training monitor"), ("playground", "Playground")]:
        browser.get(f"{url}/{page}")
        _wait_text(browser, title)
        time.sleep(1)  # let the page finish drawing before the picture
        browser.save_screenshot(str(shots / f"{page}.png"))
    assert all((shots / f"{p}.png").stat().st_size > 10_000 for p in ("labeling", "monitor", "playground"))
