"""One real-browser test: `chattune web` on 127.0.0.1, driven by headless Debian Chromium through chromedriver."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
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

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
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


RECORDS = [
    {"instruction": "Capital of France?", "input": "", "output": "Paris"},
    {"instruction": "Add", "input": "2 + 2", "output": "4"},
    {"instruction": "Say hello", "input": "", "output": "Hello!"},
]
RUN_CONFIG = """model: models/tiny
train_file: data/labels-conversations.jsonl
format: conversations
method: lora
batch_size: 1
learning_rate: 1.0e-2
epochs: 40
logging_steps: 1
save_steps: 1000
"""


@pytest.fixture()
def server(tmp_path: Path, tiny_model_dir: Path):
    """`chattune web` (run_web) on a free loopback port, serving a workspace with a file to import and a model."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    shutil.copytree(
        tiny_model_dir, ws / "models" / "tiny"
    )  # the pages accept only paths inside the workspace
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
        # a training run started from the page leads its own session: stop it if the test left it running
        for pid_file in ws.glob("runs/*/run.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pid_file.read_text()), 9)


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
        "--window-size=1400,1400",
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


def _click(driver, label: str) -> None:
    """Click a button by its label, again if a rerun replaced it under the pointer."""
    for _ in range(5):
        try:
            _button(driver, label).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.3)
    _button(driver, label).click()


def _idle(driver) -> None:
    """Wait until no script run is in progress (Streamlit shows a status widget while one is)."""
    time.sleep(0.5)
    WebDriverWait(driver, WAIT_S).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")
    )


def _wait_text(driver, text: str, timeout: float = WAIT_S) -> None:
    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)


def _shots_dir(tmp_path: Path) -> Path:
    out = tmp_path / "shots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shoot(driver, shots: Path, name: str) -> None:
    """A screenshot under the test's tmp dir, copied to /tmp/chattune-screens/ for people to look at."""
    time.sleep(1)  # let the page finish drawing before the picture
    driver.save_screenshot(str(shots / f"{name}.png"))
    public = Path(os.environ.get("CHATTUNE_SCREENSHOTS") or "/tmp/chattune-screens")
    public.mkdir(parents=True, exist_ok=True)
    shutil.copy(shots / f"{name}.png", public / f"{name}.png")


def _log_steps(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _progress_text(driver) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, "[data-testid='stProgress']")
    return found[0].text if found else ""


def test_label_train_watch_and_chat(server, browser, tmp_path: Path) -> None:
    """The issue's "done when": label 3 records, export, start a run, watch its curve move, chat with it."""
    shots = _shots_dir(tmp_path)
    try:
        _walk(server, browser, shots)
    except Exception:
        _shoot(browser, shots, "failure")  # what the page showed when it went wrong
        raise


