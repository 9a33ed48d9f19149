"""The service's tables (SQLAlchemy 2): API keys, files, jobs, events, checkpoints.

Every row belongs to an organization; every query filters by it (a foreign id is a 404, never a
403). Each table has an autoincrement `seq`: list order and `after=` pagination use it, so ids
stay stable and pages never shift. SQLite runs in WAL mode (one writer, many readers); the same
code runs on PostgreSQL for several workers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Executable,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy import Engine


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of a 256-bit random key
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))  # shown back, never used as a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class Job(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    status: Mapped[str] = mapped_column(String(24), index=True, default="validating_files")
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=42)
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    method: Mapped[dict] = mapped_column(JSON)  # {"type": supervised|dpo, ...: {"hyperparameters": {...}}} as asked
    hyperparameters: Mapped[dict] = mapped_column(JSON)  # the values chosen ("auto" resolved)
    phitune: Mapped[dict] = mapped_column(JSON, default=dict)  # extra_body options, config keys
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)  # who claimed it
    heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    requested: Mapped[str | None] = mapped_column(String(16), nullable=True)  # cancel | pause, for the worker
    model_deleted: Mapped[bool] = mapped_column(Boolean, default=False)  # DELETE /models/{fine_tuned_model}


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="message")
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)  # metrics events: one per step, never twice


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step", unique=True),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    model_name: Mapped[str] = mapped_column(String(255))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


def add_event(
    db: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict | None = None,
    step: int | None = None,
) -> None:
    """A job event in the caller's transaction (the API's state changes, the worker's progress)."""
    db.add(Event(id=new_id("ftevent"), job_id=job_id, message=message, level=level, type=type, data=data, step=step))


def _engine(url: str, *, immediate: bool):
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # transactions begin below, not in the driver
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        if immediate:

            @event.listens_for(engine, "begin")
            def _begin(conn) -> None:
                # Writers take the write lock at the start: a transaction that reads and then
                # writes would otherwise fail at once (SQLITE_BUSY) when another process wrote in
                # between, instead of waiting its turn. Readers never wait (WAL) and run each
                # statement on its own (autocommit): no BEGIN/ROLLBACK round trips per request.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def first(db: Session | Connection, stmt: Executable, **params: object) -> Any:
    """One object or None: an ORM object from a write Session, a Row (the same attribute names)
    from a read Connection."""
    return db.scalar(stmt, params) if isinstance(db, Session) else db.execute(stmt, params).first()


def migrate(engine: Engine) -> None:
    """The database at the newest schema revision (Alembic, `serve/migrations`), in one
    transaction that holds the write lock: of several processes starting at once, the first
    upgrades and the others find it done. A database from before migrations (phitune 0.1.0 made
    its tables with `create_all`) is stamped as the first revision, then upgraded."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(5262851)")  # one migrator at a time
        config.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(config, "0001")
        command.upgrade(config, "head")


def connect(url: str) -> tuple[Engine, sessionmaker, Callable[[], Connection]]:
    """(engine, ORM sessions for writing, plain connections for reading), the schema brought up to
    date (`migrate`). Reads skip the ORM (rows, not objects): a read request costs about a third
    less. On PostgreSQL both share one engine."""
    if url.startswith("postgresql://"):  # psycopg 3 (phitune[serve]) rather than SQLAlchemy's default psycopg2
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    engine = _engine(url, immediate=True)
    migrate(engine)
    reader = _engine(url, immediate=False) if url.startswith("sqlite") else engine
    return engine, sessionmaker(engine, expire_on_commit=False), reader.connect
