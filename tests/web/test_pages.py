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


def test_labeling_page_edits_the_tools_of_a_tool_conversation(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    tools = [{"name": "get_weather", "parameters": {}}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]
    rid = LabelStore(ws.labels_path).add(messages=messages, tools=tools)
    plain = LabelStore(ws.labels_path).add(messages=messages)
    at = _app("labeling", ws.root)
    assert json.loads(at.text_area(key=f"ed_tools_{rid}").value) == tools
    at.text_area(key=f"ed_tools_{rid}").set_value('{"name": "x"}')
    _button(at, f"accept_{rid}").click().run()
    assert "tools: expected a JSON list" in at.error[0].value
    assert LabelStore(ws.labels_path).get(rid).status == "pending"  # nothing saved from a bad edit
    at.text_area(key=f"ed_tools_{rid}").set_value('[{"name": "forecast", "parameters": {}}]')
    _button(at, f"accept_{rid}").click().run()
    rec = LabelStore(ws.labels_path).get(rid)
    assert rec.status == "accepted" and rec.tools == [{"name": "forecast", "parameters": {}}]
    assert at.session_state["current_id"] == plain
    assert not [t for t in at.text_area if t.key == f"ed_tools_{plain}"]  # no tools box without tools


def test_labeling_edits_a_message_of_a_conversation_in_its_own_box(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?", "metadata": "m1"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": "晴，21 度"},
        {"role": "assistant", "content": "Sunny.", "loss": False},
    ]
    tools = [{"name": "get_weather", "parameters": {}}]
    rid = LabelStore(ws.labels_path).add(messages=messages, tools=tools)
    at = _app("labeling", ws.root)
    # one box per message with text, labelled by its role; the tool call (no text) is shown, not a box
    assert [at.text_area(key=f"ed_message_{rid}_{i}").value for i in (0, 1, 3)] == [
        "Be brief.",
        "Weather in Paris?",
        "Sunny.",
    ]
    assert not [a for a in at.text_area if a.key == f"ed_message_{rid}_2"]
    assert [c.value for c in at.caption][1:5] == [
        "system",
        "user",
        "more fields, kept as they are (change them under “Edit as JSON”): metadata",
        "tool",
    ]
    at.text_area(key=f"ed_message_{rid}_3").set_value("你好，世界").run()
    assert not at.exception, at.exception
    shown = json.loads(at.text_area(key=f"ed_messages_{rid}").value)  # the JSON editor follows the box
    assert shown[3] == {"role": "assistant", "content": "你好，世界", "loss": False}
    assert "你好，世界" in at.text_area(key=f"ed_messages_{rid}").value  # not escaped as \\u4f60
    _button(at, f"accept_{rid}").click().run()
    rec = LabelStore(ws.labels_path).get(rid)
    assert rec.status == "accepted" and rec.tools == tools
    assert rec.messages == [*messages[:3], {"role": "assistant", "content": "你好，世界", "loss": False}]

    # the JSON editor adds a message; the boxes follow it, and a box edit then keeps the added message
    rid2 = LabelStore(ws.labels_path).add(messages=messages[:2])
    at.run()  # the picker lists the new record
    at.selectbox(key="pick_id").set_value(rid2).run()
    more = [*messages[:2], {"role": "assistant", "content": "巴黎今天晴。"}]
    at.text_area(key=f"ed_messages_{rid2}").set_value(json.dumps(more, ensure_ascii=False)).run()
    assert at.text_area(key=f"ed_message_{rid2}_2").value == "巴黎今天晴。"
    at.text_area(key=f"ed_message_{rid2}_0").set_value("简短回答。").run()
    _button(at, f"draft_{rid2}").click().run()
    assert LabelStore(ws.labels_path).get(rid2).messages == [
        {"role": "system", "content": "简短回答。"},
        *more[1:],
    ]


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


def test_launch_builds_an_argument_list(tmp_path: Path) -> None:
    from chattune.web import launch

    cmd = launch.streamlit_command(tmp_path / "ws", port=9999)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    assert cmd[cmd.index("--server.port") + 1] == "9999" and cmd[-2:] == [
        "--",
        str((tmp_path / "ws").resolve()),
    ]
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"


