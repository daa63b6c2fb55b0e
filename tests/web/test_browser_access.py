"""The app shared on the network, in a real browser: refused without a token, an annotator labels but reaches no
run controls, an admin starts a run, every page opens by its address, and the interface speaks Chinese."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
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
from tests.lifecycle import free_port, start  # noqa: E402
from tests.web.test_browser import (  # noqa: E402
    CHROMEDRIVER,
    CHROMIUM,
    RECORDS,
    RUN_CONFIG,
    WAIT_S,
    _button,
    _click,
    _idle,
    _shoot,
    _shots_dir,
    _type,
    _wait_text,
    pytestmark,  # noqa: F401  (skips without Chromium, as that module does)
)

from chattune.label.store import LabelStore  # noqa: E402
from chattune.web.auth import TOKEN_ENV  # noqa: E402

ADMIN, ANNOTATOR = "admin-token-browser-91c2", "annotator-token-browser-5e7a"
NOT_FOUND = "Page not found"


@pytest.fixture()
def shared_server(tmp_path: Path, tiny_model_dir: Path):
    """`chattune web --host 0.0.0.0` (a non-loopback bind: sign-in required) with tokens from the environment."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    shutil.copytree(tiny_model_dir, ws / "models" / "tiny")
    port = free_port()
    env = dict(os.environ) | {TOKEN_ENV["admin"]: ADMIN, TOKEN_ENV["annotator"]: ANNOTATOR}
    cmd = [
        sys.executable,
        "-m",
        "chattune",
        "web",
        "--workspace",
        str(ws),
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
    ]
    proc = start(cmd, f"http://127.0.0.1:{port}/_stcore/health", tmp_path / "web.log", env=env)
    try:
        yield f"http://127.0.0.1:{port}", ws
    finally:
        proc.terminate()
        proc.wait(20)
        for pid_file in ws.glob("runs/*/run.pid"):  # a run started by the test leads its own session
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(pid_file.read_text()), 9)


def _chromium(tmp_path: Path, name: str, lang: str):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--lang={lang}",
                f"--user-data-dir={tmp_path / name}", "--window-size=1400,1400"]:  # fmt: skip
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"intl.accept_languages": lang})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture()
def browsers(tmp_path: Path):
    """An English and a Chinese (zh-CN) browser, each with its own profile (cookies)."""
    made = []

    def make(name: str, lang: str):
        made.append(_chromium(tmp_path, name, lang))
        return made[-1]

    try:
        yield make
    finally:
        for driver in made:
            driver.quit()


