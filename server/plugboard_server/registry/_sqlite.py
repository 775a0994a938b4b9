"""The SQLite index behind LocalStore: schema, per-thread connections, rows <-> ModuleVersion, listing.

A version exists iff its row in `versions` exists: the row is the manifest, committed after the
version's files are in place, so readers never see a half-written version.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugboard_server.registry._paging import decode_token, encode_token, page_size_of
from plugboard_server.registry.store import LATEST, ModuleFacts, ModuleVersion

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS modules (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL  -- only grows: a deleted version's number is never reused
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    peft_type TEXT NOT NULL,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    num_virtual_tokens INTEGER NOT NULL,
    target_modules TEXT NOT NULL,  -- JSON list
    size_bytes INTEGER NOT NULL,
    files TEXT NOT NULL,  -- JSON {file name: sha256 hex}
    created_at REAL NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,  -- JSON list, as published (the tags table is for filtering)
    metadata TEXT NOT NULL,  -- JSON object
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS versions_by_kind ON versions (kind, name, version);
CREATE TABLE IF NOT EXISTS tags (
    tag TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (tag, name, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_version ON tags (name, version);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
) WITHOUT ROWID;
"""

# A later version of the same name exists: one primary-key probe per row.
NEWER = "EXISTS (SELECT 1 FROM versions w WHERE w.name = v.name AND w.version > v.version)"
# Every read of whole versions selects these, so each row carries its aliases and whether it is the
# latest: one query per call, hence one consistent snapshot, and nothing cached that could go stale.
COLUMNS = f"""v.name, v.version, v.kind, v.peft_type, v.base_model, v.rank, v.num_virtual_tokens,
    v.target_modules, v.size_bytes, v.files, v.created_at, v.description, v.tags, v.metadata, NOT {NEWER},
    (SELECT group_concat(a.alias, ',') FROM aliases a WHERE a.name = v.name AND a.version = v.version)"""


class _Connection(sqlite3.Connection):
    """sqlite3.Connection, weakly referenceable."""


