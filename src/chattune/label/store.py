"""The label store: add, edit, review, list, import and export label records in the label database."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chattune.label.db import Database
from chattune.label.io import read_rows, write_export
from chattune.label.records import (
    KINDS,
    STATUSES,
    ExportReport,
    ImportPreview,
    ImportReport,
    LabelStoreError,
    Record,
    checked_tools,
    fingerprint,
    row_fingerprint,
)

_LIVE_FINGERPRINTS = "SELECT fingerprint FROM records WHERE deleted_at IS NULL"


class LabelStore(Database):
    """Label records in one SQLite file; each method is one transaction, retried when another writer holds it."""

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
        return {r[0] for r in self._read(_LIVE_FINGERPRINTS)}

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
            known = {r[0] for r in db.execute(_LIVE_FINGERPRINTS)}
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

    def _all(self, status: str) -> Iterator[Record]:
        offset = 0
        while batch := self.list(status=status, limit=500, offset=offset):
            yield from batch
            offset += len(batch)

    def export(self, path: str | Path, format: str = "conversations") -> ExportReport:
        """Write accepted records as JSON lines `chattune train` reads (conversations, prompt_response, context_target)."""
        return write_export(self._all("accepted"), path, format)


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