def _body(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _sign_in(driver, token: str, label: str = "Access token") -> None:
    _wait_text(driver, label)
    _type(driver, label, token)  # Enter submits the form


def _cookie_set(driver, name: str) -> None:
    """Wait until the page has stored cookie `name` (the script that sets it runs a moment after the page)."""
    WebDriverWait(driver, WAIT_S).until(lambda d: f"{name}=" in d.execute_script("return document.cookie"))


def _open(driver, url: str, text: str) -> None:
    """Open `url` and wait for `text`; a page address that Streamlit does not know shows a dialog instead."""
    driver.get(url)
    _wait_text(driver, text)
    _idle(driver)
    assert NOT_FOUND not in _body(driver), url


def test_shared_app_roles_addresses_and_chinese(shared_server, browsers, tmp_path: Path) -> None:
    url, ws = shared_server
    shots = _shots_dir(tmp_path)
    annotator = browsers("annotator", "en-US")
    try:
        _walk_annotator(url, ws, annotator, shots)
    except Exception:
        _shoot(annotator, shots, "access-failure")
        raise
    admin = browsers("admin", "zh-CN")
    try:
        _walk_admin(url, ws, admin, shots)
    except Exception:
        _shoot(admin, shots, "access-failure-admin")
        raise


def _walk_annotator(url: str, ws: Path, driver, shots: Path) -> None:
    store = LabelStore(ws / "labels.sqlite")
    # refused without the token: any address shows the sign-in form and nothing of the workspace
    driver.get(f"{url}/monitor")
    _sign_in(driver, "not-the-token-at-all")
    _wait_text(driver, "That token is not valid.")
    assert "Start a run" not in _body(driver) and "Training monitor" not in _body(driver)
    _shoot(driver, shots, "access-refused")
    # an annotator: the monitor address refuses, no run controls anywhere
    _sign_in(driver, ANNOTATOR)
    _wait_text(driver, "This page is for admins")
    _cookie_set(driver, "chattune_session")
    assert "Start a run" not in _body(driver) and not driver.find_elements(
        By.XPATH, "//button[.//*[text()='Start']]"
    )
    # pages opened by address keep the sign-in (the session cookie); labeling works as usual
    _open(driver, f"{url}/labeling", "Labeling")
    _type(driver, "Your name", "annotator-1")
    _button(driver, "Import records").click()
    _type(driver, "File in the workspace", "data/in.jsonl")
    _click(driver, "Import")
    _wait_text(driver, "imported 3 records")
    _wait_text(driver, "record 1 · instruction · pending")
    _click(driver, "Accept")
    WebDriverWait(driver, WAIT_S).until(lambda d: store.counts()["accepted"] == 1)
    assert store.get(1).author == "annotator-1"
    assert "Prefill from model" not in _body(driver)  # choosing models is an admin's
    _shoot(driver, shots, "access-annotator-labeling")
    for page in ("monitor", "playground"):
        _open(driver, f"{url}/{page}", "This page is for admins")
    assert "Training monitor" not in driver.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar']").text
    # signing out ends the session, also for a reload
    _open(driver, f"{url}/labeling", "Labeling")
    _click(driver, "Sign out")
    _wait_text(driver, "Access token")
    driver.get(f"{url}/labeling")
    _wait_text(driver, "Access token")


def _walk_admin(url: str, ws: Path, driver, shots: Path) -> None:
    # a Chinese browser gets the Chinese interface; an admin may open every page by its address
    driver.get(f"{url}/monitor")
    _sign_in(driver, ADMIN, label="访问令牌")  # "Access token"
    _wait_text(driver, "启动训练任务")  # the monitor's "Start a run"
    _cookie_set(driver, "chattune_session")
    for page, title in (("labeling", "标注"), ("playground", "试用"), ("monitor", "训练监控")):
        _open(driver, f"{url}/{page}", title)
        assert "This page is for admins" not in _body(driver)
    _open(driver, url, "标注")  # the root opens the first page, at its own address
    WebDriverWait(driver, WAIT_S).until(lambda d: d.current_url.rstrip("/").endswith("/labeling"))
    _shoot(driver, shots, "access-admin-zh")
    # the switch: back to English
    driver.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] [data-testid='stSelectbox']").click()
    WebDriverWait(driver, WAIT_S).until(
        ec.element_to_be_clickable(
            (By.XPATH, "//*[@role='option'][.//*[text()='English'] or text()='English']")
        )
    ).click()
    _wait_text(driver, "Labeling")
    # the pick is kept for reloads and pages opened by address
    WebDriverWait(driver, WAIT_S).until(
        lambda d: "chattune_language=en" in d.execute_script("return document.cookie")
    )
    # an admin starts a run from the monitor
    _open(driver, f"{url}/monitor", "Start a run")
    config = WebDriverWait(driver, WAIT_S).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea[aria-label='Config (YAML)']"))
    )
    config.send_keys(Keys.CONTROL, "a")
    config.send_keys(Keys.DELETE)
    config.send_keys(
        RUN_CONFIG.replace("labels-conversations.jsonl", "in.jsonl").replace("conversations\n", "auto\n")
    )
    config.send_keys(Keys.CONTROL, Keys.ENTER)
    _idle(driver)
    _click(driver, "Start")
    _wait_text(driver, "started run my-run")
    pid_file = ws / "runs" / "my-run" / "run.pid"
    deadline = time.monotonic() + WAIT_S
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.is_file()
    _shoot(driver, shots, "access-admin-started")
