"""The inspection record: every verdict a station gives, kept in a database.

One row per photo judged (its path, size, modification time and hash, when it
was judged, by which model and version, the threshold, score and verdict, the
overlay, the latency), the drift warnings, and (later) operator feedback and
threshold changes. Written through SQLAlchemy, so any database it accepts
holds it: SQLite in the station's folder by default (WAL, so readers never
block the writer), PostgreSQL when several stations share one record. The
schema is created and upgraded by Alembic (``anomap/migrations``).

A photo is one row however often it is seen: ``(station, path, size,
mtime_ns)`` is unique, so a watcher killed between judging a photo and writing
its row judges it again at restart and the record still holds it once.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

RECORD_FILE = "record.db"
#: a watched folder's own folder for the record and the pictures (hidden: never judged)
STATION_FOLDER = ".anomap"

metadata = MetaData()

inspections = Table(
    "inspections", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("station", String(200), nullable=False),
    Column("path", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("sha256", String(64)),
    Column("judged_at", DateTime(timezone=True), nullable=False),
    Column("model", String(200)),
    Column("model_version", String(64)),
    Column("threshold", Float),
    Column("pixel_threshold", Float),
    Column("score", Float),
    Column("verdict", String(16), nullable=False),
    Column("overlay", Text),
    Column("mask", Text),
    Column("latency_ms", Float),
    Column("error", Text),
    Column("action_done", Boolean, nullable=False, default=False),
    Column("feedback", String(32)),
    Column("feedback_note", Text),
    Column("feedback_at", DateTime(timezone=True)),
    Column("feedback_by", String(200)),
    UniqueConstraint("station", "path", "size", "mtime_ns", name="uq_inspections_photo"),
)

drift_events = Table(
    "drift_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("station", String(200), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("model_version", String(64)),
    Column("state", String(16), nullable=False),  # "drift" or "cleared"
    Column("window", Integer, nullable=False),
    Column("p_value", Float),
    Column("evidence", Text),  # JSON: the test, the medians, the share over the threshold
)

threshold_changes = Table(
    "threshold_changes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("station", String(200), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("who", String(200)),
    Column("old", Float, nullable=False),
    Column("new", Float, nullable=False),
    Column("why", Text),
    Column("undoes", Integer),  # the change this one takes back, if it is an undo
)

#: what an operator may say of a verdict
FEEDBACK = ("not_a_defect", "missed_defect")

#: the columns ``anomap history`` writes, in order
HISTORY_COLUMNS = ("id", "judged_at", "station", "path", "score", "verdict", "threshold",
                   "model", "model_version", "latency_ms", "overlay", "error", "feedback",
                   "feedback_note")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def station_folder(watched: str | Path) -> Path:
    """Where a watched folder keeps its record and pictures: ``WATCHED/.anomap``."""
    return Path(watched) / STATION_FOLDER


def default_url(watched: str | Path) -> str:
    """A watched folder's own SQLite record: ``sqlite:///WATCHED/.anomap/record.db``."""
    return f"sqlite:///{station_folder(watched).resolve() / RECORD_FILE}"


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    # pysqlite commits DDL at once whatever the transaction says, so a process killed
    # mid-migration left half a schema behind; SQLAlchemy says BEGIN itself instead
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # a power cut loses the last rows, never the file
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock at once: two processes migrating one file wait for
    # each other instead of both reading "no schema yet"
    immediate = connection.get_execution_options().get("anomap_write_lock", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


#: PostgreSQL advisory lock key held while migrating ("anomap" as a number)
_MIGRATION_LOCK = 0x616E6F6D6170


def migrate(engine: Engine) -> None:
    """Create the schema, or bring an older one up to this version (Alembic), all in
    one transaction that holds the database's write lock: a process killed midway
    leaves the schema as it was, and processes starting together migrate in turn."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location",
                           str(resources.files("anomap").joinpath("migrations")))
    with engine.execution_options(anomap_write_lock=True).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@dataclass(frozen=True)
class Query:
    """What ``anomap history`` asks of the record."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    verdict: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    model: str | None = None
    station: str | None = None


class Record:
    """One database holding inspections and drift events, opened (and migrated) once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            Path(self.engine.url.database or ".").parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def seen(self, station: str) -> set[tuple[str, int, int]]:
        """(path, size, mtime_ns) of every photo this station has judged."""
        query = select(inspections.c.path, inspections.c.size, inspections.c.mtime_ns).where(
            inspections.c.station == station)
        with self.engine.connect() as connection:
            return {tuple(row) for row in connection.execute(query)}  # type: ignore[misc]

    def add(self, rows: list[dict[str, Any]]) -> int:
        """Insert rows in one transaction; rows already there (the same photo, judged
        again after a crash) are skipped one by one. Returns how many were new."""
        if not rows:
            return 0
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(inspections), rows)
            return len(rows)
        except IntegrityError:
            added = 0
            for row in rows:
                try:
                    with self.engine.begin() as connection:
                        connection.execute(insert(inspections), [row])
                    added += 1
                except IntegrityError:
                    pass
            return added

    def mark_action_done(self, station: str, path: str, size: int, mtime_ns: int) -> None:
        table = inspections
        with self.engine.begin() as connection:
            connection.execute(table.update().where(
                (table.c.station == station) & (table.c.path == path)
                & (table.c.size == size) & (table.c.mtime_ns == mtime_ns)
            ).values(action_done=True))

    def pending_actions(self, station: str) -> list[dict[str, Any]]:
        table = inspections
        query = select(table).where((table.c.station == station) & ~table.c.action_done
                                    & (table.c.verdict.in_(("pass", "fail"))))
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def add_drift(self, station: str, state: str, window: int, p_value: float | None,
                  evidence: dict[str, Any], model_version: str | None) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(drift_events), [{
                "station": station, "at": now(), "model_version": model_version,
                "state": state, "window": window, "p_value": p_value,
                "evidence": json.dumps(evidence)}])

    def drift(self, station: str | None = None) -> list[dict[str, Any]]:
        query = select(drift_events).order_by(drift_events.c.id)
        if station is not None:
            query = query.where(drift_events.c.station == station)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def add_feedback(self, inspection_id: int, mark: str, note: str | None = None,
                     who: str | None = None) -> None:
        """An operator's word on one verdict: ``not_a_defect`` or ``missed_defect``."""
        if mark not in FEEDBACK:
            raise ValueError(f"feedback {mark!r}: choose one of {', '.join(FEEDBACK)}")
        with self.engine.begin() as connection:
            done = connection.execute(inspections.update().where(
                inspections.c.id == inspection_id).values(
                feedback=mark, feedback_note=note, feedback_at=now(), feedback_by=who))
            if done.rowcount != 1:
                raise ValueError(f"no inspection {inspection_id} in the record")

    def threshold_history(self, station: str, model_version: str) -> list[dict[str, Any]]:
        table = threshold_changes
        query = select(table).where((table.c.station == station)
                                    & (table.c.model_version == model_version)
                                    ).order_by(table.c.id)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def threshold(self, station: str, model_version: str) -> float | None:
        """The threshold in force for this station and model, when feedback changed it."""
        changes = self.threshold_history(station, model_version)
        return changes[-1]["new"] if changes else None

    def change_threshold(self, station: str, model_version: str, old: float, new: float,
                         who: str | None, why: str | None, undoes: int | None = None) -> int:
        """Keep a threshold change (who, when, old, new, why); returns its id."""
        with self.engine.begin() as connection:
            result = connection.execute(insert(threshold_changes), [{
                "station": station, "model_version": model_version, "at": now(),
                "who": who, "old": old, "new": new, "why": why, "undoes": undoes}])
            return int(result.inserted_primary_key[0]) if result.inserted_primary_key \
                else -1

    def undo_threshold(self, station: str, model_version: str, who: str | None = None
                       ) -> dict[str, Any]:
        """Take back the last change that is not itself taken back; kept as a change."""
        changes = self.threshold_history(station, model_version)
        undone = {c["undoes"] for c in changes if c["undoes"] is not None}
        live = [c for c in changes if c["undoes"] is None and c["id"] not in undone]
        if not live:
            raise ValueError(f"no threshold change to undo for {station} ({model_version})")
        last = live[-1]
        current = changes[-1]["new"]
        self.change_threshold(station, model_version, current, last["old"], who,
                              f"undo of change {last['id']}", undoes=last["id"])
        return last

    def inspection(self, inspection_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(inspections).where(
                inspections.c.id == inspection_id)).first()
        return None if row is None else dict(row._mapping)

    def recent(self, station: str, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """How many inspections the station has, and its last ``limit``, newest first."""
        table = inspections
        with self.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(table).where(
                table.c.station == station)).scalar_one()
            rows = connection.execute(select(table).where(table.c.station == station)
                                      .order_by(table.c.id.desc()).limit(limit))
            return int(total), [dict(row._mapping) for row in rows]

    def rows(self, query: Query | None = None) -> Iterator[dict[str, Any]]:
        """Inspections matching ``query``, oldest first, streamed."""
        query = query or Query()
        table, statement = inspections, select(inspections).order_by(inspections.c.id)
        conditions = [
            (query.since, lambda v: table.c.judged_at >= v),
            (query.until, lambda v: table.c.judged_at < v),
            (query.verdict, lambda v: table.c.verdict == v),
            (query.min_score, lambda v: table.c.score >= v),
            (query.max_score, lambda v: table.c.score <= v),
            (query.model, lambda v: (table.c.model == v) | (table.c.model_version == v)),
            (query.station, lambda v: table.c.station == v),
        ]
        for value, condition in conditions:
            if value is not None:
                statement = statement.where(condition(value))
        with self.engine.connect() as connection:
            for row in connection.execution_options(stream_results=True).execute(statement):
                yield dict(row._mapping)


def export_rows(rows: Iterable[dict[str, Any]], output: Path, fmt: str) -> int:
    """Write history rows as CSV, JSON lines or Parquet (pyarrow); returns the count."""
    from anomap.files import atomic_write

    rows = [{k: (v.isoformat() if isinstance(v, dt.datetime) else v)
             for k, v in row.items() if k in HISTORY_COLUMNS} for row in rows]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:
            raise RuntimeError("--format parquet needs pyarrow: pip install pyarrow") from error
        table = pa.Table.from_pylist(rows) if rows else pa.table(
            {c: pa.array([], pa.string()) for c in HISTORY_COLUMNS})
        atomic_write(output, lambda handle: pq.write_table(table, handle))
    elif fmt == "csv":
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(HISTORY_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(output, lambda handle: handle.write(
            text.getvalue().encode("utf-8", "backslashreplace")))
    elif fmt == "jsonl":
        atomic_write(output, lambda handle: handle.write("".join(
            json.dumps(r) + "\n" for r in rows).encode("utf-8", "backslashreplace")))
    else:
        raise ValueError(f"format {fmt!r}: choose csv, jsonl or parquet")
    return len(rows)
