"""Engine, sessions and migrations. SQLite (WAL) in DATA_DIR by default; ``DATABASE_URL`` for PostgreSQL
(``postgresql+psycopg://user:password@host/db``), which many workers on many hosts can share."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from filelock import FileLock
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import PROJECT_ROOT, Settings

# pg_advisory_lock key that serialises migrations of API and workers started at once on any host.
_MIGRATION_LOCK_KEY = 0x696E74656E74  # "intent"


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def get_engine(settings: Settings) -> Engine:
    return _engine_for(settings.sqlalchemy_url)


def dispose_engine(settings: Settings) -> None:
    """Close this process's pooled connections to the settings' database (a test drops it after)."""
    _engine_for(settings.sqlalchemy_url).dispose()


def is_postgresql(session_or_engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"


def display_url(settings: Settings) -> str:
    """The database URL without its password, for logs."""
    return make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings):
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def run_migrations(settings: Settings) -> None:
    """Upgrade the schema to head with Alembic. Start-ups of API and workers are serialised: on PostgreSQL
    by an advisory lock (they may run on different hosts), on SQLite by a file lock next to the database."""
    from alembic import command
    from alembic.config import Config

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    engine = get_engine(settings)
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                command.upgrade(cfg, "head")
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                connection.commit()
        return
    with FileLock(Path(settings.data_dir) / ".migrate.lock"):
        command.upgrade(cfg, "head")
