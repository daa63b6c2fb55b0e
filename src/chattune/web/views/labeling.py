"""Labeling page: import with preview, browse and search, edit, accept / reject / next, counts, export."""

from __future__ import annotations

import inspect
import json
from typing import Any

import streamlit as st

from chattune.data.formats import FORMATS, Where
from chattune.data.schema import SourceRecord
from chattune.errors import DataFormatError
from chattune.infer.engine import Engine
from chattune.infer.generate import Sampling, reply_to
from chattune.label.records import EXPORT_FORMATS, STATUSES, LabelStoreError, Record, checked_tools
from chattune.label.store import LabelStore
from chattune.web import nav
from chattune.web.i18n import t
from chattune.web.models import load, pick_model, prompt_ids
from chattune.web.session import require_page
from chattune.web.workspace import Workspace, current

# Streamlit gained button shortcuts in 1.5x; older versions reject the keyword, so pass it only when known
_HAS_SHORTCUT = "shortcut" in inspect.signature(st.button).parameters
SHORTCUTS = {"accept": "Ctrl+Enter", "reject": "Ctrl+Shift+Enter", "next": "Ctrl+Shift+K"}
# the roles a stored message has (a tool call is one "tool" message holding its observation); shown through t()
ROLES = ("system", "user", "assistant", "tool", "observation")
AVATARS = {"system": ":material/settings:", "tool": ":material/build:", "observation": ":material/build:"}


def button(label: str, key: str, shortcut: str | None = None, **kwargs: Any) -> bool:
    """st.button with a keyboard shortcut where the installed Streamlit supports one."""
    if shortcut and _HAS_SHORTCUT:
        kwargs["shortcut"] = shortcut
    return st.button(label, key=key, **kwargs)


def author_name() -> str:
    """The labeler's name, typed once per browser session."""
    return st.sidebar.text_input(t("Your name"), key="author", help=t("recorded with each change you make"))


def prefill_model(ws: Workspace) -> tuple[tuple[str, str | None] | None, Sampling]:
    """The sidebar's choice of model (and reply length) for "prefill from model"."""
    st.sidebar.subheader(t("Prefill from model"))
    choice = pick_model(ws, prefix="prefill_")
    tokens = st.sidebar.slider(t("Max new tokens"), 8, 1024, 128, key="prefill_max_new_tokens")
    return choice, Sampling(max_new_tokens=tokens)  # greedy: a draft should not change from click to click


def draft_fields(engine: Engine, rec: Record, sampling: Sampling) -> dict[str, Any]:
    """The model's draft for a record: an instruction's output, or a conversation's closing assistant turn."""
    if rec.kind == "instruction":
        return {"output": reply_to(engine, prompt_ids(engine, rec.prompt_text()), sampling).display()}
    # the reply is drafted for what comes before the final assistant turns, which it replaces
    head = list(rec.messages)
    while head and head[-1].get("role") == "assistant":
        head.pop()
    if not head:
        raise ValueError(f"record {rec.id} has no user turn to answer")
    value = {"conversations": head} | ({"tools": rec.tools} if rec.tools else {})  # the model sees the tools
    where = Where(SourceRecord("label store", rec.id, value), require_target=False)
    conv = FORMATS.get("conversations")(value, where)
    reply = reply_to(engine, engine.template.encode_prompt(conv), sampling)
    return {"messages": [*head, {"role": "assistant", "content": reply.display()}]}


def show_counts(store: LabelStore, box: Any) -> None:
    """One metric per status, drawn into `box`."""
    counts = store.counts()
    for col, status in zip(box.columns(len(STATUSES)), STATUSES, strict=True):
        col.metric(t(status), counts[status])


def import_section(ws: Workspace, store: LabelStore, author: str) -> None:
    """Import a JSON/JSONL/CSV file from the workspace or an upload, after a preview."""
    with st.expander(t("Import records"), expanded=False):
        upload = st.file_uploader(t("Upload JSON, JSONL or CSV"), type=["json", "jsonl", "csv"], key="upload")
        if upload is not None:
            # uploads are copied into data/ so import reads a file in the workspace like any other
            target = ws.data_dir / upload.name.replace("/", "_")
            target.write_bytes(upload.getvalue())
            st.session_state["import_path"] = ws.relative(target)
        path_text = st.text_input(
            t("File in the workspace"), key="import_path", placeholder="data/records.jsonl"
        )
        preview_col, import_col = st.columns(2)
        if preview_col.button(t("Preview"), key="preview") and path_text:
            try:
                pv = store.preview_file(ws.resolve(path_text))
            except (ValueError, LabelStoreError, OSError) as e:
                st.error(str(e))
            else:
                st.write(t("{total} records read: {shown} shown, {duplicates} duplicates, {unreadable} unreadable",
                           total=pv.total, shown=len(pv.rows), duplicates=pv.duplicates,
                           unreadable=len(pv.errors)))  # fmt: skip
                st.dataframe([_row_view(r) for r in pv.rows], width="stretch")
                for err in pv.errors[:5]:
                    st.warning(err)
        if import_col.button(t("Import"), key="import", type="primary") and path_text:
            try:
                rep = store.import_file(ws.resolve(path_text), author=author)
            except (ValueError, LabelStoreError, OSError) as e:
                st.error(str(e))
            else:
                st.success(t("imported {added} records; {duplicates} duplicates skipped; {unreadable} unreadable",
                             added=rep.added, duplicates=rep.duplicates, unreadable=len(rep.errors)))  # fmt: skip


