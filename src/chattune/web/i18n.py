"""The web app's languages: English (the source strings) and Simplified Chinese.

Every string a page shows goes through `t("English text", name=value)`: the English text is the key, the
Chinese table below its translation (`{name}` placeholders are filled after the lookup, so word order may
change). The language comes from the browser (`st.context.locale`) until the user picks one in the sidebar; the pick is
kept in a cookie.
tests/web/test_i18n.py fails when a page shows a literal string without `t()` or a `t()` string has no
translation. CLI messages stay English.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from chattune.web.cookies import read_cookie, set_cookie

LANGUAGES = {"en": "English", "zh": "简体中文"}
LANGUAGE_KEY = "ui_language"
LANGUAGE_COOKIE = "chattune_language"
LANGUAGE_COOKIE_S = 365 * 24 * 3600

ZH: dict[str, str] = {
    # app and sign-in
    "Language": "语言",
    "Sign in": "登录",
    "Sign out": "退出登录",
    "Access token": "访问令牌",
    "This app is shared on the network: sign in with the token `chattune web` printed when it started.": (
        "此应用在网络上共享：请使用 `chattune web` 启动时打印的令牌登录。"
    ),
    "That token is not valid.": "令牌无效。",
    "Your session has expired: sign in again.": "会话已过期，请重新登录。",
    "signed in as {role}": "已登录：{role}",
    "admin": "管理员",
    "annotator": "标注员",
    "workspace: {root}": "工作区：{root}",
    "This page is for admins: annotators label data on the Labeling page.": (
        "此页面仅限管理员：标注员请在“标注”页面标注数据。"
    ),
    "This server listens on {address} but has no login set up: start it with `chattune web`.": (
        "此服务器监听 {address}，但未设置登录：请使用 `chattune web` 启动。"
    ),
    "Labeling": "标注",
    "Training monitor": "训练监控",
    "Playground": "试用",
    # labeling page
    "Your name": "你的名字",
    "recorded with each change you make": "会随你的每次修改一起记录",
    "Prefill from model": "用模型预填",
    "Max new tokens": "最大新生成 token 数",
    "pending": "待处理",
    "draft": "草稿",
    "accepted": "已接受",
    "rejected": "已拒绝",
    "all": "全部",
    "instruction": "指令",
    "conversation": "对话",
    "Import records": "导入记录",
    "Upload JSON, JSONL or CSV": "上传 JSON、JSONL 或 CSV 文件",
    "File in the workspace": "工作区中的文件",
    "Preview": "预览",
    "Import": "导入",
    "{total} records read: {shown} shown, {duplicates} duplicates, {unreadable} unreadable": (
        "共读取 {total} 条记录：显示 {shown} 条，重复 {duplicates} 条，无法读取 {unreadable} 条"
    ),
    "imported {added} records; {duplicates} duplicates skipped; {unreadable} unreadable": (
        "已导入 {added} 条记录；跳过重复 {duplicates} 条；无法读取 {unreadable} 条"
    ),
    "kind": "类型",
    "input": "输入",
    "output": "输出",
    "status": "状态",
    "id": "编号",
    "text": "内容",
    "author": "标注人",
    "New record": "新建记录",
    "Instruction": "指令",
    "Input (optional)": "输入（可选）",
    "Output": "输出",
    "Add": "添加",
    "added record {id}": "已添加记录 {id}",
    "Status": "状态",
    "Search": "搜索",
    "choose a model for “prefill from model” in the sidebar": "请先在侧边栏为“用模型预填”选择模型",
    "drafting with the model…": "模型正在起草…",
    "cannot prefill record {id}: {error}": "无法预填记录 {id}：{error}",
    "record {id}: drafted by {model}": "记录 {id}：已由 {model} 起草",
    "Undo delete of record {id}": "撤销删除记录 {id}",
    "No records match. Import a file or add one.": "没有匹配的记录。请导入文件或新建一条。",
    "Record": "记录",
    "draft the output with the model chosen in the sidebar": "用侧边栏中选择的模型起草输出",
    "record {id} · {kind} · {status} · by {author}": "记录 {id} · {kind} · {status} · 标注人 {author}",
    "Input": "输入",
    "Messages (JSON)": "消息（JSON）",
    "system": "系统",
    "user": "用户",
    "assistant": "助手",
    "observation": "工具返回结果",
    "Message {n} ({role})": "第 {n} 条消息（{role}）",
    "more fields, kept as they are (change them under “Edit as JSON”): {fields}": (
        "其他字段保持不变（可在“以 JSON 编辑”中修改）：{fields}"
    ),
    "The messages cannot be shown one by one: fix their JSON under “Edit as JSON”.": (
        "无法逐条显示消息：请在“以 JSON 编辑”中修正其 JSON。"
    ),
    "Edit as JSON": "以 JSON 编辑",
    "not valid JSON: {error}": "不是有效的 JSON：{error}",
    "Tools (JSON)": "工具（JSON）",
    "tools: {error}": "工具：{error}",
    "Accept": "接受",
    "Reject": "拒绝",
    "Next": "下一条",
    "Save draft": "保存草稿",
    "Delete": "删除",
    "record {id}: {status}": "记录 {id}：{status}",
    "Export accepted records": "导出已接受的记录",
    "Format": "格式",
    "Output file": "输出文件",
    "Export": "导出",
    "exported {n} records to {path}": "已导出 {n} 条记录到 {path}",
    "; skipped {n}": "；跳过 {n} 条",
    "Train on this: {file} →": "用它训练：{file} →",
    # training monitor page
    "run": "训练任务",
    "progress": "进度",
    "step": "步数",
    "ETA": "预计剩余时间",
    "last loss": "最新损失",
    "running": "运行中",
    "finished": "已完成",
    "failed": "失败",
    "stopped": "已停止",
    "new": "未开始",
    "Run {name} — {status}": "训练任务 {name} — {status}",
    "step {step}": "第 {step} 步",
    "train loss": "训练损失",
    "eval loss": "验证损失",
    "Metrics": "指标",
    "no loss logged yet": "尚未记录损失",
    "Stop": "停止",
    "Resume": "继续训练",
    "Refresh": "刷新",
    "Chat with {adapter} in the playground →": "在试用页面与 {adapter} 对话 →",
    "log (last lines)": "日志（最后几行）",
    "(no log)": "（暂无日志）",
    "Config": "配置",
    "Start a run": "启动训练任务",
    "Run name": "任务名称",
    "Config (YAML)": "配置（YAML）",
    "Validate": "校验",
    "Start": "启动",
    "started run {name} (pid {pid}); output in {output}": "已启动训练任务 {name}（pid {pid}）；输出目录：{output}",
    "config is valid: {method} on {model}, output in {output}": (
        "配置有效：在 {model} 上使用 {method} 训练，输出目录：{output}"
    ),
    "Run": "训练任务",
    "No runs yet in this workspace: start one below.": "此工作区还没有训练任务：请在下方启动一个。",
    # playground page
    "loading the model…": "正在加载模型…",
    "could not load the model: {error}": "无法加载模型：{error}",
    "Sample (off: greedy)": "采样（关闭时为贪心解码）",
    "Temperature": "温度",
    "Top p": "Top p",
    "Seed": "随机种子",
    "Base model": "基座模型",
    "a model directory inside the workspace, or a hub id / alias": "工作区内的模型目录，或 Hub 上的模型 ID / 别名",
    "Adapter": "适配器",
    "(none: base model only)": "（无：仅使用基座模型）",
    "sent to labeling as record {id}": "已作为记录 {id} 发送到标注",
    "Was the last answer right?": "上一条回答正确吗？",
    "Correction (the answer it should have given)": "更正（它本应给出的回答）",
    "Correct": "正确",
    "Wrong": "错误",
    "type the answer it should have given in Correction, then press Wrong": (
        "请先在“更正”中输入它本应给出的回答，再点击“错误”"
    ),
    "correct": "正确",
    "wrong": "错误",
    "marked {verdict}; label record {id}": "已标记为“{verdict}”；标注记录 {id}",
    "System prompt": "系统提示词",
    "Retry": "重试",
    "Clear": "清空",
    "Send to labeling": "发送到标注",
    "Message the model": "给模型发消息",
    "tool": "工具",
    "**observation** from `{tool}`": "来自 `{tool}` 的**工具返回结果**",
    "**tool call:** `{name}`": "**工具调用：** `{name}`",
    "Tools (JSON list of tool definitions)": "工具（JSON 格式的工具定义列表）",
    "tools offered: {names}": "可用工具：{names}",
    "Observation for {name} (what the tool returned)": "{name} 的工具返回结果（工具返回的内容）",
    "Send observation": "发送工具返回结果",
    "the reply looks like a tool call but does not parse: {error}": "回复看起来像工具调用，但无法解析：{error}",
    "Prompt": "提示词",
    "Generate": "生成",
    "Choose an adapter in the sidebar: side by side compares the base model with base + adapter.": (
        "请在侧边栏选择适配器：并排对比会比较基座模型与“基座模型 + 适配器”的回答。"
    ),
    "Ask both": "同时提问",
    "prompt: {prompt}": "提示词：{prompt}",
    "Tuned (base + adapter)": "微调后（基座模型 + 适配器）",
    "*(empty reply)*": "*（空回复）*",
    "Mode": "模式",
    "chat": "对话",
    "raw generate": "原始生成",
    "side by side": "并排对比",
    "Load the model": "加载模型",
    "Choose a base model and adapter in the sidebar, then switch on “Load the model”.": (
        "请在侧边栏选择基座模型和适配器，然后打开“加载模型”。"
    ),
    "model: {name}": "模型：{name}",
    "{model} uses template 'raw' (no roles): use raw generate, or a chat model for {mode}": (
        "{model} 使用 'raw' 模板（没有角色）：请使用“原始生成”，或换用对话模型进行“{mode}”"
    ),
}


def language() -> str:
    """The session's language: the user's pick, else the browser's (Chinese for any zh locale), else English."""
    picked = st.session_state.get(LANGUAGE_KEY) or read_cookie(LANGUAGE_COOKIE)
    if picked in LANGUAGES:
        return picked
    locale = (st.context.locale or "").lower()
    return "zh" if locale.startswith("zh") else "en"


def t(text: str, **values: Any) -> str:
    """`text` in the session's language, with `{name}` placeholders filled from `values`."""
    translated = ZH.get(text, text) if language() == "zh" else text
    return translated.format(**values) if values else translated


def language_switch() -> None:
    """The sidebar's language picker; starts at the browser's language."""
    codes = list(LANGUAGES)
    current = language()
    chosen = st.sidebar.selectbox(
        t("Language"),
        codes,
        index=codes.index(current),
        format_func=LANGUAGES.__getitem__,
        key="language_pick",
    )
    if st.session_state.pop("language_cookie", False):
        set_cookie(LANGUAGE_COOKIE, current, LANGUAGE_COOKIE_S)  # drawn after the rerun, which keeps it
    if chosen != current:
        st.session_state[LANGUAGE_KEY] = chosen
        st.session_state["language_cookie"] = True  # a reload or a page opened by address keeps the pick
        st.rerun()
