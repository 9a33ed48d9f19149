"""Schema migrations (Alembic, run at start-up): a database written by phitune 0.1.0 (the last
release that made its tables with `create_all`; tests/serve/serve-0.1.0.db holds a key, a file, a
succeeded job with events and a checkpoint) keeps every row and works after the upgrade; the
migrations build exactly the tables the models describe."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("alembic")
pytest.importorskip("fastapi")
from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import inspect, text  # noqa: E402

from phitune.serve import db as dbmod  # noqa: E402
from phitune.serve.app import create_app  # noqa: E402
from phitune.serve.settings import Settings  # noqa: E402

from helpers import POSTGRES, database  # noqa: E402

OLD = Path(__file__).parent / "serve-0.1.0.db"
KEY = "sk-phitune-fixture-alpha"
JOB = "ftjob-0b0b0b0b0b0b0b0b0b0b0b0b"


def head() -> str:
    return ScriptDirectory(str(Path(dbmod.__file__).parent / "migrations")).get_current_head()


def test_a_database_of_the_previous_release_keeps_every_row(tiny_phi3, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(OLD, store / "phitune.db")
    app = create_app(Settings(storage=store, models={"tiny": str(tiny_phi3)}))
    engine = app.state.sessions.kw["bind"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head()
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in dbmod.Base.metadata.tables}
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("checkpoints")}
    assert counts == {"api_keys": 1, "files": 1, "jobs": 1, "events": 2, "checkpoints": 1}
    assert "ix_checkpoints_job_step" in indexes
    client = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    job = client.get(f"/v1/fine_tuning/jobs/{JOB}").json()
    assert job["status"] == "succeeded" and job["metadata"] == {"team": "a"}, job
    assert len(client.get(f"/v1/fine_tuning/jobs/{JOB}/events").json()["data"]) == 2
    assert client.get(f"/v1/fine_tuning/jobs/{JOB}/checkpoints").json()["data"][0]["step_number"] == 10
    assert [m["id"] for m in client.get("/v1/models").json()["data"]][:2] == ["tiny", "ft:tiny:alpha::0b0b0b0b"]
    new = client.post("/v1/files", files={"file": ("t.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
    assert new.status_code == 200 and len(client.get("/v1/files").json()["data"]) == 2
    create_app(Settings(storage=store, models={"tiny": str(tiny_phi3)}))  # a second start changes nothing


def test_the_migrations_build_the_models_tables(tmp_path):
    engine, _, _ = dbmod.connect(f"sqlite:///{tmp_path / 'fresh.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), dbmod.Base.metadata)
    assert diff == [], f"the models and the migrations differ; add a revision in serve/migrations: {diff}"


@pytest.mark.skipif(not POSTGRES, reason="PHITUNE_TEST_POSTGRES not set (scripts/postgres-tests.sh sets it)")
def test_a_postgresql_database_of_the_previous_release_is_upgraded_by_many_at_once():
    """On PostgreSQL: 0.1.0's tables (revision 0001, as its create_all made them, no version
    table) with the fixture's rows; four processes' worth of `connect` at once upgrade it once."""
    import sqlite3
    import threading

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import MetaData, Table, create_engine

    url = database(None)[1]
    raw = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    config = Config()
    config.set_main_option("script_location", str(Path(dbmod.__file__).parent / "migrations"))
    with raw.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        old = sqlite3.connect(OLD)
        for name in ("api_keys", "files", "jobs", "events", "checkpoints"):  # the fixture's rows, as they are
            table = Table(name, MetaData(), autoload_with=conn)
            cursor = old.execute(f"SELECT * FROM {name}")
            columns = [d[0] for d in cursor.description]
            for row in cursor.fetchall():
                conn.execute(table.insert(), {c: _value(table.c[c].type, v) for c, v in zip(columns, row)})
    errors = []

    def start() -> None:
        try:
            dbmod.connect(url)
        except Exception as exc:  # noqa: BLE001 - collected
            errors.append(repr(exc))

    threads = [threading.Thread(target=start) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    with raw.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head()
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in dbmod.Base.metadata.tables}
        assert compare_metadata(MigrationContext.configure(conn), dbmod.Base.metadata) == []
    assert counts == {"api_keys": 1, "files": 1, "jobs": 1, "events": 2, "checkpoints": 1}


def _value(kind, value):
    """A SQLite value for PostgreSQL: JSON text parsed, 0/1 booleans as booleans."""
    import json

    from sqlalchemy import JSON, Boolean

    if isinstance(kind, JSON) and isinstance(value, str):
        return json.loads(value)
    return bool(value) if isinstance(kind, Boolean) and value is not None else value
