"""Reading a run's rows of ``segment_export_outcomes`` for the UI, over any DB-API connection, read only.

The table lives where the export's state lives (``state.py``: the source's connection, ``sync.state_conn_id`` or
the embedded SQLite file), so the api-server reads it through the same Airflow connection the task wrote it
through; it never creates or changes a table. Each row gets a number, its position in the run ordered by key and
action (``ROW_NUMBER()``, which SQLite 3.25+, PostgreSQL and MySQL 8 have): the list shows masked keys with that
number, and the one unmasked key a user allowed to edit the DAG asks for is fetched by it, so no key is ever in a
URL (the api-server logs URLs).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from segment_export.state import OUTCOMES_TABLE
from segment_export.ui.views import OutcomeCounts, OutcomeRow

_NUMBERED = (
    "SELECT ROW_NUMBER() OVER (ORDER BY profile_key, action, reason) AS n, profile_key, action, reason "
    f"FROM {OUTCOMES_TABLE} WHERE export_id = ? AND run_id = ?"
)


class OutcomesUnavailable(RuntimeError):
    """The outcomes table cannot be read (no such table yet, the connection fails): the page says so."""


class OutcomesReader:
    """One export's outcome rows over a DB-API connection whose parameter style is ``placeholder``."""

    def __init__(self, conn: Any, placeholder: str, export_id: str):
        self.conn, self.ph, self.export_id = conn, placeholder, export_id

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cursor = self.conn.cursor()
        try:
            cursor.execute(sql.replace("?", self.ph), list(params))
            return [tuple(r) for r in cursor.fetchall()]
        except Exception as exc:  # noqa: BLE001 - the driver's own error class; the message names no key
            try:
                self.conn.rollback()
            except Exception:  # noqa: BLE001
                pass
            raise OutcomesUnavailable(f"{OUTCOMES_TABLE}: {type(exc).__name__}: {str(exc)[:300]}") from None
        finally:
            cursor.close()

    def counts(self, run_id: str) -> OutcomeCounts:
        rows = self._query(
            f"SELECT action, reason, COUNT(*) FROM {OUTCOMES_TABLE} WHERE export_id = ? AND run_id = ? "
            "GROUP BY action, reason",
            (self.export_id, run_id),
        )
        return OutcomeCounts.from_groups(rows)

    def rows(self, run_id: str, *, query: str = "", action: str = "", search_keys: bool = False,
             limit: int = 100, offset: int = 0) -> tuple[list[OutcomeRow], int]:
        """A page of the run's rows (keys unmasked: the caller masks) and how many rows match.

        ``query`` matches the reason or the action, case-insensitively; the profile key too only with
        ``search_keys`` (users allowed to edit the DAG): a reader could otherwise test whether an address was in
        the run by searching for it."""
        where, params = [], [self.export_id, run_id]
        if action:
            where.append("action = ?")
            params.append(action)
        if query:
            like = f"%{query.lower()}%"
            terms = ["LOWER(COALESCE(reason, '')) LIKE ?", "LOWER(action) LIKE ?"]
            params += [like, like]
            if search_keys:
                terms.append("LOWER(profile_key) LIKE ?")
                params.append(like)
            where.append("(" + " OR ".join(terms) + ")")
        filtered = f"SELECT * FROM ({_NUMBERED}) numbered" + (" WHERE " + " AND ".join(where) if where else "")
        (total,) = self._query(f"SELECT COUNT(*) FROM ({filtered}) matched", tuple(params))[0]
        page = self._query(f"{filtered} ORDER BY n LIMIT {int(limit)} OFFSET {int(offset)}", tuple(params))
        return [OutcomeRow(int(n), key, act, reason) for n, key, act, reason in page], int(total)

    def key(self, run_id: str, n: int) -> str | None:
        """The unmasked profile key of row ``n`` of the run (None: no such row)."""
        found = self._query(f"SELECT profile_key FROM ({_NUMBERED}) numbered WHERE n = ?", (self.export_id, run_id, int(n)))
        return found[0][0] if found else None


@contextmanager
def open_reader(state_conn_id: str | None, export_id: str) -> Iterator[OutcomesReader]:
    """The outcomes of an export, through its state connection (an Airflow connection id) or, when None, the
    embedded SQLite file opened read only. Raises :class:`OutcomesUnavailable` when neither can be opened."""
    if state_conn_id is None:
        import sqlite3

        from segment_export.state import default_state_db

        path = default_state_db()
        if not path.exists():
            raise OutcomesUnavailable(f"no state file {path} yet (the export has not run on this host)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        placeholder = "?"
    else:
        try:
            from airflow.models.connection import Connection

            hook = Connection.get_connection_from_secrets(state_conn_id).get_hook()
            conn = hook.get_conn()
            placeholder = getattr(hook, "placeholder", None) or "%s"
        except Exception as exc:  # noqa: BLE001 - a missing connection or driver: the page says which
            raise OutcomesUnavailable(f"connection {state_conn_id!r}: {type(exc).__name__}: {str(exc)[:300]}") from None
    try:
        yield OutcomesReader(conn, placeholder, export_id)
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