# ---------------------------------------------------------------- playground: tools, side by side, feedback


def test_parse_tools_names_what_is_wrong() -> None:
    from chattune.web.views.playground import DEFAULT_TOOLS, parse_tools

    assert parse_tools(DEFAULT_TOOLS)[0]["name"] == "get_weather"
    assert parse_tools('[{"type": "function", "function": {"name": "f"}}]')[0]["function"]["name"] == "f"
    for text, message in [
        ('[{"name": "f",}]', "not valid JSON: .* line 1, column"),
        ('{"name": "f"}', "non-empty JSON list .* not a JSON dict"),
        ("[]", "not an empty list"),
        ('["f"]', "tool 1 is a JSON str"),
        ('[{"name": "f"}, {"description": "no name"}]', "tool 2 has no name"),
        ('[{"name": "f"}, {"name": "f"}]', "used twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_tools(text)


def _playground(ws: Workspace, base: str, *, tokens: int = 8, adapter: str | None = None) -> AppTest:
    at = _app("playground", ws.root)
    at.text_input(key="base_model").set_value(base)
    at.slider(key="max_new_tokens").set_value(tokens)
    if adapter is not None:
        at.selectbox(key="adapter").set_value(adapter)
    at.run()
    at.toggle(key="load_model").set_value(True).run()
    assert not at.exception, at.exception
    return at


def test_playground_tool_mode_call_and_observation(tmp_path: Path, tool_model_dir: Path) -> None:
    from tests.web.conftest import TOOL_ANSWER, TOOL_OBSERVATION, TOOL_PROMPT

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tool_model_dir, ws.root / "models" / "tool")
    at = _playground(ws, "models/tool", tokens=64)
    at.radio(key="mode").set_value("tool").run()
    default_tools = at.text_area(key="tools_json").value
    at.text_area(key="tools_json").set_value('[{"name": "get_weather",}]').run()
    assert "not valid JSON" in at.error[0].value and not at.chat_input  # nothing to send with bad tools
    at.text_area(key="tools_json").set_value('[{"description": "weather"}]').run()
    assert "tool 1 has no name" in at.error[0].value
    at.text_area(key="tools_json").set_value(default_tools).run()
    assert not at.error and "tools offered: get_weather" in at.caption[-1].value

    at.chat_input(key="tool_input").set_value(TOOL_PROMPT).run()
    assert not at.exception, at.exception
    turns = at.session_state["tool_chat"]
    assert [m.role for m in turns] == ["user", "assistant"], turns
    call = turns[1].tool_call
    assert call is not None, turns
    assert call is not None and (call.name, call.arguments) == ("get_weather", {"city": "Paris"})
    assert any("tool call:** `get_weather`" in m.value for m in at.markdown)  # name ...
    assert json.loads(at.json[0].value) == {"city": "Paris"}  # ... and arguments, not raw text
    assert not at.chat_input  # the model waits for the observation, not for a new message

    at.text_area(key="observation_2").set_value(TOOL_OBSERVATION)
    _button(at, "send_observation").click().run()
    assert not at.exception, at.exception
    turns = at.session_state["tool_chat"]
    assert [m.role for m in turns] == ["user", "assistant", "observation", "assistant"]
    assert turns[2].content == TOOL_OBSERVATION and turns[2].tool_name == "get_weather"
    assert turns[3].tool_call is None and turns[3].content == TOOL_ANSWER  # the answer used the observation
    assert at.chat_input  # back to the user's turn

    # to labeling: the call, its observation and the tools survive the store and the export intact
    from chattune.data.formats import read_samples

    _button(at, "send_tool").click().run()
    assert not at.exception, at.exception
    rec = ws.store().get(at.session_state["sent_id"])
    assert rec.kind == "conversation" and [t["name"] for t in rec.tools] == ["get_weather"]
    ws.store().set_status(rec.id, "accepted")
    ws.store().export(tmp_path / "labels.jsonl")
    [(_, sample)] = list(read_samples(tmp_path / "labels.jsonl"))
    assert sample.tools == rec.tools and [m.role for m in sample.messages] == [m.role for m in turns]
    assert sample.messages[1].tool_call == call and sample.messages[2].content == TOOL_OBSERVATION
    assert sample.messages[3].content == TOOL_ANSWER


def test_playground_side_by_side(tmp_path: Path, tiny_model_dir: Path, tool_model_dir: Path) -> None:
    from tests.web.conftest import TOOL_PROMPT

    from chattune.infer.engine import load_engine
    from chattune.infer.generate import Sampling, reply_to
    from chattune.web.models import prompt_ids

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.root / "models" / "tiny")
    # a full fine-tune's output dir: the tool model stands in as the tuned version of tiny
    shutil.copytree(tool_model_dir, ws.runs_dir / "tuned" / "final")
    at = _playground(ws, "models/tiny", tokens=40)
    at.radio(key="mode").set_value("side by side").run()
    assert "Choose an adapter" in at.info[0].value
    at.selectbox(key="adapter").set_value("runs/tuned/final").run()
    at.text_area(key="compare_prompt").set_value(TOOL_PROMPT)
    _button(at, "compare").click().run()
    assert not at.exception, at.exception
    result = at.session_state["compare_result"]
    # each column is what that model says to the prompt outside the page, and the two models differ
    expected = {}
    for label, path in (("base", ws.root / "models" / "tiny"), ("tuned", ws.runs_dir / "tuned" / "final")):
        engine = load_engine(str(path))
        expected[label] = reply_to(
            engine, prompt_ids(engine, TOOL_PROMPT), Sampling(max_new_tokens=40)
        ).display()
    assert result == {"prompt": TOOL_PROMPT, **expected} and expected["base"] != expected["tuned"]
    assert [h.value for h in at.subheader] == ["Base model", "Tuned (base + adapter)"]
    shown = [m.value for m in at.markdown]
    assert (result["base"] or "*(empty reply)*") in shown and result["tuned"] in shown


