"""The SQLite vote store of `annotate`: ``results/annotations/{framework}.sqlite``.

WAL journal with ``synchronous=FULL``: a vote is committed (and on disk) before the server
answers its POST, so a server killed with SIGKILL loses no acknowledged vote. The database and
its ``-wal`` and ``-shm`` files are 0600 (votes and token hashes are private). Tables:

- ``annotators``: name, sha256 of the token (the token itself is never stored), created;
- ``rounds``: a compare round's settings (JSON), fixed when the round is first served;
- ``instance_votes``: one row per (annotator, task): image_id, instance_id, best, worst (candidate
  settings), flagged (settings joined by ``;``), description, skipped, shown_at, answered_at;
- ``compare_votes``: one row per (annotator, round, task): testset, image_id, left, right
  (model names as shown), answer, repeated, gold, shown_at, answered_at.

Times are ISO-8601 UTC strings.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, settings TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instance_votes (
    annotator TEXT NOT NULL, task_id TEXT NOT NULL, image_id TEXT NOT NULL,
    instance_id INTEGER NOT NULL, best TEXT, worst TEXT, flagged TEXT NOT NULL,
    description TEXT NOT NULL, skipped INTEGER NOT NULL, shown_at TEXT, answered_at TEXT NOT NULL,
    PRIMARY KEY (annotator, task_id));
CREATE TABLE IF NOT EXISTS compare_votes (
    annotator TEXT NOT NULL, round INTEGER NOT NULL, task_id TEXT NOT NULL, testset TEXT NOT NULL,
    image_id TEXT NOT NULL, left_model TEXT NOT NULL, right_model TEXT NOT NULL,
    answer TEXT NOT NULL, repeated INTEGER NOT NULL, gold INTEGER NOT NULL, shown_at TEXT,
    answered_at TEXT NOT NULL, PRIMARY KEY (annotator, round, task_id));
"""
#: mode of the database and its -wal and -shm files (SQLite gives them the database's mode)
PRIVATE = 0o600
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class StoreError(ValueError):
    """A request the store refuses (unknown annotator name, bad name, ...)."""


def db_path(results: str | os.PathLike, framework: str) -> Path:
    """Where a framework's votes live."""
    return Path(results) / "annotations" / f"{framework}.sqlite"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Store:
    """One connection, serialised by a lock (the server's worker threads share it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE))  # before sqlite makes it
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.make_private()

    def make_private(self) -> None:
        """The database and its WAL and shared-memory files readable by their owner only
        (docs/design.md §11); a file of an earlier version, made 0644, is tightened."""
        for suffix in ("", "-wal", "-shm"):
            path = self.path.with_name(self.path.name + suffix)
            if path.exists() and path.stat().st_mode & 0o777 != PRIVATE:
                path.chmod(PRIVATE)

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, values: tuple[Any, ...]) -> int:
        """Run one statement in its own committed transaction; the number of rows changed."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                changed = self.db.execute(sql, values).rowcount
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return changed

    def _read(self, sql: str, values: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, values).fetchall()

    # ---------------------------------------------------------------- annotators

    def add_annotator(self, name: str) -> str:
        """Register ``name`` (letters, digits, ``_.-``, at most 64) and return its new token; an
        existing name gets a new token (the old one stops working)."""
        if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
            raise StoreError(f"annotator name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        token = secrets.token_urlsafe(24)
        self._write(
            "INSERT INTO annotators VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash",
            (name, hash_token(token), now()),
        )
        return token

    def annotator_for(self, token: str | None) -> str | None:
        """The annotator holding ``token``, else None."""
        if not token or len(token) > 200:
            return None
        rows = self._read(
            "SELECT name, token_hash FROM annotators WHERE token_hash = ?", (hash_token(token),)
        )
        if rows and secrets.compare_digest(rows[0]["token_hash"], hash_token(token)):
            return str(rows[0]["name"])
        return None

    # ---------------------------------------------------------------- rounds

    def round_settings(self, round_number: int, settings: str) -> str:
        """The settings JSON of a round: ``settings`` when the round is new, else the stored
        one (the caller refuses a mismatch)."""
        self._write(
            "INSERT INTO rounds VALUES (?, ?, ?) ON CONFLICT(round) DO NOTHING",
            (round_number, settings, now()),
        )
        return str(self._read("SELECT settings FROM rounds WHERE round = ?", (round_number,))[0][0])

    # ---------------------------------------------------------------- votes

    def add_instance_vote(self, annotator: str, task: dict[str, Any], vote: dict[str, Any]) -> bool:
        """Commit one instance answer; False if this annotator already answered the task."""
        return bool(
            self._write(
                "INSERT INTO instance_votes VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(annotator, task_id) DO NOTHING",
                (
                    annotator,
                    task["task_id"],
                    task["image_id"],
                    int(task["instance_id"]),
                    vote.get("best"),
                    vote.get("worst"),
                    ";".join(vote.get("flagged", [])),
                    vote.get("description", ""),
                    int(bool(vote.get("skipped"))),
                    vote.get("shown_at"),
                    now(),
                ),
            )
        )

    def add_compare_vote(
        self, annotator: str, round_number: int, task: dict[str, Any], answer: str, shown_at: Any
    ) -> bool:
        """Commit one A/B answer; False if this annotator already answered the task."""
        return bool(
            self._write(
                "INSERT INTO compare_votes VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(annotator, round, task_id) DO NOTHING",
                (
                    annotator,
                    round_number,
                    task["task_id"],
                    task["testset"],
                    task["image_id"],
                    task["left"],
                    task["right"],
                    answer,
                    int(task["repeated"]),
                    int(task["gold"]),
                    shown_at,
                    now(),
                ),
            )
        )

    def answered_instances(self, annotator: str) -> set[str]:
        rows = self._read("SELECT task_id FROM instance_votes WHERE annotator = ?", (annotator,))
        return {str(row[0]) for row in rows}

    def answered_compare(self, annotator: str, round_number: int) -> set[str]:
        rows = self._read(
            "SELECT task_id FROM compare_votes WHERE annotator = ? AND round = ?",
            (annotator, round_number),
        )
        return {str(row[0]) for row in rows}

    def instance_rows(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM instance_votes ORDER BY annotator, answered_at, task_id")
        return [dict(row) for row in rows]

    def compare_rows(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM compare_votes ORDER BY round, annotator, answered_at")
        return [dict(row) for row in rows]
