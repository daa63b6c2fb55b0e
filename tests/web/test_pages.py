"""Each page's logic through Streamlit's AppTest (no server, no port), plus the workspace's path checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the web extra (streamlit) is not installed")
from streamlit.testing.v1 import AppTest

from chattune.data.formats import read_samples
from chattune.label.store import LabelStore
from chattune.web.workspace import Workspace, resolve

TIMEOUT = 60


def _app(page: str, ws: Path) -> AppTest:
    at = AppTest.from_string(f"from chattune.web.views.{page} import page\npage()\n", default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(ws)
    return at.run()


def _button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_resolve_keeps_paths_inside(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    ws = Workspace(root)
    assert ws.resolve("data/x.jsonl") == root.resolve() / "data" / "x.jsonl"
    assert resolve(root, root / "runs") == (root / "runs").resolve()  # absolute but inside is fine
    for bad in ["../secret", "data/../../x", "/etc/passwd", str(tmp_path / "other")]:
        with pytest.raises(ValueError, match="outside the workspace"):
            ws.resolve(bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the workspace"):
        ws.resolve("link/x")
    with pytest.raises(ValueError, match="empty path"):
        ws.resolve("  ")


def test_labeling_page_import_label_export(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    (ws.data_dir / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    at = _app("labeling", ws.root)
    assert not at.exception
    at.text_input(key="author").set_value("ann")
    at.text_input(key="import_path").set_value("../outside.jsonl")
    _button(at, "preview").click().run()
    assert "outside the workspace" in at.error[0].value
    at.text_input(key="import_path").set_value("data/in.jsonl")
    _button(at, "preview").click().run()
    assert any("1 duplicates" in m.value for m in at.markdown)
    assert LabelStore(ws.labels_path).counts()["pending"] == 0  # the preview adds nothing
    _button(at, "import").click().run()
    assert "imported 3 records; 1 duplicates" in at.success[0].value
    assert [m.value for m in at.metric] == ["3", "0", "0", "0"]

    first = at.session_state["current_id"]
    at.text_area(key=f"ed_output_{first}").set_value("edited")
    _button(at, f"accept_{first}").click().run()
    second = at.session_state["current_id"]
    assert second != first
    _button(at, f"reject_{second}").click().run()
    at.selectbox(key="filter_status").set_value("accepted").run()
    assert at.session_state["current_id"] == first
    store = LabelStore(ws.labels_path)
    assert store.get(first).output == "edited" and store.get(first).author == "ann"
    assert store.counts() == {"pending": 1, "draft": 0, "accepted": 1, "rejected": 1}

    _button(at, f"delete_{first}").click().run()
    assert LabelStore(ws.labels_path).counts()["accepted"] == 0
    _button(at, "undo").click().run()
    assert LabelStore(ws.labels_path).counts()["accepted"] == 1

    _button(at, "export").click().run()
    assert "exported 1 records to data/labels-conversations.jsonl" in at.success[-1].value
    samples = [s for _, s in read_samples(ws.data_dir / "labels-conversations.jsonl")]
    assert samples[0].messages[-1].content == "edited"


def _fake_run(ws: Workspace, name: str, *, finished: bool) -> Path:
    out = ws.runs_dir / name
    out.mkdir()
    log = [{"step": s, "loss": 2.0 / s, "elapsed_s": s, "eta_s": 10 - s} for s in range(1, 6)]
    (out / "trainer_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (out / "config.yaml").write_text("model: x\n")
    if finished:
        (out / "final").mkdir()
    return out


def test_monitor_page_lists_runs_and_starts_stops(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _fake_run(ws, "done", finished=True)
    _fake_run(ws, "broken", finished=False)
    assert {r.name: r.status for r in ws.runs()} == {"done": "finished", "broken": "failed"}
    assert ws.run("broken").last_loss == pytest.approx(0.4) and ws.run("broken").progress == 0.5
    assert ws.adapters() == ["runs/done/final"]

    at = _app("monitor", ws.root)
    assert not at.exception
    assert {tuple(r) for r in at.dataframe[0].value[["run", "status"]].itertuples(index=False)} == {
        ("done", "finished"),
        ("broken", "failed"),
    }
    at.text_area(key="new_run_config").set_value("train_file: ../../etc/passwd\n")
    _button(at, "validate").click().run()
    assert "outside the workspace" in at.error[0].value
    at.text_area(key="new_run_config").set_value("train_file: data/x.jsonl\nlearning_rate: -1\n")
    _button(at, "validate").click().run()
    assert "learning_rate" in at.error[0].value
    at.text_area(key="new_run_config").set_value("train_file: data/x.jsonl\nmodel: models/m\n")
    _button(at, "validate").click().run()
    assert "config is valid" in at.success[0].value

    # a real child: `chattune train` on a missing file fails fast, which is what "failed" must show
    at.text_input(key="new_run_name").set_value("fresh")
    _button(at, "start").click().run()
    assert "started run fresh" in at.success[0].value
    info = ws.run("fresh")
    assert info.pid is not None and (info.path / "config.yaml").is_file()
    assert "runs/fresh/output" in (info.path / "config.yaml").read_text()
    if info.status == "running":
        assert ws.stop_run("fresh").status == "stopped"
    else:
        assert info.status == "failed"


def test_stop_terminates_the_pid(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    run = ws.runs_dir / "sleeper"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    (run / "run.pid").write_text(str(proc.pid))
    assert ws.run("sleeper").status == "running"
    assert ws.stop_run("sleeper").status == "stopped"
    assert proc.wait(10) is not None


def test_playground_chat_raw_and_send_to_labeling(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.root / "models" / "tiny")
    at = _app("playground", ws.root)
    at.text_input(key="base_model").set_value("/etc").run()
    assert "neither a model directory" in at.error[0].value
    at.text_input(key="base_model").set_value("models/tiny")
    at.slider(key="max_new_tokens").set_value(8).run()
    at.toggle(key="load_model").set_value(True).run()
    assert not at.exception, at.exception
    at.chat_input(key="chat_input").set_value("Hello").run()
    assert not at.exception, at.exception
    chat = at.session_state["chat"]
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[0]["content"] == "Hello"
    _button(at, "send_chat").click().run()
    rec = LabelStore(ws.labels_path).get(at.session_state["sent_id"])
    assert rec.kind == "conversation" and rec.status == "pending" and rec.messages[0]["content"] == "Hello"
    _button(at, "clear").click().run()
    assert at.session_state["chat"] == []

    at.radio(key="mode").set_value("raw generate").run()
    at.text_area(key="raw_prompt").set_value("one two three")
    _button(at, "generate").click().run()
    assert not at.exception, at.exception
    _button(at, "send_raw").click().run()
    rec = LabelStore(ws.labels_path).get(at.session_state["sent_id"])
    assert rec.kind == "instruction" and rec.instruction == "one two three"


def test_app_navigation_renders(tmp_path: Path) -> None:
    from chattune.web import app

    at = AppTest.from_file(app.__file__, default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(tmp_path / "ws")
    at.run()
    assert not at.exception
    assert at.title[0].value == "Labeling"


def test_launch_builds_an_argument_list_and_warns_off_loopback(tmp_path: Path, monkeypatch) -> None:
    from chattune.web import launch

    calls = []
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, check: calls.append(cmd))
    launch.run_web(tmp_path / "ws", port=9999)
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    assert cmd[cmd.index("--server.port") + 1] == "9999" and cmd[-2:] == [
        "--",
        str((tmp_path / "ws").resolve()),
    ]
    with pytest.warns(UserWarning, match="no login"):
        launch.run_web(tmp_path / "ws", host="0.0.0.0")
    assert (
        launch.is_loopback("::1") and launch.is_loopback("localhost") and not launch.is_loopback("10.0.0.1")
    )
