"""The label store: one SQLite file (WAL, versioned schema) that several processes may write at once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from chattune.data.formats import FORMATS, Where, detect_format, sample_to_record
from chattune.data.readers import iter_csv_records, iter_records
from chattune.data.schema import SourceRecord
from chattune.errors import ChattuneError, DataFormatError

KINDS = ("instruction", "conversation")
STATUSES = ("pending", "draft", "accepted", "rejected")
EXPORT_FORMATS = ("conversations", "prompt_response", "context_target")
SCHEMA_VERSION = 2

BUSY_TIMEOUT_S = 5.0  # SQLite's own wait for a lock, before our retry loop takes over
RETRIES = 12  # with backoff capped at 1 s this outlasts any realistic burst of writers

T = TypeVar("T")


class LabelStoreError(ChattuneError):
    """A label-store operation that cannot be done (unknown id, bad status, bad format)."""


@dataclass
class Record:
    """One label record as the store holds it."""

    id: int
    kind: str
    instruction: str
    input: str
    output: str
    messages: list[dict[str, Any]]
    status: str
    author: str
    created_at: float
    updated_at: float
    deleted: bool = False
    source: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)

    def prompt_text(self) -> str:
        """The user's request as one string (instruction, then input on its own line)."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction

    def to_conversation(self) -> list[dict[str, Any]]:
        """The record as a `conversations` message list."""
        if self.kind == "conversation":
            return self.messages
        return [
            {"role": "user", "content": self.prompt_text()},
            {"role": "assistant", "content": self.output},
        ]


@dataclass
class ImportPreview:
    """What importing a file would do: the parsed rows, duplicates and unreadable records."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    total: int = 0


@dataclass
class ImportReport:
    """What importing a file did."""

    added: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass
class ExportReport:
    """What exporting did: records written and those that the format cannot hold (with reasons)."""

    written: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    path: str = ""


# ---------------------------------------------------------------- schema and migrations


def _migrate_0_to_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE records (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('instruction', 'conversation')),
            instruction TEXT NOT NULL DEFAULT '',
            input TEXT NOT NULL DEFAULT '',
            output TEXT NOT NULL DEFAULT '',
            messages TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL CHECK (status IN ('pending', 'draft', 'accepted', 'rejected')),
            author TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            deleted_at REAL,
            fingerprint TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT ''
        )"""
    )
    db.execute("CREATE INDEX records_status ON records (status, deleted_at)")
    db.execute("CREATE INDEX records_fingerprint ON records (fingerprint)")


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    # the tool definitions of a tool-use conversation (a JSON list; empty for every other record)
    db.execute("ALTER TABLE records ADD COLUMN tools TEXT NOT NULL DEFAULT '[]'")


# index i migrates schema version i to i + 1; append, never edit, so old files upgrade step by step
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_0_to_1, _migrate_1_to_2]


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION inside the caller's transaction; returns the version found."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise LabelStoreError(
            f"the label database has schema version {found}, newer than this chattune ({SCHEMA_VERSION}); "
            "upgrade chattune"
        )
    for version in range(found, SCHEMA_VERSION):
        MIGRATIONS[version](db)
    if found != SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


