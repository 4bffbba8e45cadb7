"""In-process HTTP tests of POST /feedback (`Digits.to_asgi()` with a real model and a real
SQLite store in a temporary folder, no server).

    .venv/bin/python -m pytest tests/test_service_feedback.py -q

They hold the contract the page relies on (201 and the id; every refusal a JSON
`{"error", "reason"}` with its status), what is stored (the image as sent, the label, the
server's own reading and the label's probability, the client's claim as sent, a salted client
hash), the limits, and a disk that fills up or turns read-only: a clear 507 or 503, while
/predict keeps answering. The disk cases mount a small tmpfs, so they need root (else skip).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import service.service
from pipelines.corrections import NOT_A_DIGIT_LABEL, CorrectionStore
from pipelines.preprocessing import CLASSES, NOT_A_DIGIT
from pipelines.segmentation import Box, Mark
from service.feedback import label_probability, model_answer
from service.service import SETTINGS
from tests.conftest import data_url, remount, scribble, small_disk
from tests.test_service import assert_refusal, counts_by_label, png


@pytest.fixture(scope="module")
def client(service_client) -> TestClient:
    return service_client


@pytest.fixture
def inbox(client):
    """The service's FeedbackInbox (limits and store), restored after each test."""
    return bentoml.get_current_service().inbox


def use_store(inbox, monkeypatch, folder: Path) -> CorrectionStore:
    """Point the running service at a fresh store in `folder`; closed after the test."""
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(folder)})
    monkeypatch.setattr(inbox, "store", store)
    return store


@pytest.fixture
def store(inbox, monkeypatch, tmp_path) -> Iterator[CorrectionStore]:
    store = use_store(inbox, monkeypatch, tmp_path / "feedback")
    yield store
    store.close()


@pytest.fixture(scope="module")
def seven(mnist_test, canvas_png) -> bytes:
    """The first MNIST test digit (a 7) drawn as the page draws it, as PNG bytes."""
    images, labels = mnist_test
    assert labels[0] == 7
    return canvas_png(images[0])


def send(client: TestClient, image: str, label: str, **extra):
    return client.post("/feedback", json={"image": image, "label": label, **extra})


def stored(store: CorrectionStore, response) -> object:
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {"id": body["id"], "status": "pending"}
    correction = store.get(body["id"])
    assert correction is not None
    return correction


# ---- What is stored --------------------------------------------------------------------------


def test_a_correction_is_stored_with_the_servers_own_reading(client, store, seven):
    claim = {"digit": 1, "confidence": 0.99, "model_version": "whatever the page says"}
    before = datetime.now(UTC)
    response = send(client, data_url(seven), "1", answer=claim)
    correction = stored(store, response)
    reading = client.post("/read", json={"image": data_url(seven)}).json()
    info = client.get("/info").json()
    assert correction.image_png == seven  # the PNG as sent, byte for byte
    assert correction.label == "1"
    assert correction.model_answer == reading["text"] == "7"
    assert correction.model_version == info["model_tag"]
    assert correction.client_answer == claim  # kept as sent, for the reviewer; never trusted
    assert 0.0 <= correction.label_probability < 0.1  # the model is sure it is a 7, not a 1
    assert before <= correction.created_at <= datetime.now(UTC)
    assert correction.status == "pending"
    assert correction.client_hash == store.client_hash("testclient")  # TestClient's address
    assert "testclient" not in correction.client_hash


def test_a_confirmed_answer_gets_the_labels_probability(client, store, seven):
    correction = stored(store, send(client, data_url(seven), "7"))
    prediction = client.post("/predict", json={"image": data_url(seven)}).json()
    # Of all eleven outputs, so at most the /predict confidence (the ten digits renormalised).
    assert 0.5 < correction.label_probability <= prediction["confidence"] + 1e-6
    assert correction.client_answer is None


def test_a_number_is_stored_with_the_product_of_its_digits_probabilities(client, store, number_png):
    image = data_url(number_png("2026"))
    correction = stored(store, send(client, image, "2026"))
    reading = client.post("/read", json={"image": image}).json()
    assert correction.model_answer == reading["text"] == "2026"
    assert 0.0 < correction.label_probability <= reading["confidence"] + 1e-6
    other_length = stored(store, send(client, image, "202"))
    assert other_length.label_probability is None  # 4 marks cannot be matched to 3 digits


