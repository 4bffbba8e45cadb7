"""The store of corrections: drawings people sent with the label they say is right.

The service's `POST /feedback` adds to it; the pipeline reviews it and exports the accepted
corrections as a dataset. Both open it the same way:

    store = CorrectionStore.from_env()   # DIGITS_FEEDBACK_URL, or feedback/corrections.db
    correction_id = store.add(image_png=png, label="7", client_hash=store.client_hash(ip))
    store.review([correction_id], "accepted", reviewer="ana")
    store.list("accepted")

One code path (SQLAlchemy Core) serves SQLite, the default (a file under DIGITS_FEEDBACK_DIR,
`feedback/` by default, created on first use), and PostgreSQL in team mode (DIGITS_FEEDBACK_URL,
e.g. `postgresql+psycopg://digits@db.internal/digits`). The conditions it is built for:

- several server workers write at once: SQLite runs in WAL mode with a busy timeout, and every
  write transaction starts with `BEGIN IMMEDIATE`, so writers queue instead of failing; on
  PostgreSQL a write locks one row (`SELECT ... FOR UPDATE`) for the same queueing. The limits
  `add` enforces (pending cap, corrections per client) are checked inside that transaction, so
  they hold across workers;
- a `kill -9` in the middle of a write: every write is one transaction, so a row is there whole
  or not at all;
- a full, read-only or missing disk or database: the database's errors become StorageFull or
  StorageUnavailable, which the service answers with 507 or 503 while it keeps predicting.

A client is stored only as a salted hash (`client_hash`), never as an address: the salt is made
on first use and kept in the database (or given as DIGITS_FEEDBACK_SALT), so hashes are stable
across workers and restarts but cannot be reversed by hashing every address without it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    TypeDecorator,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

STATUSES = ("pending", "accepted", "rejected")
REVIEW_STATUSES = ("accepted", "rejected")
NOT_A_DIGIT_LABEL = "not_a_digit"
MAX_LABEL_DIGITS = 24  # no number is longer (segmentation.MAX_MARKS refuses longer drawings)
MAX_TEXT = 200  # model versions, answers and reviewer names are short

URL_VARIABLE = "DIGITS_FEEDBACK_URL"
DIR_VARIABLE = "DIGITS_FEEDBACK_DIR"
SALT_VARIABLE = "DIGITS_FEEDBACK_SALT"
DEFAULT_DIR = "feedback"
SQLITE_FILE = "corrections.db"
BUSY_TIMEOUT_SECONDS = 30.0  # how long a SQLite writer waits for another before failing
CONNECT_TIMEOUT_SECONDS = 5  # how long to wait for a database server to answer a connection
SALT_KEY = "client_salt"
LOCK_KEY = "write_lock"  # the row a PostgreSQL write locks, so that writers queue
SQLITE_FULL_NAMES = ("SQLITE_FULL",)
POSTGRES_DISK_FULL = "53100"


class StoreError(Exception):
    """The store could not do what was asked."""


class StorageUnavailable(StoreError):
    """The database cannot be reached or written: read-only or missing disk, server down."""


class StorageFull(StoreError):
    """The disk (or the database's size limit) is full."""


class LimitReached(StoreError):
    """A correction was refused by one of the limits `add` was given."""


class PendingLimitReached(LimitReached):
    """As many corrections wait for review as the store may hold."""


class ClientLimitReached(LimitReached):
    """This client has sent as many corrections as it may within the window."""


class UTCDateTime(TypeDecorator):
    """A time in UTC, timezone-aware in Python whatever the backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("times in the store must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()
corrections_table = Table(
    "corrections",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False, index=True),
    Column("image_png", LargeBinary, nullable=False),
    Column("label", String(MAX_LABEL_DIGITS), nullable=False),
    Column("client_hash", String(64), nullable=False, index=True),
    Column("model_version", String(MAX_TEXT)),
    Column("model_answer", String(MAX_TEXT)),
    Column("label_probability", Float),
    Column("client_answer", JSON),
    Column("status", String(16), nullable=False, index=True),
    Column("reviewed_by", String(MAX_TEXT)),
    Column("reviewed_at", UTCDateTime()),
)
settings_table = Table(
    "store_settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(MAX_TEXT), nullable=False),
)


@dataclass(frozen=True)
class Correction:
    id: str  # uuid4 hex, assigned by the store
    created_at: datetime  # UTC
    image_png: bytes  # the image as sent (decoded from its data URL)
    label: str  # "7", "2026" or NOT_A_DIGIT_LABEL
    client_hash: str  # salted hash of the client, never a raw address
    model_version: str | None
    model_answer: str | None  # what the server's model read; None if it found nothing
    label_probability: float | None  # the model's probability for `label`, when computable
    client_answer: dict | None  # what the client says the model answered (untrusted)
    status: str  # one of STATUSES
    reviewed_by: str | None
    reviewed_at: datetime | None


def validate_label(label: str) -> str:
    """The label itself if it is a number of 1 to MAX_LABEL_DIGITS digits or "not_a_digit"."""
    if not isinstance(label, str):
        raise ValueError(f"the label must be a string, got {type(label).__name__}")
    if label == NOT_A_DIGIT_LABEL:
        return label
    if not label or len(label) > MAX_LABEL_DIGITS or not all(c in "0123456789" for c in label):
        # The label itself is not repeated: a refusal never echoes what was sent.
        raise ValueError(
            f"the label must be 1 to {MAX_LABEL_DIGITS} digits (0-9) or '{NOT_A_DIGIT_LABEL}'"
        )
    return label


def validate_status(status: str, allowed: Sequence[str] = STATUSES) -> str:
    if status not in allowed:
        raise ValueError(f"the status must be one of {', '.join(allowed)}, got {status!r}")
    return status


def store_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """DIGITS_FEEDBACK_DIR (default `feedback/` in the working directory): where the default
    SQLite store lives, and where the reviewers' contact sheet goes."""
    return Path(environ.get(DIR_VARIABLE) or DEFAULT_DIR).absolute()


def store_exists(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether there is a store to read: a database URL is given, or the SQLite file exists."""
    return bool(environ.get(URL_VARIABLE)) or (store_folder(environ) / SQLITE_FILE).exists()


class CorrectionStore:
    """Corrections in a SQL database (SQLite or PostgreSQL), opened lazily: nothing touches the
    disk or the network until the first call, and a failed first call is tried again next
    time (a disk made writable again, a database back up)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> CorrectionStore:
        """DIGITS_FEEDBACK_URL (any SQLAlchemy URL), or else a SQLite file `corrections.db`
        under DIGITS_FEEDBACK_DIR (default `feedback/` in the working directory)."""
        url = environ.get(URL_VARIABLE) or f"sqlite:///{store_folder(environ) / SQLITE_FILE}"
        return cls(url, salt=environ.get(SALT_VARIABLE) or None)

    def __init__(self, url: str, salt: str | None = None) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._salt = salt
        self._ready = False
        if self.is_sqlite:
            self.engine = sqlalchemy.create_engine(
                self.url, connect_args={"timeout": BUSY_TIMEOUT_SECONDS}
            )
            _configure_sqlite(self.engine)
        else:
            # A database that does not answer is refused after a few seconds, not a TCP timeout.
            connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
            if "connect_timeout" in self.url.query:
                connect_args = {}
            self.engine = sqlalchemy.create_engine(
                self.url, pool_pre_ping=True, connect_args=connect_args
            )

    # Writing.

    def add(
        self,
        *,
        image_png: bytes,
        label: str,
        client_hash: str,
        model_version: str | None = None,
        model_answer: str | None = None,
        label_probability: float | None = None,
        client_answer: dict | None = None,
        max_pending: int | None = None,
        max_per_client: int | None = None,
        client_window: timedelta = timedelta(hours=1),
        now: datetime | None = None,
    ) -> str:
        """Store one pending correction, in one transaction; its id.

        With `max_pending`, refuse (PendingLimitReached) when that many already wait for
        review; with `max_per_client`, refuse (ClientLimitReached) when the client sent that
        many within `client_window`. Both are checked under the write lock, across workers.
        """
        validate_label(label)
        if not image_png:
            raise ValueError("the image is empty")
        now = now or datetime.now(UTC)
        row = {
            "id": uuid.uuid4().hex,
            "created_at": now,
            "image_png": bytes(image_png),
            "label": label,
            "client_hash": client_hash,
            "model_version": _short(model_version),
            "model_answer": _short(model_answer),
            "label_probability": None if label_probability is None else float(label_probability),
            "client_answer": client_answer,
            "status": "pending",
        }
        with self._writing() as conn:
            if max_pending is not None and _count(conn, status="pending") >= max_pending:
                raise PendingLimitReached(
                    f"{max_pending} corrections already wait for review; no more are taken "
                    "until some are reviewed"
                )
            if max_per_client is not None:
                sent = _count(conn, client_hash=client_hash, since=now - client_window)
                if sent >= max_per_client:
                    raise ClientLimitReached(
                        f"at most {max_per_client} corrections per client within "
                        f"{_duration(client_window)}; try again later"
                    )
            conn.execute(corrections_table.insert().values(**row))
        return row["id"]

    def review(self, ids: Sequence[str], status: str, reviewer: str) -> int:
        """Mark corrections accepted or rejected by `reviewer`, now; how many were found."""
        validate_status(status, REVIEW_STATUSES)
        if not reviewer or not reviewer.strip():
            raise ValueError("the reviewer must be named")
        if not ids:
            return 0
        update = (
            corrections_table.update()
            .where(corrections_table.c.id.in_(list(ids)))
            .values(status=status, reviewed_by=_short(reviewer), reviewed_at=datetime.now(UTC))
        )
        with self._writing() as conn:
            return conn.execute(update).rowcount

    def delete(self, id: str) -> bool:
        """Delete one correction; whether it was there."""
        with self._writing() as conn:
            return conn.execute(corrections_table.delete().where(_is(id))).rowcount > 0

    def delete_client(self, client_hash: str) -> int:
        """Delete every correction from one client hash; how many."""
        where = corrections_table.c.client_hash == client_hash
        with self._writing() as conn:
            return conn.execute(corrections_table.delete().where(where)).rowcount

    # Reading.

    def get(self, id: str) -> Correction | None:
        with self._reading() as conn:
            row = conn.execute(select(corrections_table).where(_is(id))).mappings().first()
        return None if row is None else Correction(**row)

    def list(self, status: str | None = None, limit: int | None = None) -> list[Correction]:
        """Corrections, oldest first, optionally of one status only."""
        query = select(corrections_table).order_by(
            corrections_table.c.created_at, corrections_table.c.id
        )
        if status is not None:
            query = query.where(corrections_table.c.status == validate_status(status))
        if limit is not None:
            query = query.limit(limit)
        with self._reading() as conn:
            return [Correction(**row) for row in conn.execute(query).mappings()]

    def count(self, status: str | None = None) -> int:
        if status is not None:
            validate_status(status)
        with self._reading() as conn:
            return _count(conn, status=status)

    def count_from_client(self, client_hash: str, since: datetime) -> int:
        """Corrections this client sent since then, whatever became of them."""
        with self._reading() as conn:
            return _count(conn, client_hash=client_hash, since=since)

    def client_hash(self, client: str) -> str:
        """A salted SHA-256 of a client's address (hex): the same for the same client in every
        worker and after restarts, and useless without the salt."""
        salt = self._salt or self._stored_salt()
        return hmac.new(salt.encode(), client.encode(), hashlib.sha256).hexdigest()

    def close(self) -> None:
        self.engine.dispose()

    # Plumbing.

    def _stored_salt(self) -> str:
        with self._reading() as conn:
            salt = conn.execute(_setting(SALT_KEY)).scalar()
        if salt is None:
            with self._writing() as conn:
                salt = conn.execute(_setting(SALT_KEY)).scalar()
                if salt is None:
                    salt = secrets.token_hex(32)
                    conn.execute(settings_table.insert().values(key=SALT_KEY, value=salt))
        self._salt = salt
        return salt

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        self._prepare()
        with _translated_errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction, holding the write lock from its start; committed at the end,
        rolled back on any exception."""
        self._prepare()
        with _translated_errors(), self.engine.connect() as conn:
            conn.execution_options(digits_write=True)
            with conn.begin():
                if not self.is_sqlite:  # SQLite's BEGIN IMMEDIATE is its lock
                    conn.execute(_setting(LOCK_KEY).with_for_update()).scalar()
                yield conn

    def _prepare(self) -> None:
        """Create the SQLite folder, the tables and the lock row, once."""
        if self._ready:
            return
        with _translated_errors():
            if self.is_sqlite and self.url.database not in (None, "", ":memory:"):
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._create_schema()
            except (IntegrityError, sqlalchemy.exc.ProgrammingError):
                self._create_schema()  # another process created it meanwhile; now it is there
        self._ready = True

    def _create_schema(self) -> None:
        with self.engine.connect() as conn:
            conn.execution_options(digits_write=True)
            with conn.begin():
                metadata.create_all(conn)
                if conn.execute(_setting(LOCK_KEY)).scalar() is None:
                    conn.execute(settings_table.insert().values(key=LOCK_KEY, value="1"))


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers never block the writer, and a crash leaves committed rows whole), and
    write transactions that take the write lock at BEGIN, waiting up to the busy timeout.

    pysqlite's own transaction handling begins only before an INSERT/UPDATE/DELETE and with a
    plain BEGIN, so a count followed by an insert could interleave with another writer's; as
    SQLAlchemy's SQLite documentation recommends, it is switched off here and SQLAlchemy's
    `begin` event emits the BEGIN instead.
    """

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it is answered
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("digits_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def _translated_errors() -> Iterator[None]:
    """Database and disk errors as StorageFull or StorageUnavailable."""
    try:
        yield
    except StoreError:
        raise
    except DBAPIError as error:
        if _is_disk_full(error.orig):
            raise StorageFull("the corrections database's disk is full") from error
        raise StorageUnavailable(
            f"the corrections database cannot be used: {_first_line(error.orig)}"
        ) from error
    except SQLAlchemyError as error:
        raise StorageUnavailable(f"the corrections database cannot be used: {error}") from error
    except OSError as error:
        if error.errno == 28:  # ENOSPC
            raise StorageFull("the corrections folder's disk is full") from error
        raise StorageUnavailable(
            f"the corrections folder cannot be used: {error.strerror}"
        ) from error


def _is_disk_full(orig: BaseException | None) -> bool:
    if getattr(orig, "sqlite_errorname", None) in SQLITE_FULL_NAMES:
        return True
    return getattr(orig, "sqlstate", None) == POSTGRES_DISK_FULL


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _count(
    conn: Connection,
    status: str | None = None,
    client_hash: str | None = None,
    since: datetime | None = None,
) -> int:
    query = select(func.count()).select_from(corrections_table)
    if status is not None:
        query = query.where(corrections_table.c.status == status)
    if client_hash is not None:
        query = query.where(corrections_table.c.client_hash == client_hash)
    if since is not None:
        query = query.where(corrections_table.c.created_at >= since)
    return int(conn.execute(query).scalar_one())


def _is(id: str) -> Any:
    return corrections_table.c.id == id


def _setting(key: str) -> Any:
    return select(settings_table.c.value).where(settings_table.c.key == key)


def _duration(window: timedelta) -> str:
    """'an hour', '10 minutes', '90 seconds'."""
    seconds = int(window.total_seconds())
    if seconds == 3600:
        return "an hour"
    if seconds % 60 == 0:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


def _short(text: str | None) -> str | None:
    return None if text is None else str(text)[:MAX_TEXT]
