"""The label database: one SQLite file (WAL, versioned schema) that several processes may write at once."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from chattune.label.records import LabelStoreError

SCHEMA_VERSION = 2

BUSY_TIMEOUT_S = 5.0  # SQLite's own wait for a lock, before our retry loop takes over
RETRIES = 12  # with backoff capped at 1 s this outlasts any realistic burst of writers

T = TypeVar("T")


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


# ---------------------------------------------------------------- connections and transactions


class Database:
    """A SQLite file opened in WAL mode and migrated; per-thread connections, writes queued and retried."""

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