def test_a_scribble_labelled_not_a_digit(client, store):
    correction = stored(store, send(client, data_url(png(scribble(4))), NOT_A_DIGIT_LABEL))
    assert correction.model_answer == NOT_A_DIGIT_LABEL
    assert correction.label_probability > 0.5


def test_an_image_that_is_not_png_is_stored_as_png(client, store, mnist_test, canvas_png):
    on_white = Image.open(io.BytesIO(canvas_png(mnist_test[0][0], transparent=False)))
    buffer = io.BytesIO()
    on_white.save(buffer, format="JPEG", quality=95)
    correction = stored(store, send(client, data_url(buffer.getvalue(), "image/jpeg"), "7"))
    image = Image.open(io.BytesIO(correction.image_png))
    assert (image.format, image.size) == ("PNG", on_white.size)


# ---- Refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label", ["", "seven", "7.5", "-3", "1" * 25, "Not_A_Digit", " 7", "<b>7</b>"]
)
def test_an_invalid_label_is_refused(client, store, seven, label):
    response = send(client, data_url(seven), label)
    assert_refusal(response, 422, "invalid_label")
    assert "<b>" not in response.text  # a refusal never echoes what was sent
    assert store.count() == 0


def test_a_blank_canvas_has_nothing_to_correct(client, store):
    blank = data_url(png(Image.new("RGBA", (280, 280), (0, 0, 0, 0))))
    assert_refusal(send(client, blank, "7"), 422, "no_digit")
    assert store.count() == 0


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"image": "!!!", "label": "7"}, 400, "invalid_base64"),
        ({"image": "data:text/plain;base64,aGk=", "label": "7"}, 415, "unsupported_media_type"),
        ({"image": "aGVsbG8=", "label": "7"}, 422, "not_an_image"),
        ({"label": "7"}, 400, "missing_field"),
        ({"image": "aGVsbG8="}, 400, "missing_field"),
        ({"image": "aGVsbG8=", "label": 7}, 400, "invalid_field"),
        ({"image": "aGVsbG8=", "label": "7", "answer": "7"}, 400, "invalid_field"),
        ({"image": "aGVsbG8=", "label": "7", "answer": None}, 400, "invalid_field"),
        ({"image": "aGVsbG8=", "label": "7", "user": "me"}, 400, "unexpected_field"),
    ],
)
def test_bad_requests_are_refused_as_predict_refuses_them(client, store, body, status, reason):
    assert_refusal(client.post("/feedback", json=body), status, reason)
    assert store.count() == 0


def test_an_oversized_answer_is_refused(client, store, seven):
    answer = {"note": "x" * SETTINGS.max_feedback_answer_chars}
    assert_refusal(send(client, data_url(seven), "7", answer=answer), 422, "invalid_answer")


def test_too_many_corrections_from_one_client_get_429(client, store, inbox, seven, monkeypatch):
    monkeypatch.setattr(inbox, "per_client_per_hour", 2)
    for _ in range(2):
        assert send(client, data_url(seven), "7").status_code == 201
    response = send(client, data_url(seven), "7")
    assert_refusal(response, 429, "too_many_corrections")
    assert "at most 2" in response.json()["error"]
    # Only the last hour counts: once the corrections are older, the client may send again.
    hour_ago = datetime.now(UTC) - timedelta(hours=1, minutes=1)
    for correction in store.list():
        store.delete(correction.id)
        store.add(
            image_png=correction.image_png,
            label=correction.label,
            client_hash=correction.client_hash,
            now=hour_ago,
        )
    assert send(client, data_url(seven), "7").status_code == 201


def test_the_pending_cap_refuses_until_corrections_are_reviewed(
    client, store, inbox, seven, monkeypatch
):
    monkeypatch.setattr(inbox, "max_pending", 2)
    ids = [send(client, data_url(seven), "7").json()["id"] for _ in range(2)]
    response = send(client, data_url(seven), "7")
    assert_refusal(response, 503, "feedback_full")
    assert "wait for review" in response.json()["error"]
    store.review(ids[:1], "accepted", reviewer="ana")
    assert send(client, data_url(seven), "7").status_code == 201


def test_feedback_can_be_switched_off(client, store, seven, monkeypatch):
    switched_off = dataclasses.replace(SETTINGS, feedback_enabled=False)
    monkeypatch.setattr(service.service, "SETTINGS", switched_off)
    assert_refusal(send(client, data_url(seven), "7"), 503, "feedback_disabled")
    assert store.count() == 0


