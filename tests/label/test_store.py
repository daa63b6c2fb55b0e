"""The label store: import/edit/export round trip, concurrent writers, a writer killed mid-transaction."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from chattune.data.formats import read_samples
from chattune.data.schema import Conversation, Pair
from chattune.errors import ChattuneError
from chattune.label.db import SCHEMA_VERSION, migrate
from chattune.label.records import LabelStoreError
from chattune.label.store import LabelStore


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_import_edit_export_round_trip(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite")
    src = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"instruction": "Capital of France?", "input": "", "output": "Paris"},
            {"instruction": "Add", "input": "2 + 2", "output": "4"},
            {"instruction": "Capital of France?", "input": "", "output": "Paris"},  # duplicate in the file
            {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"nonsense": 1},
        ],
    )
    preview = store.preview_file(src)
    assert (
        preview.total == 5 and len(preview.rows) == 4 and preview.duplicates == 1 and len(preview.errors) == 1
    )
    assert store.counts()["pending"] == 0  # preview adds nothing

    report = store.import_file(src, author="ann")
    assert (report.added, report.duplicates, len(report.errors)) == (3, 1, 1)
    again = store.import_file(src)
    assert (again.added, again.duplicates) == (0, 4)  # re-importing is reported, not re-added

    first, second, conv = (store.get(i) for i in report.ids)
    assert first.kind == "instruction" and conv.kind == "conversation" and first.author == "ann"
    store.update(second.id, output="four")
    store.set_status(first.id, "accepted", "bob")
    store.set_status(second.id, "accepted", "bob")
    store.set_status(conv.id, "rejected", "bob")
    assert store.counts() == {"pending": 0, "draft": 0, "accepted": 2, "rejected": 1}
    assert store.get(first.id).author == "bob"
    assert [r.id for r in store.list(search="four")] == [second.id]
    assert [r.id for r in store.list(status="rejected")] == [conv.id]

    store.delete(first.id)
    assert store.counts()["accepted"] == 1
    with pytest.raises(LabelStoreError):
        store.get(first.id)
    store.undo_delete(first.id)
    assert store.get(first.id).status == "accepted"

    for fmt, kind in [("conversations", Conversation), ("prompt_response", Pair), ("context_target", Pair)]:
        out = tmp_path / f"{fmt}.jsonl"
        exported = store.export(out, fmt)
        assert exported.written == 2
        samples = [s for _, s in read_samples(out)]  # what `chattune train` reads
        assert len(samples) == 2 and all(isinstance(s, kind) for s in samples)
    pairs = [s for _, s in read_samples(tmp_path / "prompt_response.jsonl")]
    assert pairs[1] == Pair("Add\n2 + 2", "four")


def test_import_csv_and_json(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite")
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("instruction,input,output\nSay hi,,hi\nSum,1+1,2\n", encoding="utf-8")
    json_file = tmp_path / "in.json"
    json_file.write_text(json.dumps([{"prompt": "p", "response": "r"}]), encoding="utf-8")
    assert store.import_file(csv_file).added == 2
    assert store.import_file(json_file).added == 1
    assert store.list(search="1+1")[0].input == "1+1"
    with pytest.raises(LabelStoreError, match=r"json, \.jsonl or \.csv"):
        store.import_file(tmp_path / "x.txt")


def test_csv_in_other_encodings_is_refused_naming_the_line(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite")
    text = "instruction,input,output\nSay hi,,hi\n翻译,你好,hello\n"
    cases = {
        "utf16.csv": (text.encode("utf-16"), r"utf16\.csv:1: file is UTF-16 encoded; save it as UTF-8"),
        "utf16le.csv": (text.encode("utf-16-le"), r"utf16le\.csv:1: file is UTF-16 or UTF-32 encoded"),
        "gbk.csv": (text.encode("gbk"), r"gbk\.csv:3: not valid UTF-8 at byte 0 .*GBK"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LabelStoreError, match=message):
            store.import_file(tmp_path / name)
    assert store.list() == []  # nothing half-imported
    (tmp_path / "bom.csv").write_bytes(text.encode("utf-8-sig"))  # Excel's UTF-8 with a BOM is fine
    assert store.import_file(tmp_path / "bom.csv").added == 2


def test_csv_rows_are_named_by_their_first_line(tmp_path: Path) -> None:
    from chattune.label.io import read_rows

    path = tmp_path / "in.csv"
    path.write_text('instruction,output\n"two\nlines",a\n,\n"x",\n,\n', encoding="utf-8")
    rows, errors, total = read_rows(path)
    assert total == 4 and [r["instruction"] for r in rows] == ["two\nlines", "x"]
    # the empty rows, after a row of two lines
    assert [e.split(":")[1] for e in errors] == ["4", "6"], errors


def test_csv_rows_after_blank_lines_keep_their_line_and_long_cells_are_read(tmp_path: Path) -> None:
    from chattune.label.io import read_rows

    path = tmp_path / "in.csv"
    path.write_text("instruction,output\n,\n\n,\n" + "a" * 200_000 + ",b\n", encoding="utf-8")
    rows, errors, total = read_rows(path)  # csv's default cell limit (128 KiB) does not apply
    assert total == 3 and [len(r["instruction"]) for r in rows] == [200_000]
    assert [e.split(":")[1] for e in errors] == ["2", "4"], errors  # not the blank line 3


def test_store_errors_are_chattune_errors(tmp_path: Path) -> None:
    with pytest.raises(ChattuneError, match=r"^no label record with id 7$") as e:  # the message is unchanged
        LabelStore(tmp_path / "labels.sqlite").get(7)
    assert isinstance(e.value, LabelStoreError) and e.value.exit_code == 1


def test_schema_version_and_migration(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    LabelStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(db) == SCHEMA_VERSION  # already current: nothing to do
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LabelStoreError, match="newer"):
        LabelStore(path)


def test_a_version_1_database_gains_tools_and_keeps_its_records(tmp_path: Path) -> None:
    from chattune.label.db import MIGRATIONS
    from chattune.label.records import fingerprint

    path = tmp_path / "labels.sqlite"
    db = sqlite3.connect(path)
    MIGRATIONS[0](db)  # the schema as version 1 wrote it
    fp = fingerprint("instruction", "Capital of France?", "", "Paris", [])
    db.execute(
        "INSERT INTO records (kind, instruction, output, status, created_at, updated_at, fingerprint)"
        " VALUES ('instruction', 'Capital of France?', 'Paris', 'accepted', 1, 1, ?)",
        (fp,),
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = LabelStore(path)
    [rec] = store.list()
    assert (rec.output, rec.tools) == ("Paris", [])
    (tmp_path / "same.jsonl").write_text(json.dumps({"instruction": "Capital of France?", "output": "Paris"}))
    assert store.import_file(tmp_path / "same.jsonl").duplicates == 1  # old fingerprints still match


def test_tool_conversations_keep_their_tools_through_import_edit_and_export(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite")
    tools = [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"}, "observation": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"tools": tools, "conversations": messages}) + "\n")
    [rid] = store.import_file(src).ids
    assert store.get(rid).tools == tools
    assert store.import_file(src).duplicates == 1
    (tmp_path / "untooled.jsonl").write_text(json.dumps({"conversations": messages}) + "\n")
    assert store.import_file(tmp_path / "untooled.jsonl").added == 1  # other tools, another record
    renamed = [tools[0] | {"name": "weather"}]
    store.update(rid, tools=renamed, status="accepted")
    with pytest.raises(LabelStoreError, match="JSON list of tool definitions"):
        store.update(rid, tools=["weather"])
    with pytest.raises(LabelStoreError, match="only conversation records"):
        store.add("q", output="a", tools=tools)
    assert store.export(tmp_path / "out.jsonl").written == 1
    [(_, sample)] = list(read_samples(tmp_path / "out.jsonl"))
    assert isinstance(sample, Conversation) and sample.tools == renamed
    assert (
        sample.messages[1].tool_call.arguments == {"city": "Paris"} and sample.messages[2].content == "sunny"
    )
    report = store.export(tmp_path / "pairs.jsonl", format="prompt_response")
    assert report.skipped == 1 and "offers tools, which prompt_response cannot hold" in report.reasons[0]
    assert [r.id for r in store.list(search="string")] == [
        rid
    ]  # tools are searchable (only they say "string")


def _writer(path: str, worker: int, n: int, errors: str) -> None:
    """n writes cycling create → edit → status change; any exception is written to `errors` for the parent."""
    try:
        store = LabelStore(path)
        rid = 0
        for i in range(n):
            step = i % 3
            if step == 0:
                rid = store.add(f"w{worker}-{i}", output="x", author=f"w{worker}")
            elif step == 1:
                store.update(rid, output=f"edited w{worker}-{i - 1}", author=f"w{worker}")
            else:
                store.set_status(rid, "accepted" if worker % 2 else "rejected", f"w{worker}")
    except BaseException as e:
        Path(errors).write_text(f"{type(e).__name__}: {e}")
        raise


def _hammer(tmp_path: Path, workers: int, writes: int) -> None:
    """`workers` processes × `writes` writes at once; then every write must be there, exactly once."""
    path = str(tmp_path / "labels.sqlite")
    LabelStore(path)
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker, like separate Streamlit servers
    procs = [
        ctx.Process(target=_writer, args=(path, w, writes, str(tmp_path / f"err{w}"))) for w in range(workers)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    errors = [f.read_text() for f in sorted(tmp_path.glob("err*"))]
    assert not errors, errors  # "database is locked" or anything else surfacing to a writer fails here
    assert [p.exitcode for p in procs] == [0] * workers
    rows = LabelStore(path).list(limit=100_000)
    assert len(rows) == workers * len(range(0, writes, 3))  # none lost, none doubled
    for w in range(workers):
        _check_worker(rows, w, writes)
    _check_integrity(path)


def _check_worker(rows: list, w: int, writes: int) -> None:
    """Worker w's records are all there, each with its own edit and status change."""
    mine = {r.instruction: r for r in rows if r.author == f"w{w}"}
    assert sorted(mine) == sorted(f"w{w}-{i}" for i in range(0, writes, 3))
    for i in range(0, writes, 3):
        rec = mine[f"w{w}-{i}"]
        assert rec.kind == "instruction"
        assert rec.output == (f"edited w{w}-{i}" if i + 1 < writes else "x")  # the edit landed on its record
        assert rec.status == (("accepted" if w % 2 else "rejected") if i + 2 < writes else "pending")