def test_playground_feedback_sends_corrections(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.root / "models" / "tiny")
    at = _playground(ws, "models/tiny")
    at.chat_input(key="chat_input").set_value("Hello").run()
    answer = at.session_state["chat"][-1]["content"]
    _button(at, "chat_wrong").click().run()
    assert "type the answer it should have given" in at.error[0].value
    assert LabelStore(ws.labels_path).counts() == dict.fromkeys(
        ("pending", "draft", "accepted", "rejected"), 0
    )
    at.text_area(key="chat_correction").set_value("Hi! How can I help?")
    _button(at, "chat_wrong").click().run()
    store = LabelStore(ws.labels_path)
    wrong = store.get(at.session_state["chat_feedback"][1])
    assert (wrong.status, wrong.source, wrong.kind) == ("pending", "playground", "conversation")
    assert wrong.messages == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    assert any("marked wrong" in s.value for s in at.success)
    _button(at, "chat_correct").click().run()
    right = store.get(at.session_state["chat_feedback"][1])
    assert right.status == "accepted" and right.messages[-1]["content"] == answer

    at.radio(key="mode").set_value("raw generate").run()
    at.text_area(key="raw_prompt").set_value("one two")
    _button(at, "generate").click().run()
    at.text_area(key="raw_correction").set_value("three four")
    _button(at, "raw_wrong").click().run()
    rec = store.get(at.session_state["raw_feedback"][1])
    assert (rec.kind, rec.instruction, rec.output, rec.status) == (
        "instruction",
        "one two",
        "three four",
        "pending",
    )


# ---------------------------------------------------------------- labeling: prefill from model