def _row_view(row: dict[str, Any]) -> dict[str, Any]:
    """A preview row with its column names in the page's language (the kind too: it is shown, not stored)."""
    if row.get("kind") == "conversation":
        return {
            t("kind"): t("conversation"),
            t("instruction"): json.dumps(row["messages"], ensure_ascii=False)[:200],
        }
    return {t("kind"): t(row.get("kind", "instruction"))} | {
        t(k): row.get(k, "") for k in ("instruction", "input", "output", "status")
    }


def add_section(store: LabelStore, author: str) -> None:
    """Write a new instruction record by hand."""
    with st.expander(t("New record"), expanded=False):
        instruction = st.text_area(t("Instruction"), key="new_instruction")
        extra = st.text_area(t("Input (optional)"), key="new_input")
        output = st.text_area(t("Output"), key="new_output")
        if st.button(t("Add"), key="add") and instruction.strip():
            rid = store.add(instruction, extra, output, author=author)
            st.session_state["current_id"] = rid
            st.success(t("added record {id}", id=rid))


def browse_section(store: LabelStore) -> list[Record]:
    """Filter and search; shows the matching records and returns them."""
    col_status, col_search = st.columns([1, 2])
    status = col_status.selectbox(t("Status"), ["all", *STATUSES], key="filter_status", format_func=t)
    search = col_search.text_input(t("Search"), key="search")
    records = store.list(status=None if status == "all" else status, search=search or None, limit=500)
    st.dataframe(
        [{t("id"): r.id, t("status"): t(r.status), t("kind"): t(r.kind), t("text"): r.prompt_text()[:80]
          if r.kind == "instruction" else json.dumps(r.messages, ensure_ascii=False)[:80], t("author"): r.author}
         for r in records],
        width="stretch", hide_index=True, height=200,
    )  # fmt: skip
    return records


def _next_id(store: LabelStore, records: list[Record], after: int | None) -> int | None:
    """The next pending record after `after` (wrapping), else the next listed record."""
    pending = [r.id for r in store.list(status="pending", limit=1000)]
    for ids in (pending, [r.id for r in records]):
        later = [i for i in ids if after is None or i > after]
        if later or ids:
            return (later or ids)[0]
    return None


def _picked() -> None:
    st.session_state["current_id"] = st.session_state["pick_id"]


def prefill(store: LabelStore, rec: Record, model: tuple[str, str | None] | None, sampling: Sampling,
            author: str) -> Record:  # fmt: skip
    """Draft the record's output with the chosen model and save it as a draft; returns the record as stored."""
    if model is None:
        st.error(t("choose a model for “prefill from model” in the sidebar"))
        return rec
    engine = load(*model)
    if engine is None:
        return rec
    try:
        with st.spinner(t("drafting with the model…")):
            fields = draft_fields(engine, rec, sampling)
    except (DataFormatError, ValueError) as e:
        st.error(t("cannot prefill record {id}: {error}", id=rec.id, error=e))
        return rec
    rec = store.update(rec.id, **fields, status="draft", author=author)
    # the editors are drawn after this, so their state can still be set to show the draft
    if rec.kind == "instruction":
        st.session_state[f"ed_output_{rec.id}"] = rec.output
    else:
        load_messages(rec.id, rec.messages)
    st.toast(t("record {id}: drafted by {model}", id=rec.id, model=engine.name))
    return rec


def _json_key(rid: int) -> str:
    return f"ed_messages_{rid}"


def _message_key(rid: int, i: int) -> str:
    return f"ed_message_{rid}_{i}"


def _dumps(messages: Any) -> str:
    return json.dumps(messages, ensure_ascii=False, indent=1)  # Chinese stays readable and unchanged


def _message_list(text: str) -> list[dict[str, Any]] | None:
    """The messages in the JSON editor's text, or None when it is not a JSON list of objects."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else None


def load_messages(rid: int, messages: list[dict[str, Any]]) -> None:
    """Show `messages` in record `rid`'s editors (the JSON text and one box per message with text)."""
    st.session_state[_json_key(rid)] = _dumps(messages)
    for i, m in enumerate(messages):
        if isinstance(m.get("content"), str):
            st.session_state[_message_key(rid, i)] = m["content"]