def _walk(server, browser, shots: Path) -> None:
    url, ws = server
    store = LabelStore(ws / "labels.sqlite")

    # --- labeling: import, accept three records one by one, export
    browser.get(url)  # the default page lives at the root
    _wait_text(browser, "Labeling")
    _type(browser, "Your name", "tester")
    _button(browser, "Import records").click()  # the expander
    _type(browser, "File in the workspace", "data/in.jsonl")
    _click(browser, "Import")
    _wait_text(browser, "imported 3 records")
    for done in (1, 2, 3):
        _wait_text(browser, f"record {done} · instruction · pending")  # the editor shows the next record
        _click(browser, "Accept")
        WebDriverWait(browser, WAIT_S).until(lambda d, n=done: store.counts()["accepted"] == n)
    _wait_text(browser, "record 1 · instruction · accepted")  # the last Accept's rerun has drawn the page
    _idle(browser)
    for _ in range(3):  # a click landing while a rerun replaces the button can be dropped: press again
        _click(browser, "Export")
        try:
            _wait_text(browser, "exported 3 records", timeout=20)
            break
        except TimeoutException:
            continue
    _wait_text(browser, "exported 3 records")
    samples = [s for _, s in read_samples(ws / "data" / "labels-conversations.jsonl")]
    assert [s.messages[-1].content for s in samples] == ["Paris", "4", "Hello!"]
    assert {store.get(i).author for i in (1, 2, 3)} == {"tester"}
    link = WebDriverWait(browser, WAIT_S).until(
        ec.element_to_be_clickable((By.PARTIAL_LINK_TEXT, "Train on this"))
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", link)  # the export in the picture
    _shoot(browser, shots, "labeling")

    # --- "train on this" opens the monitor with the export prefilled; start a run on the tiny model
    link.click()
    _wait_text(browser, "Start a run")
    config = WebDriverWait(browser, WAIT_S).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[aria-label='Config (YAML)']"))
    )
    assert "train_file: data/labels-conversations.jsonl" in config.get_attribute("value")
    config.send_keys(Keys.CONTROL, "a")
    config.send_keys(Keys.DELETE)
    config.send_keys(RUN_CONFIG)
    config.send_keys(Keys.CONTROL, Keys.ENTER)  # Streamlit commits a text area on Ctrl+Enter
    _idle(browser)
    _click(browser, "Start")
    _wait_text(browser, "started run my-run")
    log = ws / "runs" / "my-run" / "output" / "trainer_log.jsonl"

    # --- the curve appears and moves with no clicks: the page redraws itself while the run runs.
    # The tiny run can end within seconds, before the page is seen mid-run, so the test pauses it
    # (SIGSTOP to its process group) after a few logged steps and lets it go once the page shows it.
    WebDriverWait(browser, 150, poll_frequency=0.02).until(lambda d: _log_steps(log) >= 3)
    trainer = int((ws / "runs" / "my-run" / "run.pid").read_text())
    os.killpg(trainer, signal.SIGSTOP)
    try:
        WebDriverWait(browser, WAIT_S).until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']")
                and _progress_text(d).startswith("step ")
                and int(_progress_text(d).split()[1]) >= 2  # a curve of a few points in the picture
                and "Run my-run — running" in d.find_element(By.TAG_NAME, "body").text
            )
        )
        first = _progress_text(browser)
        _shoot(browser, shots, "monitor-running")
    finally:
        os.killpg(trainer, signal.SIGCONT)
    WebDriverWait(browser, WAIT_S).until(lambda d: _progress_text(d) not in ("", first))
    assert int(_progress_text(browser).split()[1]) > int(first.split()[1])  # the step moved on
    _wait_text(browser, "Run my-run — finished", timeout=150)
    assert (ws / "runs" / "my-run" / "output" / "final").is_dir() and _log_steps(log) >= 40
    _shoot(browser, shots, "monitor")

    # --- refresh the browser: the run's page comes back from the URL and the files
    browser.refresh()
    _wait_text(browser, "Run my-run — finished")

    # --- chat with the result: the link preselects base model and adapter in the playground
    WebDriverWait(browser, WAIT_S).until(
        ec.element_to_be_clickable((By.PARTIAL_LINK_TEXT, "in the playground"))
    ).click()
    _wait_text(browser, "Playground")
    WebDriverWait(browser, WAIT_S).until(
        ec.element_to_be_clickable((By.XPATH, "//label[.//*[normalize-space()='Load the model']]"))
    ).click()
    _wait_text(browser, "runs/my-run/output/final")  # the caption naming the loaded model: the adapter
    chat = WebDriverWait(browser, WAIT_S).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']"))
    )
    chat.send_keys("Capital of France?", Keys.ENTER)
    _wait_text(browser, "Was the last answer right?")  # drawn once the reply is in the history
    messages = browser.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")
    assert len(messages) == 2 and "Capital of France?" in messages[0].text
    _shoot(browser, shots, "playground")
    assert all(
        (shots / f"{p}.png").stat().st_size > 10_000
        for p in ("labeling", "monitor-running", "monitor", "playground")
    )