def _check_integrity(path: str | Path) -> None:
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    # 8 processes × 200 writes each (67 creates, 67 edits, 66 status changes), all at once
    _hammer(tmp_path, workers=8, writes=200)


@pytest.mark.slow
def test_concurrent_writers_200_of_each(tmp_path: Path) -> None:
    # 8 processes × (200 creates + 200 edits + 200 status changes)
    _hammer(tmp_path, workers=8, writes=600)


def test_writer_killed_while_others_write(tmp_path: Path) -> None:
    """SIGKILL one writer at a random moment of its work: the others finish everything, nothing is corrupt."""
    path = str(tmp_path / "labels.sqlite")
    LabelStore(path)
    ctx = mp.get_context("spawn")
    others = [ctx.Process(target=_writer, args=(path, w, 60, str(tmp_path / f"err{w}"))) for w in range(3)]
    victim = ctx.Process(target=_writer, args=(path, 9, 10**6, str(tmp_path / "victim")))
    for p in [victim, *others]:
        p.start()
    deadline = time.monotonic() + 60
    while not LabelStore(path).list(search="w9-") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.05, 0.5))  # somewhere in its create / edit / status cycle
    os.kill(victim.pid, signal.SIGKILL)
    for p in [victim, *others]:
        p.join(120)
    assert victim.exitcode == -signal.SIGKILL
    errors = [f.read_text() for f in sorted(tmp_path.glob("err*"))]
    assert not errors and [p.exitcode for p in others] == [0, 0, 0], errors
    rows = LabelStore(path).list(limit=100_000)
    for w in range(3):
        _check_worker(rows, w, 60)
    for rec in (r for r in rows if r.author == "w9"):  # the victim's records: each whole, never half-written
        i = int(rec.instruction.split("-")[1])
        assert rec.output in ("x", f"edited w9-{i}") and rec.status in ("pending", "accepted")
    _check_integrity(path)
    assert LabelStore(path).add("after", output="ok")  # the dead writer's lock is gone


def _die_mid_transaction(path: str) -> None:
    store = LabelStore(path)
    with store.transaction() as db:
        db.execute(
            "INSERT INTO records (kind, status, created_at, updated_at, fingerprint) "
            "VALUES ('instruction', 'pending', 0, 0, 'x')"
        )
        db.execute("UPDATE records SET status = 'rejected'")
        os._exit(1)  # no rollback, no close: as if the process were killed


def test_killed_writer_leaves_db_consistent(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    store = LabelStore(path)
    rid = store.add("keep me", output="ok", status="accepted")
    proc = mp.get_context("spawn").Process(target=_die_mid_transaction, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 1
    store = LabelStore(path)
    assert [r.id for r in store.list()] == [rid] and store.get(rid).status == "accepted"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store.add("after", output="ok")  # the lock the dead process held is gone
    assert store.counts()["pending"] == 1
