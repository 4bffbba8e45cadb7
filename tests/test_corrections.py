"""The corrections store (pipelines/corrections.py) on a real SQLite file and a real PostgreSQL.

The same tests run on both backends; the PostgreSQL ones start a throw-away cluster (the
`postgres` fixture of conftest.py) and are marked `slow`. Several processes write one SQLite
file at once, as the server's workers do.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy

from pipelines.corrections import (
    MAX_LABEL_DIGITS,
    NOT_A_DIGIT_LABEL,
    ClientLimitReached,
    CorrectionStore,
    PendingLimitReached,
    StorageUnavailable,
    validate_label,
)

PNG = b"\x89PNG\r\n\x1a\n not really, but the store keeps bytes as they are"
WRITERS = 4
ADDS_PER_WRITER = 50


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CorrectionStore]:
    if request.param == "sqlite":
        opened = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(tmp_path / "feedback")})
    else:
        url = request.getfixturevalue("postgres")
        opened = CorrectionStore(url)
        _empty(opened)
    yield opened
    opened.close()


def _empty(store: CorrectionStore) -> None:
    """The PostgreSQL database is shared by the module's tests: start each from no rows."""
    for correction in store.list():
        store.delete(correction.id)


def add(store: CorrectionStore, label: str = "7", client: str = "client", **fields) -> str:
    return store.add(image_png=PNG, label=label, client_hash=store.client_hash(client), **fields)


@pytest.mark.parametrize("label", ["0", "7", "2026", "9" * MAX_LABEL_DIGITS, NOT_A_DIGIT_LABEL])
def test_valid_labels_are_numbers_or_not_a_digit(label):
    assert validate_label(label) == label


@pytest.mark.parametrize(
    "label", ["", "7.5", "-1", " 7", "seven", "9" * (MAX_LABEL_DIGITS + 1), "٣", "NOT_A_DIGIT"]
)
def test_invalid_labels_are_refused_with_a_clear_message(label):
    with pytest.raises(ValueError, match="digits"):
        validate_label(label)


def test_the_sqlite_folder_is_created_on_first_use_not_before(tmp_path):
    folder = tmp_path / "deep" / "feedback"
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(folder)})
    assert not folder.exists()
    assert store.count() == 0
    assert (folder / "corrections.db").is_file()
    store.close()


def test_a_correction_is_stored_whole_and_read_back(store):
    before = datetime.now(UTC)
    answer = {"digit": 1, "confidence": 0.61, "model_version": "digits-cnn:abc"}
    correction_id = add(
        store,
        label="7",
        model_version="digits-cnn:abc",
        model_answer="1",
        label_probability=0.12,
        client_answer=answer,
    )
    correction = store.get(correction_id)
    assert correction is not None
    assert len(correction.id) == 32 and correction.id == correction_id
    assert before <= correction.created_at <= datetime.now(UTC)
    assert correction.created_at.tzinfo is not None
    assert correction.image_png == PNG
    assert (correction.label, correction.model_answer) == ("7", "1")
    assert correction.model_version == "digits-cnn:abc"
    assert correction.label_probability == pytest.approx(0.12)
    assert correction.client_answer == answer
    assert correction.client_hash == store.client_hash("client") != "client"
    assert (correction.status, correction.reviewed_by, correction.reviewed_at) == (
        "pending",
        None,
        None,
    )
    assert store.get("0" * 32) is None


def test_invalid_labels_never_reach_the_store(store):
    with pytest.raises(ValueError):
        add(store, label="12a")
    assert store.count() == 0


def test_list_is_oldest_first_and_filters_by_status(store):
    now = datetime.now(UTC)
    ids = [add(store, label=str(i), now=now - timedelta(minutes=10 - i)) for i in range(5)]
    assert [c.id for c in store.list()] == ids
    assert [c.id for c in store.list(limit=2)] == ids[:2]
    store.review(ids[1:3], "accepted", reviewer="ana")
    store.review([ids[4]], "rejected", reviewer="ben")
    assert [c.id for c in store.list("accepted")] == ids[1:3]
    assert [c.id for c in store.list("pending")] == [ids[0], ids[3]]
    assert (store.count(), store.count("pending"), store.count("rejected")) == (5, 2, 1)
    with pytest.raises(ValueError, match="status"):
        store.list("maybe")


def test_review_records_who_and_when(store):
    correction_id = add(store)
    before = datetime.now(UTC)
    assert store.review([correction_id, "f" * 32], "accepted", reviewer="ana") == 1
    reviewed = store.get(correction_id)
    assert (reviewed.status, reviewed.reviewed_by) == ("accepted", "ana")
    assert before <= reviewed.reviewed_at <= datetime.now(UTC)
    with pytest.raises(ValueError, match="status"):
        store.review([correction_id], "pending", reviewer="ana")
    with pytest.raises(ValueError, match="reviewer"):
        store.review([correction_id], "rejected", reviewer=" ")


def test_delete_one_and_everything_from_one_client(store):
    mine = [add(store, client="10.0.0.1") for _ in range(3)]
    theirs = add(store, client="10.0.0.2")
    assert store.delete(mine[0]) is True
    assert store.delete(mine[0]) is False
    assert store.delete_client(store.client_hash("10.0.0.1")) == 2
    assert [c.id for c in store.list()] == [theirs]


def test_count_from_client_counts_its_recent_corrections(store):
    now = datetime.now(UTC)
    add(store, client="a", now=now - timedelta(hours=2))
    add(store, client="a", now=now - timedelta(minutes=5))
    add(store, client="a", now=now)
    add(store, client="b", now=now)
    since = now - timedelta(hours=1)
    assert store.count_from_client(store.client_hash("a"), since) == 2
    assert store.count_from_client(store.client_hash("b"), since) == 1
    assert store.count_from_client(store.client_hash("c"), since) == 0