def _json_edited(rid: int) -> None:
    """The JSON was edited: the message boxes follow it (when it parses)."""
    messages = _message_list(st.session_state[_json_key(rid)])
    if messages is not None:
        load_messages(rid, messages)


def _message_edited(rid: int, i: int) -> None:
    """One message's text was edited: write it into the JSON, leaving the message's other fields as they are."""
    messages = _message_list(st.session_state[_json_key(rid)])
    if messages is not None and i < len(messages):
        messages[i] = messages[i] | {"content": st.session_state[_message_key(rid, i)]}
        st.session_state[_json_key(rid)] = _dumps(messages)


def _message_box(rid: int, i: int, m: dict[str, Any]) -> None:
    """One message as a chat turn: its role, its text to edit, and its other fields (tool calls) as they are."""
    role = str(m.get("role", ""))
    shown_role = t(role) if role in ROLES else role
    with st.chat_message(role or "?", avatar=AVATARS.get(role)):
        st.caption(shown_role)
        if isinstance(m.get("content"), str):
            key = _message_key(rid, i)
            if key not in st.session_state:
                st.session_state[key] = m["content"]
            # tall enough for the text (long lines wrap) so a turn reads without scrolling, up to a limit
            lines = st.session_state[key].count("\n") + 1 + len(st.session_state[key]) // 100
            st.text_area(t("Message {n} ({role})", n=i + 1, role=shown_role), key=key,
                         height=min(max(68, 26 * lines + 16), 300), label_visibility="collapsed",
                         on_change=_message_edited, args=(rid, i))  # fmt: skip
        if other := {k: v for k, v in m.items() if k not in ("role", "content")}:
            st.caption(t("more fields, kept as they are (change them under “Edit as JSON”): {fields}",
                         fields=", ".join(other)))  # fmt: skip
            # a tool call has no text of its own: its fields are the message, so they show open
            st.json(other, expanded=not isinstance(m.get("content"), str))


def conversation_editor(rec: Record) -> dict[str, Any]:
    """A conversation's messages as chat turns, each text editable, over its JSON (for adding or removing
    messages and changing tool calls); returns the fields to save ({} when the JSON does not parse).

    The JSON text is what is saved: editing a message's box writes into it, and editing it redraws the boxes,
    so the two never disagree."""
    if _json_key(rec.id) not in st.session_state:
        load_messages(rec.id, rec.messages)
    messages = _message_list(st.session_state[_json_key(rec.id)])
    if messages is None:
        st.warning(t("The messages cannot be shown one by one: fix their JSON under “Edit as JSON”."))
    else:
        for i, m in enumerate(messages):
            _message_box(rec.id, i, m)
    with st.expander(t("Edit as JSON")):
        text = st.text_area(t("Messages (JSON)"), key=_json_key(rec.id), height=250,
                            on_change=_json_edited, args=(rec.id,))  # fmt: skip
    try:
        return {"messages": json.loads(text)}
    except json.JSONDecodeError as e:
        st.error(t("not valid JSON: {error}", error=e))
        return {}


