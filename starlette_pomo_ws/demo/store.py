"""The demo's storage: tasks, sessions, settings, team boards and team timers in SQLite, through the standard library.

Rows come back as plain dicts with the original guide's camelCase keys, ready to be both the
HTTP response and the `data` of the event that announces the change.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import threading
import uuid
from typing import Any

__all__ = ["DEFAULT_SETTINGS", "SESSION_TYPES", "TASK_STATUSES", "Store", "now_iso"]

TASK_STATUSES = ("pending", "in_progress", "completed")
SESSION_TYPES = ("work", "short_break", "long_break")
DEFAULT_SETTINGS: dict[str, Any] = {
    "workDuration": 25,
    "shortBreakDuration": 5,
    "longBreakDuration": 15,
    "longBreakInterval": 4,
    "autoStartBreaks": False,
    "autoStartPomodoros": False,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    title TEXT NOT NULL,
    status TEXT NOT NULL,
    estimated_pomodoros INTEGER NOT NULL,
    completed_pomodoros INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, created_at);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    task_id TEXT,
    type TEXT NOT NULL,
    duration INTEGER NOT NULL,
    start_time TEXT NOT NULL,
    started_at REAL NOT NULL,
    end_time TEXT,
    is_completed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id, end_time);
CREATE TABLE IF NOT EXISTS settings (
    user_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS team_tasks (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    title TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS team_tasks_team ON team_tasks (team, created_at);
CREATE TABLE IF NOT EXISTS team_timers (
    team TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""


def now_iso(moment: float | None = None) -> str:
    """UTC with milliseconds and a `Z`, as JavaScript's `toISOString()` writes it."""
    when = datetime.datetime.now(datetime.timezone.utc)
    if moment is not None:
        when = datetime.datetime.fromtimestamp(moment, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _task(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "userId": row["user_id"],
        "title": row["title"],
        "status": row["status"],
        "estimatedPomodoros": row["estimated_pomodoros"],
        "completedPomodoros": row["completed_pomodoros"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


def _team_task(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "team": row["team"],
        "title": row["title"],
        "status": row["status"],
        "createdBy": row["created_by"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


def _session(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "userId": row["user_id"],
        "taskId": row["task_id"],
        "type": row["type"],
        "duration": row["duration"],
        "startTime": row["start_time"],
        "endTime": row["end_time"],
        "isCompleted": bool(row["is_completed"]),
    }


class Store:
    """A small SQLite store. Every method is one short transaction, safe to call from any thread.

    Args:
        path: a file path, or `":memory:"` for a store that lives as long as the object.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None  # opened at the first query, so an app never run opens nothing

    def __repr__(self) -> str:
        return f"Store(path={self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        """Close the database (a `:memory:` one loses its data). The next call opens it again."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connect().execute(sql, params).fetchall()

    # -- tasks ------------------------------------------------------------------------------------

    def list_tasks(self, user_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM tasks WHERE user_id = ? ORDER BY created_at, rowid", (user_id,))
        return [_task(row) for row in rows]

    def get_task(self, user_id: str, task_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM tasks WHERE user_id = ? AND id = ?", (user_id, task_id))
        return _task(rows[0]) if rows else None

    def create_task(self, user_id: str, title: str, estimated_pomodoros: int = 1) -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        stamp = now_iso()
        self._query(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
            (task_id, user_id, title, TASK_STATUSES[0], estimated_pomodoros, stamp, stamp),
        )
        task = self.get_task(user_id, task_id)
        assert task is not None
        return task

    def update_task(self, user_id: str, task_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply `title`, `estimatedPomodoros` and `status` changes; `None` if there is no such task."""
        columns = {"title": "title", "estimatedPomodoros": "estimated_pomodoros", "status": "status"}
        sets = [f"{columns[key]} = ?" for key in changes if key in columns]
        values = [value for key, value in changes.items() if key in columns]
        if sets:
            self._query(
                f"UPDATE tasks SET {', '.join(sets)}, updated_at = ? WHERE user_id = ? AND id = ?",
                (*values, now_iso(), user_id, task_id),
            )
        return self.get_task(user_id, task_id)

    def delete_task(self, user_id: str, task_id: str) -> bool:
        with self._lock:
            cursor = self._connect().execute("DELETE FROM tasks WHERE user_id = ? AND id = ?", (user_id, task_id))
            return cursor.rowcount > 0

    # -- sessions ---------------------------------------------------------------------------------

    def current_session(self, user_id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM sessions WHERE user_id = ? AND end_time IS NULL ORDER BY started_at DESC LIMIT 1",
            (user_id,),
        )
        return _session(rows[0]) if rows else None

    def get_session(self, user_id: str, session_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM sessions WHERE user_id = ? AND id = ?", (user_id, session_id))
        return _session(rows[0]) if rows else None

    def start_session(
        self, user_id: str, session_type: str, duration: int, task_id: str | None, *, started_at: float
    ) -> dict[str, Any]:
        session_id = uuid.uuid4().hex
        self._query(
            "INSERT INTO sessions (id, user_id, task_id, type, duration, start_time, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (session_id, user_id, task_id, session_type, duration, now_iso(started_at), started_at),
        )
        session = self.get_session(user_id, session_id)
        assert session is not None
        return session

    def end_session(
        self, user_id: str, session_id: str, *, completed: bool | None, now: float
    ) -> tuple[dict[str, Any], dict[str, Any] | None, bool] | None:
        """End a running session.

        Returns `(session, task, changed)`, or `None` when there is no such session. `changed` is
        false when the session had already ended (ending is idempotent: every tab may try at zero).
        A completed work session adds one to its task's `completedPomodoros`.
        """
        with self._lock:
            db = self._connect()
            rows = db.execute("SELECT * FROM sessions WHERE user_id = ? AND id = ?", (user_id, session_id)).fetchall()
            if not rows:
                return None
            row = rows[0]
            changed = row["end_time"] is None
            if changed:
                done = completed if completed is not None else now - row["started_at"] >= row["duration"] - 1
                db.execute("BEGIN")
                db.execute(
                    "UPDATE sessions SET end_time = ?, is_completed = ? WHERE id = ?",
                    (now_iso(now), int(done), session_id),
                )
                if done and row["type"] == "work" and row["task_id"]:
                    db.execute(
                        "UPDATE tasks SET completed_pomodoros = completed_pomodoros + 1, updated_at = ? "
                        "WHERE user_id = ? AND id = ?",
                        (now_iso(now), user_id, row["task_id"]),
                    )
                db.execute("COMMIT")
            session = _session(db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone())
            task_rows = db.execute(
                "SELECT * FROM tasks WHERE user_id = ? AND id = ?", (user_id, session["taskId"])
            ).fetchall()
        return session, (_task(task_rows[0]) if task_rows else None), changed

    def running_work_sessions(self, now: float) -> list[tuple[str, float]]:
        """`(user_id, ends_at)` of every work session still running at `now` (a tab may never end one)."""
        rows = self._query(
            "SELECT user_id, started_at + duration AS ends_at FROM sessions "
            "WHERE end_time IS NULL AND type = 'work' AND started_at + duration > ?",
            (now,),
        )
        return [(row["user_id"], row["ends_at"]) for row in rows]

    # -- the team board and the team timer --------------------------------------------------------

    def list_team_tasks(self, team: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM team_tasks WHERE team = ? ORDER BY created_at, rowid", (team,))
        return [_team_task(row) for row in rows]

    def get_team_task(self, team: str, task_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM team_tasks WHERE team = ? AND id = ?", (team, task_id))
        return _team_task(rows[0]) if rows else None

    def create_team_task(self, team: str, title: str, created_by: str) -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        stamp = now_iso()
        self._query(
            "INSERT INTO team_tasks VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task_id, team, title, TASK_STATUSES[0], created_by, stamp, stamp),
        )
        task = self.get_team_task(team, task_id)
        assert task is not None
        return task

    def set_team_task_status(self, team: str, task_id: str, status: str) -> dict[str, Any] | None:
        self._query(
            "UPDATE team_tasks SET status = ?, updated_at = ? WHERE team = ? AND id = ?",
            (status, now_iso(), team, task_id),
        )
        return self.get_team_task(team, task_id)

    def delete_team_task(self, team: str, task_id: str) -> bool:
        with self._lock:
            cursor = self._connect().execute("DELETE FROM team_tasks WHERE team = ? AND id = ?", (team, task_id))
            return cursor.rowcount > 0

    def get_team_timer(self, team: str) -> dict[str, Any] | None:
        rows = self._query("SELECT data FROM team_timers WHERE team = ?", (team,))
        timer: dict[str, Any] | None = json.loads(rows[0]["data"]) if rows else None
        return timer

    def set_team_timer(self, team: str, timer: dict[str, Any]) -> None:
        self._query(
            "INSERT INTO team_timers (team, data) VALUES (?, ?) ON CONFLICT (team) DO UPDATE SET data = excluded.data",
            (team, json.dumps(timer)),
        )

    # -- settings ---------------------------------------------------------------------------------

    def get_settings(self, user_id: str) -> dict[str, Any]:
        rows = self._query("SELECT data FROM settings WHERE user_id = ?", (user_id,))
        stored: dict[str, Any] = json.loads(rows[0]["data"]) if rows else {}
        return {**DEFAULT_SETTINGS, **stored}

    def update_settings(self, user_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.get_settings(user_id), **changes}
        self._query(
            "INSERT INTO settings (user_id, data) VALUES (?, ?) "
            "ON CONFLICT (user_id) DO UPDATE SET data = excluded.data",
            (user_id, json.dumps(merged)),
        )
        return merged