# ---- A bad disk ------------------------------------------------------------------------------


def test_a_read_only_disk_is_503_and_predicting_goes_on(
    client, inbox, seven, monkeypatch, tmp_path
):
    with small_disk(tmp_path / "disk") as disk:
        store = use_store(inbox, monkeypatch, disk / "feedback")
        first = stored(store, send(client, data_url(seven), "7"))
        store.engine.dispose()  # no file open for writing, so that the disk can turn read-only
        remount(disk, read_only=True)
        response = send(client, data_url(seven), "7")
        assert_refusal(response, 503, "storage_unavailable")
        assert "unavailable" in response.json()["error"]
        assert client.post("/predict", json={"image": data_url(seven)}).status_code == 200
        remount(disk, read_only=False)  # fixed: corrections are taken again, none was lost
        second = stored(store, send(client, data_url(seven), "7"))
        assert [c.id for c in store.list()] == [first.id, second.id]
        store.close()


def test_a_database_that_is_down_is_503_and_predicting_goes_on(client, inbox, seven, monkeypatch):
    down = CorrectionStore("postgresql+psycopg://digits@127.0.0.1:1/digits")  # nobody listens
    monkeypatch.setattr(inbox, "store", down)
    assert_refusal(send(client, data_url(seven), "7"), 503, "storage_unavailable")
    assert client.post("/predict", json={"image": data_url(seven)}).status_code == 200
    down.close()


def test_a_full_disk_is_507_and_predicting_goes_on(client, inbox, seven, monkeypatch, tmp_path):
    with small_disk(tmp_path / "disk", size_kb=192) as disk:
        store = use_store(inbox, monkeypatch, disk / "feedback")
        monkeypatch.setattr(inbox, "per_client_per_hour", 10_000)
        answered = []
        for _ in range(200):
            response = send(client, data_url(seven), "7")
            if response.status_code != 201:
                break
            answered.append(response.json()["id"])
        assert_refusal(response, 507, "storage_full")
        assert "disk is full" in response.json()["error"]
        assert client.post("/predict", json={"image": data_url(seven)}).status_code == 200
        assert answered and {c.id for c in store.list()} == set(answered)
        assert all(c.image_png == seven for c in store.list())
        store.close()


# ---- Metrics and /info -----------------------------------------------------------------------


def feedback_outcomes(client: TestClient) -> dict[str, float]:
    return counts_by_label(client, "digits_feedback_total", "outcome")


def test_metrics_count_feedback_by_outcome(client, store, seven):
    before = feedback_outcomes(client)
    for outcome in ("stored", "invalid_label", "too_many_corrections", "storage_full"):
        assert outcome in before  # listed from the start, so that dashboards find them
    send(client, data_url(seven), "7")
    send(client, data_url(seven), "x")
    after = feedback_outcomes(client)
    assert after["stored"] == before["stored"] + 1
    assert after["invalid_label"] == before["invalid_label"] + 1


def test_info_names_the_corrections_the_model_was_trained_on(client):
    assert "corrections_version" in client.get("/info").json()  # None until the package stage


# ---- The stored reading, from marks ----------------------------------------------------------


def mark(probabilities: dict[int, float]) -> Mark:
    row = np.zeros(CLASSES, dtype=np.float32)
    for index, probability in probabilities.items():
        row[index] = probability
    return Mark(Box(0, 0, 1, 1), np.zeros((28, 28)), row)


def test_the_label_probability_is_the_models_share_for_the_label():
    four, two = mark({4: 0.9, 9: 0.1}), mark({2: 0.6, NOT_A_DIGIT: 0.4})
    assert model_answer([four, two]) == "42"
    assert label_probability([four, two], "42") == pytest.approx(0.9 * 0.6)
    assert label_probability([four, two], "92") == pytest.approx(0.1 * 0.6)
    assert label_probability([four, two], "4") is None
    assert label_probability([four, two], NOT_A_DIGIT_LABEL) == pytest.approx(0.4)
    scribbled = mark({NOT_A_DIGIT: 0.8, 1: 0.2})
    assert model_answer([four, scribbled]) == NOT_A_DIGIT_LABEL
    assert label_probability([four, scribbled], "41") == pytest.approx(0.9 * 0.2)
    assert math.isclose(label_probability([scribbled], NOT_A_DIGIT_LABEL), 0.8, rel_tol=1e-6)
