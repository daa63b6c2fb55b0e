"""Who may do what in the web app (tokens, roles, signed sessions, page guards) and how its server stops."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the web extra (streamlit) is not installed")
from rich.console import Console
from streamlit.testing.v1 import AppTest
from tests.lifecycle import assert_stops, free_port, start

from chattune.errors import ConfigError
from chattune.web.auth import SESSION_KEY, TOKEN_ENV, Auth, auth_path, read_tokens, write_auth
from chattune.web.launch import set_up_login
from chattune.web.workspace import Workspace

ADMIN, ANNOTATOR = "admin-token-4f1c9a2e", "annotator-token-7b3d"
TIMEOUT = 60


def workspace_with_login(root: Path) -> Workspace:
    """A workspace whose app requires signing in, with known tokens."""
    ws = Workspace(root)
    write_auth(ws.root, {"admin": ADMIN, "annotator": ANNOTATOR}, session_hours=1)
    return ws


# ---------------------------------------------------------------- tokens and sessions


def test_tokens_sign_in_their_role_and_sessions_are_signed_and_expire(tmp_path: Path) -> None:
    ws = workspace_with_login(tmp_path / "ws")
    auth = Auth.load(ws.root)
    assert auth is not None
    assert auth.role_of(ADMIN) == "admin" and auth.role_of(f" {ANNOTATOR}\n") == "annotator"
    assert (
        auth.role_of(ADMIN[:-1]) is None and auth.role_of("") is None and auth.role_of(ADMIN.upper()) is None
    )
    session = auth.sign("annotator", now=1000.0)
    assert auth.verify(session, now=1000.0 + 3599) == "annotator"
    assert auth.verify(session, now=1000.0 + 3600) is None  # expired
    for forged in (
        session | {"role": "admin"},  # a different role under the annotator's signature
        session | {"expires": session["expires"] + 10**6},  # a longer life
        {"role": "admin", "expires": 10**12, "mac": "0" * 64},
        {"role": "admin"},
        "admin",
        None,
    ):
        assert auth.verify(forged, now=1000.0) is None, forged
    cookie = auth.to_cookie(session)
    assert auth.from_cookie(cookie, now=1000.0) == session and auth.from_cookie(cookie, now=10**7) is None
    for forged in ("admin.99999999999." + "0" * 64, cookie.replace("annotator", "admin"), "", None, "a.b.c"):
        assert auth.from_cookie(forged, now=1000.0) is None, forged
    # a new launch signs with a new key: earlier sessions end
    write_auth(ws.root, {"admin": ADMIN, "annotator": ANNOTATOR}, session_hours=1)
    assert Auth.load(ws.root).verify(session, now=1000.0) is None


def test_the_auth_file_holds_digests_only_and_is_private(tmp_path: Path) -> None:
    ws = workspace_with_login(tmp_path / "ws")
    path = auth_path(ws.root)
    text = path.read_text()
    assert ADMIN not in text and ANNOTATOR not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tokens_come_from_a_file_or_the_environment(tmp_path: Path) -> None:
    env = {TOKEN_ENV["admin"]: ADMIN}
    assert read_tokens(None, env) == {"admin": ADMIN, "annotator": None}
    lines = tmp_path / "tokens.txt"
    lines.write_text(f"admin: {ADMIN}\nannotator: {ANNOTATOR}\n")
    assert read_tokens(lines, {}) == {"admin": ADMIN, "annotator": ANNOTATOR}
    as_json = tmp_path / "tokens.json"
    as_json.write_text(json.dumps({"annotator": ANNOTATOR}))
    assert read_tokens(as_json, env) == {"admin": ADMIN, "annotator": ANNOTATOR}
    for text, message in [
        (f"admin: {ADMIN}\nroot: {ANNOTATOR}", "unknown role"),
        ("admin: short", "too short"),
        (f"admin: {ADMIN}\nannotator: {ADMIN}", "same"),
        ("nothing here", "no token"),
    ]:
        lines.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_tokens(lines, {})
    with pytest.raises(ConfigError, match="cannot read"):
        read_tokens(tmp_path / "missing.txt", {})


def test_launcher_requires_login_beyond_loopback_and_prints_only_new_tokens(
    tmp_path: Path, monkeypatch
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv(TOKEN_ENV["admin"], ADMIN)
    monkeypatch.delenv(TOKEN_ENV["annotator"], raising=False)
    console = Console(record=True, width=200)
    tokens = set_up_login(ws, "0.0.0.0", console)
    printed = console.export_text()
    assert tokens["admin"] == ADMIN and ADMIN not in printed  # a given token is never echoed
    assert tokens["annotator"] in printed and len(tokens["annotator"]) >= 20  # a generated one is, once
    auth = Auth.load(ws)
    assert auth.role_of(tokens["annotator"]) == "annotator" and auth.role_of(ADMIN) == "admin"
    assert set_up_login(ws, "127.0.0.1", console) is None and Auth.load(ws) is None  # loopback: no login
    assert set_up_login(ws, "127.0.0.1", console, login=True) is not None and Auth.load(ws) is not None


# ---------------------------------------------------------------- the app: sign-in, roles, forged requests


def _app(ws: Workspace, session: dict | None = None, query: dict[str, str] | None = None) -> AppTest:
    from chattune.web import app

    at = AppTest.from_file(app.__file__, default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(ws.root)
    if session is not None:
        at.session_state[SESSION_KEY] = session
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def _page(name: str, ws: Workspace, session: dict) -> AppTest:
    at = AppTest.from_string(f"from chattune.web.views.{name} import page\npage()\n", default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(ws.root)
    at.session_state[SESSION_KEY] = session
    return at.run()


def _sign_in(at: AppTest, token: str) -> AppTest:
    at.text_input(key="sign_in_token").set_value(token)
    return at.button[0].click().run()  # the form's submit button


def test_signing_in_with_each_role(tmp_path: Path) -> None:
    ws = workspace_with_login(tmp_path / "ws")
    at = _app(ws)
    assert not at.exception
    assert [t.value for t in at.title] == ["chattune"] and at.text_input(key="sign_in_token")  # sign-in only
    _sign_in(at, "not-a-token-at-all")
    assert "not valid" in at.error[0].value and [t.value for t in at.title] == ["chattune"]
    _sign_in(at, ANNOTATOR)
    assert not at.exception and at.title[0].value == "Labeling"
    assert Auth.load(ws.root).verify(at.session_state[SESSION_KEY]) == "annotator"
    at = _app(ws)
    _sign_in(at, ADMIN)
    assert Auth.load(ws.root).verify(at.session_state[SESSION_KEY]) == "admin"
    assert any(b.key == "sign_out" for b in at.sidebar.button)
    next(b for b in at.sidebar.button if b.key == "sign_out").click().run()
    assert SESSION_KEY not in at.session_state and [t.value for t in at.title] == ["chattune"]


def test_forged_session_state_or_query_parameters_do_not_sign_in(tmp_path: Path) -> None:
    ws = workspace_with_login(tmp_path / "ws")
    forged = {"role": "admin", "expires": 10**12, "mac": "0" * 64}
    for at in (
        _app(ws, session=forged),
        _app(ws, query={"role": "admin", "token": "admin", "run": "x"}),
        _app(ws, session={"role": "admin"}),
    ):
        assert not at.exception and [t.value for t in at.title] == ["chattune"]
        assert at.text_input(key="sign_in_token")
    for name in ("monitor", "playground", "labeling"):  # a page run directly checks the session itself
        at = _page(name, ws, forged)
        assert not at.exception and [t.value for t in at.title] == ["chattune"], name
    expired = Auth.load(ws.root).sign("admin", now=0)
    at = _app(ws, session=expired)
    assert "expired" in at.warning[0].value


def test_annotators_label_but_cannot_reach_run_controls_or_models(tmp_path: Path) -> None:
    ws = workspace_with_login(tmp_path / "ws")
    session = Auth.load(ws.root).sign("annotator")
    ws.store().add("Capital of France?", output="Paris")
    for name in ("monitor", "playground"):
        at = _page(name, ws, session)
        assert not at.exception
        assert "for admins" in at.error[0].value, name
        assert not at.button and not at.text_area and not at.toggle, name  # no start, stop, model loading
    at = _page("labeling", ws, session)
    assert not at.exception and at.title[0].value == "Labeling"
    keys = {b.key for b in at.button}
    assert any(k.startswith("accept_") for k in keys) and "export" in keys
    assert not any(k.startswith("prefill_") for k in keys)  # choosing and loading models is an admin's
    assert not [w for w in at.sidebar.text_input if w.key.startswith("prefill_")]
    rid = at.session_state["current_id"]
    next(b for b in at.button if b.key == f"accept_{rid}").click().run()
    assert ws.store().get(rid).status == "accepted"
    next(b for b in at.button if b.key == "export").click().run()
    assert "exported 1 records" in at.success[0].value
    assert not [link for link in at.get("page_link")]  # "train on this" links admins to the monitor only
    admin = _page("monitor", ws, Auth.load(ws.root).sign("admin"))
    assert not admin.exception and any(b.key == "start" for b in admin.button)


def test_the_web_form_cannot_switch_on_remote_code_or_reach_outside(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    good = "model: smollm2-135m-instruct\ntrain_file: data/x.jsonl\n"
    ws.validate_config(good, "ok")
    for extra, message in [
        ("trust_remote_code: true", "trust_remote_code"),
        ("tokenizer: /etc", "neither a model directory inside the workspace"),
        ("deepspeed: ../ds.json", "outside the workspace"),
        ("resume: /tmp/checkpoint-1", "outside the workspace"),
        ("model: ../models/x", "neither a model directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            ws.validate_config(good.replace("model: smollm2-135m-instruct\n", "") + extra + "\n", "bad")


def test_a_non_loopback_server_without_login_settings_refuses_to_serve(tmp_path: Path) -> None:
    from streamlit import config

    ws = Workspace(tmp_path / "ws")
    config.set_option("server.address", "0.0.0.0")  # reset by the autouse fixture
    at = _app(ws)
    assert not at.exception and "no login set up" in at.error[0].value and not at.title


# ---------------------------------------------------------------- the server stops when told


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_web_server_stops_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "chattune", "web", "--workspace", str(tmp_path / "ws"), "--port", str(port)]
    proc = start(cmd, f"http://127.0.0.1:{port}/_stcore/health", tmp_path / "web.log", env=dict(os.environ))
    took = assert_stops(proc, sig, port, within_s=10)
    assert took < 10