def editor_section(
    store: LabelStore,
    records: list[Record],
    author: str,
    model: tuple[str, str | None] | None = None,
    sampling: Sampling | None = None,
    can_prefill: bool = True,
) -> None:
    """Edit the current record and decide on it."""
    # offered before anything else, so it is there even when the deleted record was the last one listed
    if st.session_state.get("last_deleted") is not None and button(
        t("Undo delete of record {id}", id=st.session_state["last_deleted"]), "undo"
    ):
        st.session_state["current_id"] = st.session_state.pop("last_deleted")
        store.undo_delete(st.session_state["current_id"])
        st.rerun()
    ids = [r.id for r in records]
    cur = st.session_state.get("current_id")
    if cur not in ids:
        cur = _next_id(store, records, None) if records else None
        cur = cur if cur in ids else (ids[0] if ids else None)
    if cur is None:
        st.info(t("No records match. Import a file or add one."))
        return
    # the picker's own state must follow moves made by buttons; a widget's state may only be set before it is drawn
    st.session_state["pick_id"] = cur
    cur = st.selectbox(t("Record"), ids, key="pick_id", on_change=_picked)
    st.session_state["current_id"] = cur
    rec = store.get(cur)
    if can_prefill and button(  # admins only: choosing and loading models is theirs
        t("Prefill from model"),
        f"prefill_{rec.id}",
        help=t("draft the output with the model chosen in the sidebar"),
    ):
        rec = prefill(store, rec, model, sampling or Sampling(), author)
    st.caption(t("record {id} · {kind} · {status} · by {author}", id=rec.id, kind=t(rec.kind), status=t(rec.status),
                 author=rec.author or "—"))  # fmt: skip
    # widget keys carry the id, so moving to another record shows its text rather than the old edits
    if rec.kind == "instruction":
        fields = {
            "instruction": st.text_area(t("Instruction"), rec.instruction, key=f"ed_instruction_{rec.id}"),
            "input": st.text_area(t("Input"), rec.input, key=f"ed_input_{rec.id}"),
            "output": st.text_area(t("Output"), rec.output, key=f"ed_output_{rec.id}", height=150),
        }
    else:
        fields = conversation_editor(rec)
        if rec.tools:  # a tool-use conversation: its tool definitions, editable beside the messages
            tools_text = st.text_area(t("Tools (JSON)"), json.dumps(rec.tools, ensure_ascii=False, indent=1),
                                      key=f"ed_tools_{rec.id}", height=150)  # fmt: skip
            try:
                tools = checked_tools(json.loads(tools_text))
            except (ValueError, LabelStoreError) as e:  # JSONDecodeError is a ValueError
                st.error(t("tools: {error}", error=e))
                fields = {}
            else:
                fields = fields and fields | {"tools": tools}
    # two rows: a shortcut hint takes room, and a narrow column would hide the button's own label
    decide, manage = st.columns(3), st.columns(2)
    action = None
    with decide[0]:
        if button(t("Accept"), f"accept_{rec.id}", SHORTCUTS["accept"], type="primary", width="stretch"):
            action = "accepted"
    with decide[1]:
        if button(t("Reject"), f"reject_{rec.id}", SHORTCUTS["reject"], width="stretch"):
            action = "rejected"
    with decide[2]:
        go_next = button(t("Next"), f"next_{rec.id}", SHORTCUTS["next"], width="stretch")
    with manage[0]:
        if button(t("Save draft"), f"draft_{rec.id}", width="stretch"):
            action = "draft"
    with manage[1]:
        if button(t("Delete"), f"delete_{rec.id}", width="stretch"):
            store.delete(rec.id)
            st.session_state["last_deleted"] = rec.id
            st.session_state["current_id"] = _next_id(store, records, rec.id)
            st.rerun()
    if action is not None and fields:
        store.update(rec.id, **fields, status=action, author=author)
        st.toast(t("record {id}: {status}", id=rec.id, status=t(action)))
        go_next = True
    if go_next:
        st.session_state["current_id"] = _next_id(store, records, rec.id)
        st.rerun()


def export_section(ws: Workspace, store: LabelStore, can_train: bool = True) -> None:
    """Export accepted records as training data."""
    st.subheader(t("Export accepted records"))
    col_fmt, col_path = st.columns([1, 2])
    fmt = col_fmt.selectbox(t("Format"), EXPORT_FORMATS, key="export_format")
    path_text = col_path.text_input(t("Output file"), f"data/labels-{fmt}.jsonl", key=f"export_path_{fmt}")
    if st.button(t("Export"), key="export"):
        try:
            rep = store.export(ws.resolve(path_text), fmt)
        except (ValueError, LabelStoreError, OSError) as e:
            st.error(str(e))
        else:
            written = t(
                "exported {n} records to {path}", n=rep.written, path=ws.relative(ws.resolve(path_text))
            )
            st.success(written + (t("; skipped {n}", n=rep.skipped) if rep.skipped else ""))
            for reason in rep.reasons:
                st.warning(reason)
            # "train on this": the monitor page reads this prefill when it builds its config editor
            st.session_state["prefill_train_file"] = ws.relative(ws.resolve(path_text))
            st.session_state["prefill_format"] = fmt
    if can_train and (train_file := st.session_state.get("prefill_train_file")):
        # the prefill also rides in the URL, so the monitor opened in a new tab or refreshed still has it
        st.page_link(nav.link("monitor"), label=t("Train on this: {file} →", file=train_file), icon=":material/model_training:",
                     query_params={"train_file": train_file, "format": st.session_state.get("prefill_format", "auto")})  # fmt: skip


def page() -> None:
    """The labeling page."""
    ws = current()
    admin = require_page(ws, "labeling") == "admin"
    st.title(t("Labeling"))
    store = ws.store()
    author = author_name()
    model, sampling = prefill_model(ws) if admin else (None, Sampling())
    counts_box = st.container()  # drawn last, so the counts include this run's changes
    import_section(ws, store, author)
    add_section(store, author)
    records = browse_section(store)
    editor_section(store, records, author, model, sampling, can_prefill=admin)
    export_section(ws, store, can_train=admin)
    show_counts(store, counts_box)