def test_labeling_prefill_from_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from chattune.infer.engine import load_engine
    from chattune.infer.generate import Sampling, reply_to
    from chattune.web.models import prompt_ids

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.root / "models" / "tiny")
    store = LabelStore(ws.labels_path)
    rid = store.add("Capital of France?", output="")
    cid = store.add(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}])
    at = _app("labeling", ws.root)
    at.text_input(key="prefill_base_model").set_value("../outside").run()
    _button(at, f"prefill_{rid}").click().run()
    assert any("choose a model" in e.value for e in at.error) and store.get(rid).output == ""

    at.text_input(key="prefill_base_model").set_value("models/tiny")
    at.slider(key="prefill_max_new_tokens").set_value(12).run()
    _button(at, f"prefill_{rid}").click().run()
    assert not at.exception, at.exception
    # what the same model says to the same prompt outside the page
    engine = load_engine(str(ws.root / "models" / "tiny"))
    expected = reply_to(
        engine, prompt_ids(engine, "Capital of France?"), Sampling(max_new_tokens=12)
    ).display()
    rec = LabelStore(ws.labels_path).get(rid)
    assert rec.output == expected and expected and rec.status == "draft"
    assert at.text_area(key=f"ed_output_{rid}").value == expected  # the editor shows the draft

    at.selectbox(key="pick_id").set_value(cid).run()
    _button(at, f"prefill_{cid}").click().run()
    conv = LabelStore(ws.labels_path).get(cid)
    assert conv.status == "draft" and conv.messages[0] == {"role": "user", "content": "hi"}
    assert len(conv.messages) == 2 and conv.messages[1]["role"] == "assistant"
    assert json.loads(at.text_area(key=f"ed_messages_{cid}").value) == conv.messages
    assert (
        at.text_area(key=f"ed_message_{cid}_1").value == conv.messages[1]["content"]
    )  # the draft's turn too


# ---------------------------------------------------------------- monitor: live refresh, survives a refresh


def _chart_rows(at: AppTest) -> int:
    """How many points the loss chart on the page holds."""
    import pyarrow as pa

    (chart,) = at.get("vega_lite_chart")
    return pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().num_rows


def test_monitor_follows_a_running_run_and_survives_refresh(tmp_path: Path) -> None:
    from chattune.web.views.monitor import REFRESH_S, refresh_every

    ws = Workspace(tmp_path / "ws")
    run = _fake_run(ws, "live", finished=False)
    _fake_run(ws, "old", finished=True)
    assert refresh_every(ws.runs()) is None  # nothing running: no timer
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (run / "run.pid").write_text(str(sleeper.pid))
        assert refresh_every(ws.runs()) == REFRESH_S
        at = AppTest.from_string(
            "from chattune.web.views.monitor import page\npage()\n", default_timeout=TIMEOUT
        )
        at.session_state["workspace"] = str(ws.root)
        at.query_params["run"] = "live"  # a browser refresh keeps only the URL
        at.run()
        assert not at.exception, at.exception
        assert at.selectbox(key="pick_run").value == "live"
        assert at.subheader[0].value == "Run live — running"
        assert _chart_rows(at) == 5 and at.get("progress")[0].proto.text == "step 5"
        with (run / "trainer_log.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": 6, "loss": 0.3, "elapsed_s": 6, "eta_s": 4}) + "\n")
        at.run()  # what the fragment's timer does in the browser: read the files again
        assert _chart_rows(at) == 6 and at.get("progress")[0].proto.text == "step 6"
    finally:
        sleeper.kill()
        sleeper.wait()
    at.run()
    assert at.subheader[0].value == "Run live — failed"


def test_long_curves_are_thinned_keeping_the_first_and_last_step() -> None:
    import pandas as pd

    from chattune.web.views.monitor import thin

    curve = pd.DataFrame({"step": range(1, 5002), "train loss": range(5001)}).set_index("step")
    short = thin(curve, points=500)
    assert 400 <= len(short) <= 501
    assert short.index[0] == 1 and short.index[-1] == 5001 and short.index.is_monotonic_increasing
    assert thin(curve.head(300), points=500).equals(curve.head(300))  # short curves are left whole


def test_export_links_to_monitor_with_the_config_prefilled(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    store = LabelStore(ws.labels_path)
    store.set_status(store.add("q", output="a"), "accepted")
    at = _app("labeling", ws.root)
    at.selectbox(key="export_format").set_value("prompt_response").run()
    _button(at, "export").click().run()
    link = at.get("page_link")[0].proto
    assert link.page == "monitor" and "train_file=data%2Flabels-prompt_response.jsonl" in link.query_string

    at = AppTest.from_string("from chattune.web.views.monitor import page\npage()\n", default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(ws.root)
    at.query_params["train_file"] = "data/labels-prompt_response.jsonl"
    at.query_params["format"] = "prompt_response"
    at.run()
    config = at.text_area(key="new_run_config").value
    assert "train_file: data/labels-prompt_response.jsonl" in config and "format: prompt_response" in config