def test_add_refuses_beyond_the_client_limit_within_the_window(store):
    now = datetime.now(UTC)
    add(store, client="a", now=now - timedelta(hours=2), max_per_client=2)
    add(store, client="a", now=now - timedelta(minutes=1), max_per_client=2)
    add(store, client="a", now=now, max_per_client=2)
    with pytest.raises(ClientLimitReached, match="at most 2"):
        add(store, client="a", now=now, max_per_client=2)
    add(store, client="b", now=now, max_per_client=2)  # another client is not affected
    assert store.count() == 4


def test_add_refuses_once_the_pending_cap_is_reached(store):
    first, second = add(store, max_pending=2), add(store, max_pending=2)
    with pytest.raises(PendingLimitReached, match="wait for review"):
        add(store, max_pending=2)
    store.review([first], "rejected", reviewer="ana")  # reviewing frees a place
    add(store, max_pending=2)
    assert store.count("pending") == 2 and store.get(second).status == "pending"


def test_client_hashes_are_salted_and_stable_across_stores(store):
    again = CorrectionStore(store.url.render_as_string(hide_password=False))
    try:
        assert again.client_hash("10.0.0.1") == store.client_hash("10.0.0.1")
    finally:
        again.close()
    assert store.client_hash("10.0.0.1") != store.client_hash("10.0.0.2")
    assert "10.0.0.1" not in store.client_hash("10.0.0.1")
    salted = CorrectionStore(str(store.url), salt="another salt")
    assert salted.client_hash("10.0.0.1") != store.client_hash("10.0.0.1")
    salted.close()


def test_the_salt_comes_from_the_environment_when_given(tmp_path):
    environ = {"DIGITS_FEEDBACK_DIR": str(tmp_path), "DIGITS_FEEDBACK_SALT": "pepper"}
    first, second = CorrectionStore.from_env(environ), CorrectionStore.from_env(environ)
    assert first.client_hash("x") == second.client_hash("x")
    assert not (tmp_path / "corrections.db").exists()  # hashing with a given salt reads nothing
    unsalted = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(tmp_path)})
    assert first.client_hash("x") != unsalted.client_hash("x")


def test_an_unreachable_database_is_unavailable_not_a_crash():
    store = CorrectionStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(StorageUnavailable, match="cannot be used"):
        add(store)
    store.close()


def test_a_folder_that_cannot_be_created_is_unavailable(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(tmp_path / "file" / "fb")})
    with pytest.raises(StorageUnavailable, match="folder"):
        store.count()


def _write_many(
    url: str, writer: int, results: multiprocessing.Queue, max_pending: int | None = None
) -> None:
    """One worker process: ADDS_PER_WRITER corrections, each id (or refusal) reported."""
    store = CorrectionStore(url)
    for index in range(ADDS_PER_WRITER):
        try:
            correction_id = add(
                store, label=str(index), client=f"writer-{writer}", max_pending=max_pending
            )
            results.put(("ok", correction_id))
        except PendingLimitReached:
            results.put(("full", ""))
        except Exception as error:  # reported, counted as a failure by the test
            results.put(("error", repr(error)))
    store.close()


def write_at_once(url: str, max_pending: int | None = None) -> list[tuple[str, str]]:
    """WRITERS processes adding ADDS_PER_WRITER corrections each, all at once; the outcomes."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like server workers
    results = context.Queue()
    writers = [
        context.Process(target=_write_many, args=(url, writer, results, max_pending))
        for writer in range(WRITERS)
    ]
    for process in writers:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(WRITERS * ADDS_PER_WRITER)]
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcomes


def test_several_processes_write_one_sqlite_file_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback' / 'corrections.db'}"
    outcomes = write_at_once(url)
    assert [detail for kind, detail in outcomes if kind != "ok"] == []
    store = CorrectionStore(url)
    stored = {correction.id for correction in store.list()}
    assert stored == {detail for _, detail in outcomes}
    assert len(stored) == WRITERS * ADDS_PER_WRITER
    # One salt for all: each writer's corrections carry the hash this store gives its name.
    hashes = {store.client_hash(f"writer-{writer}") for writer in range(WRITERS)}
    assert {correction.client_hash for correction in store.list()} == hashes
    store.close()


def test_the_pending_cap_holds_when_processes_write_at_once(store):
    """The count and the insert are one locked transaction: never one more than the cap."""
    cap = WRITERS * ADDS_PER_WRITER // 2
    outcomes = write_at_once(store.url.render_as_string(hide_password=False), max_pending=cap)
    kinds = [kind for kind, _ in outcomes]
    assert "error" not in kinds
    assert kinds.count("ok") == cap == store.count("pending")
    assert kinds.count("full") == WRITERS * ADDS_PER_WRITER - cap


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(tmp_path)})
    store.count()
    with store.engine.connect() as connection:
        mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"
    store.close()


@pytest.mark.slow
def test_postgresql_keeps_the_corrections_in_its_own_tables(postgres):
    store = CorrectionStore(postgres)
    _empty(store)
    correction_id = add(store, label="42")
    store.close()
    engine = sqlalchemy.create_engine(postgres)
    with engine.connect() as connection:
        tables = set(sqlalchemy.inspect(connection).get_table_names())
        labels = connection.execute(
            sqlalchemy.select(sqlalchemy.column("label"))
            .select_from(sqlalchemy.table("corrections"))
            .where(sqlalchemy.column("id") == correction_id)
        ).scalars()
        assert list(labels) == ["42"]
    engine.dispose()
    assert {"corrections", "store_settings"} <= tables
