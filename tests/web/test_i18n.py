"""The web app in English and Simplified Chinese: no page shows a string that bypasses t(), every t()
string has a Chinese translation with the same placeholders, and each page renders in both languages."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the web extra (streamlit) is not installed")
from streamlit.testing.v1 import AppTest

import chattune.web
from chattune.label.records import STATUSES
from chattune.label.store import LabelStore
from chattune.web.auth import PAGES
from chattune.web.i18n import LANGUAGE_KEY, ZH
from chattune.web.nav import TITLES
from chattune.web.views.labeling import ROLES
from chattune.web.views.playground import MODES
from chattune.web.workspace import Workspace

TIMEOUT = 60
WEB = Path(chattune.web.__file__).parent
SOURCES = sorted(WEB.rglob("*.py"))

# Streamlit functions whose first positional argument is text the user reads (a label, a body, a title).
# They are matched by attribute name on any receiver (st, st.sidebar, a column, a container, `sb`).
LABELLED = {
    "title", "header", "subheader", "caption", "markdown", "write", "text", "info", "success", "warning",
    "error", "exception", "toast", "button", "form_submit_button", "download_button", "link_button",
    "text_input", "text_area", "selectbox", "multiselect", "radio", "toggle", "checkbox", "slider",
    "select_slider", "number_input", "date_input", "time_input", "color_picker", "file_uploader",
    "expander", "popover", "status", "metric", "chat_input", "spinner", "tabs",
}  # fmt: skip
LABEL_ONLY_BY_KEYWORD = {"page_link", "progress"}  # their first argument is a page or a number
# keyword arguments that are text the user reads, on any of the functions above
TEXT_KEYWORDS = {"label", "body", "help", "placeholder", "text"}
# functions with a list of options: a literal list shown as is would be untranslated
WITH_OPTIONS = {"selectbox", "multiselect", "radio", "select_slider", "segmented_control", "pills"}
# the pages' own wrappers around Streamlit elements (labeling.button adds a keyboard shortcut)
LOCAL_WRAPPERS = {"button"}
# literals that may be shown as they are, the same in every language
ALLOWED = {
    "chattune",  # the app's name (sign-in title)
    "data/records.jsonl",  # an example path in the import box's placeholder
}

# values the pages pass to t() from variables (not literals): each needs a translation too
RUN_STATUSES = ("running", "finished", "failed", "stopped", "new")  # workspace.RunInfo.status
DYNAMIC = {
    *STATUSES,  # label statuses: metrics, the status filter (with "all"), captions, toasts
    "all",
    *MODES,  # the playground's mode radio (format_func=t)
    *TITLES.values(),  # page titles in the navigation
    *PAGES,  # roles: "signed in as {role}"
    *RUN_STATUSES,
    "instruction",  # record kinds, and the preview's column names
    "conversation",
    "input",
    "output",
    "status",
    "correct",  # playground verdicts
    "wrong",
    *ROLES,  # message roles in the labeling editor
}


def _is_t_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "t"


def _raw_literal(node: ast.AST) -> str | None:
    """The literal text in `node` that reaches the page without t(), if any (calls other than "...".format
    are taken as already handled: t(...), str(e), a helper's result)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if node.value.strip() and node.value not in ALLOWED else None
    if isinstance(node, ast.JoinedStr):
        return ast.unparse(node)
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Constant):
            return ast.unparse(node)  # "literal {}".format(...)
        return None
    if isinstance(node, ast.BinOp):
        return _raw_literal(node.left) or _raw_literal(node.right)
    if isinstance(node, ast.BoolOp):
        return next(filter(None, map(_raw_literal, node.values)), None)
    if isinstance(node, ast.IfExp):
        return _raw_literal(node.body) or _raw_literal(node.orelse)
    if isinstance(node, (ast.List, ast.Tuple)):
        return next(filter(None, map(_raw_literal, node.elts)), None)
    return None


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name) and call.func.id in LOCAL_WRAPPERS:
        return call.func.id
    return None