def _is_busy(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def fingerprint(
    kind: str, instruction: str, input: str, output: str, messages: list[Any], tools: list[Any] | None = None
) -> str:
    """A content hash that identifies duplicates whatever their status or author."""
    # tools only when present, so records without them keep the hash they had before tools were stored
    parts = [kind, instruction, input, output, messages, *([tools] if tools else [])]
    body = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def row_fingerprint(row: dict[str, Any]) -> str:
    """The fingerprint of an imported row (fields it lacks are empty)."""
    return fingerprint(
        row["kind"], row.get("instruction", ""), row.get("input", ""), row.get("output", ""),
        row.get("messages", []), row.get("tools"),
    )  # fmt: skip


# ---------------------------------------------------------------- turning files into label rows


def record_to_row(value: Any, where: Where) -> dict[str, Any]:
    """A JSON/CSV record (alpaca, prompt/response, context/target or any chat format) as label fields."""
    if not isinstance(value, dict):
        raise where.error(f"expected a JSON object, got {type(value).__name__}")
    status = value.get("status") if value.get("status") in STATUSES else "pending"
    author = str(value.get("author") or "")
    pairs = [("instruction", "input", "output"), ("prompt", None, "response"), ("context", None, "target")]
    for ask, extra, answer in pairs:
        if ask in value and not value.get("history") and not value.get("system"):
            row = {
                "kind": "instruction",
                "instruction": str(value.get(ask) or ""),
                "input": str(value.get(extra) or "") if extra else "",
                "output": str(value.get(answer) or ""),
            }
            if not row["instruction"].strip():
                raise where.error("empty", ask)
            return row | {"status": status, "author": author}
    # any chat format: normalise through the training reader, so what we store is what training reads
    fmt = detect_format(value, where)
    sample = FORMATS.get(fmt)(value, Where(where.record, require_target=False))
    rec = sample_to_record(sample)
    if "conversations" not in rec:
        rec = {"conversations": [{"role": "user", "content": rec["prompt"]}]}
    row = {"kind": "conversation", "messages": rec["conversations"], "status": status, "author": author}
    return row | ({"tools": rec["tools"]} if rec.get("tools") else {})


def checked_tools(tools: Any, kind: str = "conversation") -> list[dict[str, Any]]:
    """`tools` as stored: a list of JSON objects, and only on conversation records."""
    if not (isinstance(tools, list | None) and all(isinstance(t, dict) for t in tools or [])):
        raise LabelStoreError("expected a JSON list of tool definitions (objects)")
    if tools and kind != "conversation":
        raise LabelStoreError("only conversation records can offer tools")
    return list(tools or [])


def _iter_file(path: Path) -> Iterator[SourceRecord | DataFormatError]:
    if path.suffix.lower() == ".csv":
        yield from _iter_csv(path)
    else:
        yield from iter_records(path)


def _iter_csv(path: Path) -> Iterator[SourceRecord]:
    """Rows of a UTF-8 CSV file; any other encoding or a broken row stops the import, naming the line."""
    try:
        yield from iter_csv_records(path)
    except DataFormatError as e:
        raise LabelStoreError(e.describe()) from None


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """Parse a JSON/JSONL/CSV file into label rows; returns (rows, error messages, records read)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl", ".csv"):
        raise LabelStoreError(f"{path.name}: import reads .json, .jsonl or .csv files")
    rows, errors, total = [], [], 0
    for item in _iter_file(path):
        total += 1
        try:
            if isinstance(item, DataFormatError):
                raise item
            rows.append(record_to_row(item.value, Where(item, require_target=False)))
        except DataFormatError as e:
            errors.append(e.describe())
    return rows, errors, total


# ---------------------------------------------------------------- the store


class LabelStore:
    """Label records in one SQLite file; each method is one transaction, retried when another writer holds it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._retry(self._connect)
        try:
            # WAL lets readers go on while one process writes; the mode persists in the file
            self._retry(lambda: db.execute("PRAGMA journal_mode = WAL"))
        finally:
            db.close()
        self._write(migrate)

    # -- connections and transactions

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so every write is exactly one explicit transaction
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return db

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run fn, retrying with jittered exponential backoff while the database is locked."""
        delay = 0.02
        for attempt in range(RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or attempt == RETRIES - 1:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened once and kept.

        Reopening per call is slow: closing the last connection to a WAL database checkpoints and deletes
        the WAL, about 10 ms per write. A connection never crosses a fork (SQLite forbids it), hence the pid.
        """
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or local.db is None:
            local.db, local.pid = self._retry(self._connect), os.getpid()
        return local.db

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        db, self._local.db = getattr(self._local, "db", None), None
        if db is not None and getattr(self._local, "pid", None) == os.getpid():
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front, so it cannot deadlock later)."""
        db = self._db()
        with self._writers_queue():
            self._retry(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                yield db
                self._retry(lambda: db.execute("COMMIT"))
            except BaseException:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:  # a connection that cannot roll back is not reused
                        self.close()
                raise

    @contextmanager
    def _writers_queue(self) -> Iterator[None]:
        """Hold an exclusive lock on `<db>.lock` while writing, so writers from every process take turns.

        SQLite's own busy handler polls with sleeps growing to 100 ms; with many writers on a loaded machine
        most of the time went to sleeping while the lock was free (8 × 200 writes: 2 minutes instead of
        seconds). The kernel wakes a flock waiter as soon as the lock is released, and releases it when its
        holder dies, so a killed writer blocks nobody. Where flock is missing, SQLite's locking alone is used.
        """
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in its own transaction, retrying the whole transaction if the lock cannot be had."""

        def attempt() -> T:
            with self.transaction() as db:
                return fn(db)

        return self._retry(attempt)

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._retry(lambda: self._db().execute(sql, params).fetchall())

    # -- writes

    @staticmethod
    def _check(kind: str, status: str) -> None:
        if kind not in KINDS:
            raise LabelStoreError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if status not in STATUSES:
            raise LabelStoreError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")

    def add(
        self,
        instruction: str = "",
        input: str = "",
        output: str = "",
        *,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        kind: str | None = None,
        status: str = "pending",
        author: str = "",
        source: str = "",
    ) -> int:
        """Add a record (instruction kind, or conversation kind when `messages` is given, with the `tools` a
        tool-use conversation offers); returns its id."""
        kind = kind or ("conversation" if messages else "instruction")
        self._check(kind, status)
        row = {
            "kind": kind,
            "instruction": instruction,
            "input": input,
            "output": output,
            "messages": messages or [],
            "tools": checked_tools(tools, kind),
            "status": status,
            "author": author,
        }
        fp = row_fingerprint(row)
        return self._write(lambda db: _insert(db, row, fp, source, time.time()))

    def update(
        self,
        id: int,
        *,
        instruction: str | None = None,
        input: str | None = None,
        output: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
        status: str | None = None,
        author: str | None = None,
    ) -> Record:
        """Change the given fields of a record; returns the updated record."""

        def change(db: sqlite3.Connection) -> Record:
            old = self._get(db, id)
            new = {
                "instruction": old.instruction if instruction is None else instruction,
                "input": old.input if input is None else input,
                "output": old.output if output is None else output,
                "messages": old.messages if messages is None else messages,
                "tools": old.tools if tools is None else checked_tools(tools, old.kind),
                "status": old.status if status is None else status,
                "author": old.author if author is None else author,
            }
            self._check(old.kind, new["status"])
            fp = fingerprint(
                old.kind, new["instruction"], new["input"], new["output"], new["messages"], new["tools"]
            )
            db.execute(
                "UPDATE records SET instruction=?, input=?, output=?, messages=?, tools=?, status=?, author=?,"
                " updated_at=?, fingerprint=? WHERE id=?",
                (new["instruction"], new["input"], new["output"], json.dumps(new["messages"], ensure_ascii=False),
                 json.dumps(new["tools"], ensure_ascii=False), new["status"], new["author"], time.time(), fp,
                 id),
            )  # fmt: skip
            return self._get(db, id)

        return self._write(change)

    def set_status(self, id: int, status: str, author: str = "") -> Record:
        """Accept, reject, draft or re-open a record, recording who did it."""
        return self.update(id, status=status, author=author)

    def delete(self, id: int) -> None:
        """Soft-delete a record (hidden from lists and exports until `undo_delete`)."""

        def hide(db: sqlite3.Connection) -> None:
            self._get(db, id)
            db.execute("UPDATE records SET deleted_at=? WHERE id=?", (time.time(), id))

        self._write(hide)

    def undo_delete(self, id: int) -> None:
        """Bring back a soft-deleted record."""

        def restore(db: sqlite3.Connection) -> None:
            self._get(db, id, deleted=True)
            db.execute("UPDATE records SET deleted_at=NULL WHERE id=?", (id,))

        self._write(restore)

    # -- reads

    @staticmethod
    def _row(row: sqlite3.Row) -> Record:
        return Record(
            id=row["id"],
            kind=row["kind"],
            instruction=row["instruction"],
            input=row["input"],
            output=row["output"],
            messages=json.loads(row["messages"]),
            status=row["status"],
            author=row["author"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            deleted=row["deleted_at"] is not None,
            source=row["source"],
            tools=json.loads(row["tools"]),
        )

    def _get(self, db: sqlite3.Connection, id: int, deleted: bool = False) -> Record:
        row = db.execute("SELECT * FROM records WHERE id=?", (id,)).fetchone()
        if row is None or (row["deleted_at"] is not None) != deleted:
            raise LabelStoreError(f"no {'deleted ' if deleted else ''}label record with id {id}")
        return self._row(row)

    def get(self, id: int) -> Record:
        """One record by id (deleted records raise)."""
        rows = self._read("SELECT * FROM records WHERE id=? AND deleted_at IS NULL", (id,))
        if not rows:
            raise LabelStoreError(f"no label record with id {id}")
        return self._row(rows[0])

    def list(
        self, status: str | None = None, search: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Record]:
        """Records in id order, optionally of one status and containing `search` in any text field."""
        where, params = ["deleted_at IS NULL"], []
        if status:
            where.append("status = ?")
            params.append(status)
        if search:
            like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            fields = ("instruction", "input", "output", "messages", "tools", "author")
            where.append("(" + " OR ".join(f"{f} LIKE ? ESCAPE '\\'" for f in fields) + ")")
            params += [like] * len(fields)
        sql = f"SELECT * FROM records WHERE {' AND '.join(where)} ORDER BY id LIMIT ? OFFSET ?"
        return [self._row(r) for r in self._read(sql, (*params, limit, offset))]

    def counts(self) -> dict[str, int]:
        """How many live records have each status (every status present, zero included)."""
        out = dict.fromkeys(STATUSES, 0)
        for row in self._read(
            "SELECT status, COUNT(*) AS n FROM records WHERE deleted_at IS NULL GROUP BY status"
        ):
            out[row["status"]] = row["n"]
        return out

    # -- import and export

    def _known(self) -> set[str]:
        return {r[0] for r in self._read("SELECT fingerprint FROM records WHERE deleted_at IS NULL")}

    def preview_file(self, path: str | Path, limit: int = 20) -> ImportPreview:
        """What `import_file` would add, without adding anything."""
        rows, errors, total = read_rows(path)
        known, dup = self._known(), 0
        for r in rows:
            fp = row_fingerprint(r)
            dup += fp in known
            known.add(fp)
        return ImportPreview(rows[:limit], dup, errors, total)

    def import_file(self, path: str | Path, author: str = "") -> ImportReport:
        """Add every new record of a JSON/JSONL/CSV file in one transaction; duplicates are counted, not added."""
        rows, errors, _ = read_rows(path)
        report = ImportReport(errors=errors)

        def insert_all(db: sqlite3.Connection) -> None:
            report.added, report.duplicates, report.ids = 0, 0, []  # a retried transaction starts over
            known = {r[0] for r in db.execute("SELECT fingerprint FROM records WHERE deleted_at IS NULL")}
            now = time.time()
            for r in rows:
                fp = row_fingerprint(r)
                if fp in known:
                    report.duplicates += 1
                    continue
                known.add(fp)
                report.ids.append(
                    _insert(db, r | {"author": r["author"] or author}, fp, Path(path).name, now)
                )
                report.added += 1

        self._write(insert_all)
        return report

    def export(self, path: str | Path, format: str = "conversations") -> ExportReport:
        """Write accepted records as JSON lines `chattune train` reads (conversations, prompt_response, context_target)."""
        if format not in EXPORT_FORMATS:
            raise LabelStoreError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
        path = Path(path)
        report = ExportReport(path=str(path))
        lines = []
        normalise = FORMATS.get(format)
        for rec in self._all("accepted"):
            try:
                value = _export_value(rec, format)
                # checked with the training reader, so the file never holds a record training would reject
                normalise(value, Where(SourceRecord(str(path), rec.id, value)))
            except DataFormatError as e:
                report.skipped += 1
                if len(report.reasons) < 5:
                    report.reasons.append(f"record {rec.id}: {e.reason}")
                continue
            lines.append(json.dumps(value, ensure_ascii=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        tmp.replace(path)  # atomic, so a training run never reads a half-written file
        report.written = len(lines)
        return report

    def _all(self, status: str) -> Iterator[Record]:
        offset = 0
        while batch := self.list(status=status, limit=500, offset=offset):
            yield from batch
            offset += len(batch)


def _insert(db: sqlite3.Connection, row: dict[str, Any], fp: str, source: str, now: float) -> int:
    """The one INSERT of a new record (from `add` or an imported row; fields it lacks are empty); its id."""
    msgs, tools = (json.dumps(row.get(key, []), ensure_ascii=False) for key in ("messages", "tools"))
    cur = db.execute(
        "INSERT INTO records (kind, instruction, input, output, messages, tools, status, author,"
        " created_at, updated_at, fingerprint, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row["kind"], row.get("instruction", ""), row.get("input", ""), row.get("output", ""), msgs, tools,
         row["status"], row["author"], now, now, fp, source),
    )  # fmt: skip
    return int(cur.lastrowid)


def _export_value(rec: Record, format: str) -> dict[str, Any]:
    """The record in an export format; a DataFormatError says why the format cannot hold it."""
    if format == "conversations":
        return {"conversations": rec.to_conversation()} | ({"tools": rec.tools} if rec.tools else {})
    if rec.tools:
        raise DataFormatError(f"it offers tools, which {format} cannot hold; export it as conversations")
    if rec.kind == "instruction":
        prompt, answer = rec.prompt_text(), rec.output
    else:
        turns = [m for m in rec.messages if m.get("role") != "system"]
        if len(turns) != 2 or [m.get("role") for m in turns] != ["user", "assistant"]:
            raise DataFormatError(f"a {len(rec.messages)}-message conversation has no single prompt")
        prompt, answer = turns[0]["content"], turns[1]["content"]
    keys = ("prompt", "response") if format == "prompt_response" else ("context", "target")
    return {keys[0]: prompt, keys[1]: answer}