class Index:
    """The index database; one connection per thread (and per process, after a fork)."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        # Weak: a thread's connection goes with its thread-local data when the thread ends (at the
        # next garbage collection: it is in a cycle with its statement cache); close() closes the rest.
        self._all: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                self._create()
                return
            except sqlite3.OperationalError as e:
                # Switching to WAL while another replica opens the same new file can answer "locked"
                # at once, without waiting in the busy handler: wait here instead.
                if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01 + random.random() * 0.02)

    def _create(self) -> None:
        self.connection().execute("PRAGMA journal_mode=WAL")
        with self.write() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                # Statement by statement: executescript() would commit the transaction first.
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # a forked child must not share its parent's
            db = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # no implicit transactions: BEGIN and COMMIT are explicit
                check_same_thread=False,  # only so that close() may close it from another thread
                factory=_Connection,
            )
            # FULL: a committed publish survives power loss, so its version number is never handed out twice.
            db.execute("PRAGMA synchronous=FULL")
            local.db, local.pid = db, os.getpid()
            with self._lock:
                self._all.add(db)
        return local.db

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock up front, so it cannot fail half-way."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            for db in list(self._all):
                db.close()
            self._all.clear()
        self._local = threading.local()


def insert_version(db: sqlite3.Connection, mv: ModuleVersion) -> None:
    f = mv.facts
    db.execute(
        "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            mv.name,
            mv.version,
            f.kind,
            f.peft_type,
            f.base_model,
            f.rank,
            f.num_virtual_tokens,
            json.dumps(list(f.target_modules)),
            mv.size_bytes,
            json.dumps(dict(mv.files), sort_keys=True),
            mv.created_at,
            mv.description,
            json.dumps(list(mv.tags)),
            json.dumps(dict(mv.metadata), sort_keys=True),
        ),
    )
    db.executemany("INSERT INTO tags VALUES (?, ?, ?)", [(t, mv.name, mv.version) for t in mv.tags])
    db.execute(
        "INSERT INTO modules VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET next_version = excluded.next_version",
        (mv.name, mv.version + 1),
    )


def exists(db: sqlite3.Connection, name: str, version: int) -> bool:
    sql = "SELECT 1 FROM versions WHERE name = ? AND version = ?"
    return db.execute(sql, (name, version)).fetchone() is not None


def next_version(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT next_version FROM modules WHERE name = ?", (name,)).fetchone()
    return row[0] if row else 1


def set_alias(db: sqlite3.Connection, name: str, alias: str, version: int) -> None:
    db.execute(
        "INSERT INTO aliases VALUES (?, ?, ?) "
        "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
        (name, alias, version),
    )


def selector_where(name: str, selector: str) -> tuple[str, tuple[Any, ...]]:
    """SQL (over `versions v`) for the version `selector` names, with its parameters."""
    if selector == LATEST:
        return "v.name = ? ORDER BY v.version DESC LIMIT 1", (name,)
    # isascii: str.isdigit() also accepts '²'; 18 digits: larger ones do not fit SQLite's integers.
    if selector.isascii() and selector.isdigit() and len(selector) <= 18:
        return "v.name = ? AND v.version = ?", (name, int(selector))
    return (
        "(v.name, v.version) = (SELECT a.name, a.version FROM aliases a WHERE a.name = ? AND a.alias = ?)",
        (name, selector),
    )


def to_version(root: Path, row: tuple[Any, ...]) -> ModuleVersion:
    name, version = row[0], row[1]
    aliases = sorted(row[15].split(",")) if row[15] else []
    if row[14]:
        aliases.append(LATEST)
    return ModuleVersion(
        name=name,
        version=version,
        facts=ModuleFacts(
            kind=row[2],
            peft_type=row[3],
            base_model=row[4],
            rank=row[5],
            num_virtual_tokens=row[6],
            target_modules=tuple(json.loads(row[7])),
        ),
        size_bytes=row[8],
        files=json.loads(row[9]),
        created_at=row[10],
        path=root / name / str(version),
        description=row[11],
        tags=tuple(json.loads(row[12])),
        metadata=json.loads(row[13]),
        aliases=tuple(aliases),
    )


def list_page(
    db: sqlite3.Connection,
    root: Path,
    *,
    page_size: int,
    page_token: str,
    kind: str,
    tag: str,
    name_prefix: str,
    all_versions: bool,
) -> tuple[list[ModuleVersion], str]:
    """One page in (name, version) order. Keyset paging: the token is the last (name, version) shown."""
    size = page_size_of(page_size)
    after = decode_token(page_token) if page_token else ("", 0)
    if name_prefix and after < (name_prefix, 0):
        after = (name_prefix, 0)  # start the index range at the prefix rather than filter up to it
    # With a tag, drive the scan from the tags table's (tag, name, version) key: already in page order.
    key = "t" if tag else "v"
    sql = [f"SELECT {COLUMNS} FROM "]
    params: list[Any] = []
    if tag:
        sql.append("tags t JOIN versions v ON v.name = t.name AND v.version = t.version WHERE t.tag = ? AND ")
        params.append(tag)
    else:
        sql.append("versions v WHERE ")
    sql.append(f"({key}.name, {key}.version) > (?, ?)")
    params += after
    if kind:
        sql.append(" AND v.kind = ?")
        params.append(kind)
    if name_prefix:
        # A range, not LIKE: names sort bytewise, and '~' after every character a name may hold.
        sql.append(f" AND {key}.name < ?")
        params.append(name_prefix + "~")
    if not all_versions:
        sql.append(f" AND NOT {NEWER}")
    sql.append(f" ORDER BY {key}.name, {key}.version LIMIT ?")
    params.append(size + 1)
    rows = db.execute("".join(sql), params).fetchall()
    page = [to_version(root, row) for row in rows[:size]]
    token = encode_token(page[-1].name, page[-1].version) if len(rows) > size else ""
    return page, token