def untranslated(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` where a Streamlit element gets a user-visible literal instead of t(...)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or (name := _callee(node)) is None:
            continue
        if name not in LABELLED | LABEL_ONLY_BY_KEYWORD | LOCAL_WRAPPERS:
            continue
        shown = [kw.value for kw in node.keywords if kw.arg in TEXT_KEYWORDS]
        if node.args and name not in LABEL_ONLY_BY_KEYWORD:
            shown.append(node.args[0])
        for arg in shown:
            if (text := _raw_literal(arg)) is not None:
                found.append(f"{filename}:{node.lineno} {name}(): {text!r}")
        options = node.args[1] if len(node.args) > 1 else None
        options = next((kw.value for kw in node.keywords if kw.arg == "options"), options)
        if (
            name in WITH_OPTIONS
            and options is not None
            and _raw_literal(options) is not None
            and not any(kw.arg == "format_func" for kw in node.keywords)
        ):
            found.append(f"{filename}:{node.lineno} {name}() options without format_func")
    return found


def _t_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if _is_t_call(node):
                calls.append((f"{path.relative_to(WEB)}:{node.lineno}", node))
    return calls


def _placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


# ---------------------------------------------------------------- static checks


def test_the_check_finds_literals_and_accepts_t() -> None:
    bad = """
st.title("Hello")
st.sidebar.button(f"Go {x}", key="go")
col.metric("count", 3)
st.page_link(page, label="Open →")
st.info("a" + b)
st.text_input(t("Name"), help="typed once")
st.radio(t("Mode"), ["a", "b"])
button("Accept", "accept")
st.markdown(x or "*(empty)*")
"""
    good = """
st.title(t("Hello"))
st.sidebar.button(t("Go {x}", x=x), key="go")
col.metric(t(status), 3)
st.page_link(page, label=t("Open →"))
st.error(str(e))
st.radio(t("Mode"), ["a", "b"], format_func=t)
st.title("chattune")
st.chat_message("assistant")
st.text_area(t("Prompt"), "", key="p")
"""
    flagged = {int(hit.split(":")[1].split()[0]) for hit in untranslated(bad)}
    assert flagged == set(range(2, 11)), untranslated(bad)  # every line of `bad`
    assert untranslated(good) == []


def test_pages_show_no_literal_strings() -> None:
    found = [hit for path in SOURCES for hit in untranslated(path.read_text(encoding="utf-8"), str(path))]
    assert not found, "wrap these in t():\n" + "\n".join(found)


def test_every_t_string_has_a_translation_with_the_same_placeholders() -> None:
    literals = {}
    for where, call in _t_calls():
        if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
            text = call.args[0].value
            literals[text] = where
            given = {kw.arg for kw in call.keywords}
            assert given == _placeholders(text), f"{where}: t({text!r}) is given {sorted(given)}"
    missing = sorted(text for text in {*literals, *DYNAMIC} if text not in ZH)
    assert not missing, f"no Chinese for: {missing}"
    for english, chinese in ZH.items():
        assert _placeholders(chinese) == _placeholders(english), (
            f"placeholders differ: {english!r} / {chinese!r}"
        )
    unused = sorted(set(ZH) - set(literals) - DYNAMIC)
    assert not unused, f"translations no page asks for: {unused}"


# ---------------------------------------------------------------- the pages in both languages


def _page(page: str, ws: Path, language: str, **state: object) -> AppTest:
    at = AppTest.from_string(f"from chattune.web.views.{page} import page\npage()\n", default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(ws)
    at.session_state[LANGUAGE_KEY] = language
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def _workspace_with_content(root: Path) -> Workspace:
    """A workspace with a record of each kind and a finished run, so the pages draw most of what they have."""
    ws = Workspace(root)
    store = LabelStore(ws.labels_path)
    store.add("法国的首都是哪里？", output="巴黎")
    store.add(
        messages=[{"role": "user", "content": "天气？"}, {"role": "assistant", "content": "晴。"}],
        tools=[{"name": "get_weather", "parameters": {}}],
    )
    run = ws.runs_dir / "done"
    (run / "final").mkdir(parents=True)
    (run / "trainer_log.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    (run / "config.yaml").write_text("model: x\n")
    return ws


@pytest.mark.parametrize("page", ["labeling", "monitor", "playground"])
def test_each_page_in_chinese_and_english(tmp_path: Path, page: str) -> None:
    ws = _workspace_with_content(tmp_path / "ws")
    zh = _page(page, ws.root, "zh")
    assert not zh.exception, zh.exception
    assert zh.title[0].value == ZH[TITLES[page]]
    en = _page(page, ws.root, "en")
    assert not en.exception, en.exception
    assert en.title[0].value == TITLES[page]


def test_chinese_pages_translate_what_they_draw(tmp_path: Path) -> None:
    ws = _workspace_with_content(tmp_path / "ws")
    at = _page("labeling", ws.root, "zh")
    assert "记录 1 · 指令 · 待处理" in at.caption[0].value
    assert [b.label for b in at.button if b.key == "accept_1"] == ["接受"]
    assert [m.label for m in at.metric] == ["待处理", "草稿", "已接受", "已拒绝"]
    assert at.selectbox(key="filter_status").options == ["全部", "待处理", "草稿", "已接受", "已拒绝"]
    # only the display is translated: the value stays the identifier. AppTest calls format_func outside the
    # page's run, where t() cannot see the session's language, so in Chinese the tests read values and start
    # a fresh run where they would set one
    assert at.selectbox(key="filter_status").value == "all"
    at = _page("labeling", ws.root, "zh", current_id=2)  # the conversation: its turns labelled by role
    assert not at.exception, at.exception
    assert {"用户", "助手"} <= {c.value for c in at.caption}
    assert at.text_area(key="ed_message_2_0").value == "天气？"
    assert at.expander[-1].label == "以 JSON 编辑"

    at = _page("monitor", ws.root, "zh")
    assert at.subheader[0].value == "训练任务 done — 已完成"
    assert list(at.dataframe[0].value.columns) == [
        "训练任务",
        "状态",
        "进度",
        "步数",
        "预计剩余时间",
        "最新损失",
    ]

    at = _page("playground", ws.root, "zh")
    assert at.radio(key="mode").options == ["对话", "工具", "原始生成", "并排对比"]
    assert at.selectbox(key="adapter").options[0] == "（无：仅使用基座模型）"
    assert at.radio(key="mode").value == "chat"


def test_the_app_follows_the_language_switch(tmp_path: Path) -> None:
    from chattune.web import app

    at = AppTest.from_file(app.__file__, default_timeout=TIMEOUT)
    at.session_state["workspace"] = str(tmp_path / "ws")
    at.run()
    assert not at.exception and at.title[0].value == "Labeling"  # AppTest's browser has no Chinese locale
    at.selectbox(key="language_pick").set_value("zh").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "标注" and at.session_state[LANGUAGE_KEY] == "zh"
    assert at.selectbox(key="language_pick").label == "语言"
