"""In-process HTTP tests of the service (`Digits.to_asgi()` with a real model, no server).

    .venv/bin/python -m pytest tests/test_service.py -q

They hold the API contract in place (the answer's shape, the Flask-compatible request and the
`digit` key), reading numbers on /read, the refusal of drawings that are not one digit, the
refusal of every kind of bad input with a 4xx JSON `{"error", "reason"}` and never a 500 or a
stack trace, the page at `/` without path traversal, and the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pipelines.preprocessing import CLASSES, NOT_A_DIGIT, PREPROCESSING_VERSION, SEVERAL_DIGITS
from pipelines.segmentation import Box, Mark
from service.answers import not_a_digit_message
from service.batcher import MicroBatcher
from service.guard import RequestGuard
from service.service import SETTINGS, Digits, PredictRequest
from service.settings import Settings
from tests.conftest import NUMBER_CANVAS, render_line, scribble, scribble_glyph

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_TO_READ = 30  # rendered MNIST test digits; the small test model reads ~97% of them


@pytest.fixture(scope="module")
def client(service_client) -> TestClient:
    return service_client


@pytest.fixture(scope="module")
def digit(mnist_test, canvas_png) -> tuple[str, int]:
    """The first MNIST test digit (a 7) as a canvas data URL, and its label."""
    images, labels = mnist_test
    return data_url(canvas_png(images[0])), int(labels[0])


def predict(client: TestClient, image: str):
    return client.post("/predict", json={"image": image})


def read(client: TestClient, image: str):
    return client.post("/read", json={"image": image})


def assert_refusal(response, status: int, reason: str) -> None:
    """A JSON refusal with exactly `error` and `reason`, and nothing from the server's insides."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "reason"}, body
    assert body["reason"] == reason, body
    assert body["error"]
    for leak in ("Traceback", 'File "', str(REPO_ROOT), "site-packages"):
        assert leak not in response.text


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


# ---- The answer ------------------------------------------------------------------------------


def test_predict_reads_rendered_mnist_digits(client, mnist_test, canvas_png):
    images, labels = mnist_test
    read = [
        predict(client, data_url(canvas_png(images[i]))).json()["digit"]
        for i in range(DIGITS_TO_READ)
    ]
    correct = int(np.sum(np.array(read) == labels[:DIGITS_TO_READ]))
    assert correct >= DIGITS_TO_READ - 3, f"read {read}, expected {labels[:DIGITS_TO_READ]}"


def test_predict_answer_has_the_documented_shape(client, digit):
    image, label = digit
    response = predict(client, image)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "digit",
        "confidence",
        "probabilities",
        "top3",
        "not_a_digit",
        "model_version",
    }
    assert body["digit"] == label
    assert 0.0 <= body["not_a_digit"] < 0.5
    probabilities = body["probabilities"]
    assert len(probabilities) == 10
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert body["confidence"] == max(probabilities)
    assert body["digit"] == int(np.argmax(probabilities))
    top3 = body["top3"]
    assert [entry["digit"] for entry in top3][0] == body["digit"]
    assert [entry["probability"] for entry in top3] == sorted(probabilities, reverse=True)[:3]
    assert body["model_version"].startswith("digits-cnn:")
    assert body["model_version"] != "digits-cnn:latest"


def test_predict_accepts_bare_base64(client, digit):
    image, label = digit
    response = predict(client, image.split(",", 1)[1])
    assert response.status_code == 200
    assert response.json()["digit"] == label


def test_predict_ignores_line_breaks_in_base64(client, digit):
    image, label = digit
    header, payload = image.split(",", 1)
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    assert predict(client, f"{header},{wrapped}").json()["digit"] == label


def test_predict_reads_dark_strokes_on_transparent_and_on_white(client, mnist_test, canvas_png):
    images, labels = mnist_test
    for transparent in (True, False):
        canvas = canvas_png(images[1], transparent=transparent)
        assert Image.open(io.BytesIO(canvas)).mode == ("RGBA" if transparent else "L")
        assert predict(client, data_url(canvas)).json()["digit"] == labels[1]


def test_predict_reads_jpeg(client, mnist_test, canvas_png):
    images, labels = mnist_test
    buffer = io.BytesIO()
    Image.open(io.BytesIO(canvas_png(images[2], transparent=False))).save(buffer, "JPEG")
    response = predict(client, data_url(buffer.getvalue(), "image/jpeg"))
    assert response.json()["digit"] == labels[2]


@pytest.mark.parametrize(
    "canvas",
    [
        Image.new("RGB", (280, 280), "white"),
        Image.new("RGB", (280, 280), "black"),
        Image.new("RGBA", (280, 280), (0, 0, 0, 0)),  # an untouched canvas
    ],
    ids=["white", "black", "transparent"],
)
def test_blank_canvas_is_no_digit(client, canvas):
    response = predict(client, data_url(png(canvas)))
    assert_refusal(response, 422, "no_digit")
    assert response.json()["error"] == "no digit found in the image"


def test_animated_gif_is_read_from_its_first_frame(client, mnist_test):
    images, labels = mnist_test
    first = Image.fromarray(255 - images[3]).resize((140, 140))
    second = Image.fromarray(255 - images[4]).resize((140, 140))
    assert labels[3] != labels[4]
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    response = predict(client, data_url(buffer.getvalue(), "image/gif"))
    assert response.status_code == 200
    assert response.json()["digit"] == labels[3]


def test_predict_batch_mixes_answers_and_refusals(client, mnist_test, canvas_png):
    images, labels = mnist_test
    blank = data_url(png(Image.new("RGB", (100, 100), "white")))
    batch = [
        data_url(canvas_png(images[0])),
        "not base64!",
        blank,
        b64(canvas_png(images[1])),
    ]
    response = client.post("/predict_batch", json={"images": batch})
    assert response.status_code == 200
    answers = response.json()["predictions"]
    assert len(answers) == 4
    assert answers[0]["digit"] == labels[0]
    assert answers[1] == {"error": "the image is not valid base64", "reason": "invalid_base64"}
    assert answers[2]["reason"] == "no_digit"
    assert answers[3]["digit"] == labels[1]
    single = predict(client, batch[0]).json()
    assert answers[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


@pytest.mark.parametrize("count", [0, SETTINGS.max_batch_images + 1])
def test_predict_batch_refuses_empty_and_oversized_batches(client, count):
    response = client.post("/predict_batch", json={"images": ["x"] * count})
    assert_refusal(response, 400, "invalid_batch_size")


def test_info_describes_the_model(client):
    response = client.get("/info")
    assert response.status_code == 200
    info = response.json()
    assert info["model_tag"].startswith("digits-cnn:")
    assert info["preprocessing_version"] == PREPROCESSING_VERSION
    assert isinstance(info["registry_version"], int)
    for key in ("mlflow_run_id", "val_accuracy", "test_accuracy", "trained_at"):
        assert info[key] is not None


# ---- Reading a number ------------------------------------------------------------------------


def decoded_data_url(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.mark.parametrize("text", ["47", "2026"])
def test_read_reads_a_number_left_to_right(client, number_png, text):
    response = read(client, data_url(number_png(text)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text", "confidence", "digits", "model_version"}
    assert body["text"] == text
    assert body["model_version"].startswith("digits-cnn:")
    digits = body["digits"]
    assert [entry["digit"] for entry in digits] == [int(character) for character in text]
    assert body["confidence"] == pytest.approx(math.prod(d["confidence"] for d in digits), 1e-4)
    width, height = NUMBER_CANVAS
    slot = width // len(text)  # where render_line drew each digit
    for position, entry in enumerate(digits):
        assert set(entry) == {"digit", "confidence", "probabilities", "box", "input"}
        assert len(entry["probabilities"]) == 10
        assert sum(entry["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        assert entry["confidence"] == max(entry["probabilities"])
        box = entry["box"]
        assert 0 <= box["x"] < box["x"] + box["width"] <= width
        assert 0 <= box["y"] < box["y"] + box["height"] <= height
        assert position * slot <= box["x"] + box["width"] // 2 < (position + 1) * slot
    rights = [entry["box"]["x"] + entry["box"]["width"] for entry in digits]
    lefts = [entry["box"]["x"] for entry in digits]
    assert all(right <= left for right, left in zip(rights, lefts[1:], strict=False))


def test_read_shows_each_input_as_the_model_saw_it(client, number_png):
    body = read(client, data_url(number_png("47"))).json()
    for entry in body["digits"]:
        image = decoded_data_url(entry["input"])
        assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
        pixels = np.asarray(image)
        assert pixels[0].min() == pixels[-1].min() == 255  # white around the digit
        assert pixels.min() < 64  # dark ink


def test_read_of_one_digit_answers_as_predict(client, mnist_test, canvas_png):
    images, _ = mnist_test
    for index in range(10):
        image = data_url(canvas_png(images[index]))
        single, number = predict(client, image).json(), read(client, image).json()
        assert number["text"] == str(single["digit"]), index
        (entry,) = number["digits"]
        assert entry["probabilities"] == single["probabilities"], index
        assert number["confidence"] == entry["confidence"] == single["confidence"], index


def test_read_of_a_blank_canvas_is_no_digit(client):
    response = read(client, data_url(png(Image.new("RGBA", (840, 280), (0, 0, 0, 0)))))
    assert_refusal(response, 422, "no_digit")


# ---- Refusing what is not one digit ----------------------------------------------------------

SCRIBBLES = 10  # dense scribbles drawn for the refusal tests


@pytest.fixture(scope="module")
def held_out_drawings(not_digit_drawings) -> np.ndarray:
    """Omniglot drawings of the test alphabets, which neither training nor the threshold saw."""
    return not_digit_drawings["images"][not_digit_drawings["split"] == "test"]


def test_predict_refuses_several_digits(client, number_png):
    response = predict(client, data_url(number_png("47", size=(560, 280))))
    assert_refusal(response, 422, "several_digits")
    assert "/read" in response.json()["error"]


def test_predict_refuses_scribbles_as_not_a_digit(client):
    for seed in range(SCRIBBLES):
        response = predict(client, data_url(png(scribble(seed))))
        assert_refusal(response, 422, "not_a_digit")


def test_most_drawings_of_unseen_alphabets_are_not_digits(client, held_out_drawings, canvas_png):
    """The test model refuses about two thirds of them; the rest are read as a digit, or as
    several (characters of separate strokes)."""
    sample = held_out_drawings[:: len(held_out_drawings) // 40][:40]
    answers = [predict(client, data_url(canvas_png(drawing))) for drawing in sample]
    reasons = [answer.json().get("reason", "digit") for answer in answers]
    assert set(reasons) <= {"digit", "not_a_digit", "several_digits"}, reasons
    assert reasons.count("not_a_digit") >= 0.5 * len(sample), reasons


def test_read_refuses_a_scribble_with_its_mark(client):
    response = read(client, data_url(png(scribble(0))))
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "reason", "marks"}
    assert (body["error"], body["reason"]) == ("the drawing is not a digit", "not_a_digit")
    (mark,) = body["marks"]
    assert mark["is_digit"] is False
    assert mark["digit"] is None
    assert mark["confidence"] > 0.5  # how sure the model is that this is no digit


def test_read_says_which_mark_is_not_a_digit(client, mnist_test):
    images, labels = mnist_test
    four, seven = (images[np.flatnonzero(labels == digit)[0]] for digit in (4, 7))
    response = read(client, data_url(render_line([four, scribble_glyph(1), seven])))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["reason"] == "not_a_digit"
    assert body["error"] == "mark 2 of 3 is not a digit"
    marks = body["marks"]
    assert [mark["is_digit"] for mark in marks] == [True, False, True]
    assert [mark["digit"] for mark in marks] == [4, None, 7]
    for mark in marks:
        assert set(mark) == {
            "digit",
            "confidence",
            "probabilities",
            "box",
            "input",
            "is_digit",
            "several_digits",
        }
    assert marks[0]["box"]["x"] < marks[1]["box"]["x"] < marks[2]["box"]["x"]


def mark(is_digit: bool, answer: int = NOT_A_DIGIT) -> Mark:
    probabilities = np.full(CLASSES, 0.01, np.float32)
    probabilities[answer if not is_digit else 3] = 0.9
    return Mark(Box(0, 0, 1, 1), np.zeros((28, 28), np.float32), probabilities)


@pytest.mark.parametrize(
    ("digits", "message"),
    [
        ([False], "the drawing is not a digit"),
        ([True, False, True], "mark 2 of 3 is not a digit"),
        ([False, True, True, False], "marks 1 and 4 of 4 are not digits"),
        ([False, False, True, False], "marks 1, 2 and 4 of 4 are not digits"),
    ],
)
def test_not_a_digit_message_names_the_marks(digits, message):
    assert not_a_digit_message([mark(is_digit) for is_digit in digits]) == message


def test_not_a_digit_message_asks_for_a_gap_when_a_mark_is_touching_digits():
    message = not_a_digit_message([mark(True), mark(False, SEVERAL_DIGITS)])
    assert message.startswith("mark 2 of 2 is not a digit") and "leave a gap" in message


def test_predict_batch_refuses_several_digits_and_non_digits_per_image(
    client, number_png, canvas_png, mnist_test
):
    images, labels = mnist_test
    batch = [
        data_url(number_png("47", size=(560, 280))),
        data_url(canvas_png(images[0])),
        data_url(png(scribble(2))),
    ]
    answers = client.post("/predict_batch", json={"images": batch}).json()["predictions"]
    assert answers[0]["reason"] == "several_digits"
    assert answers[1]["digit"] == labels[0]
    assert answers[2]["reason"] == "not_a_digit"
    assert set(answers[2]) == {"error", "reason"}


# ---- Bad requests ----------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
IMAGE_ROUTES = ["/predict", "/read"]  # both take {"image": ...} and refuse bad input alike


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (b"{not json", JSON, 400, "invalid_json"),
        (b"\xff\xfe", JSON, 400, "invalid_json"),
        (b"", JSON, 400, "missing_field"),
        (b'["data:image/png;base64,AAAA"]', JSON, 400, "invalid_request"),
        (b'"just a string"', JSON, 400, "invalid_request"),
        (b"{}", JSON, 400, "missing_field"),
        (b'{"img": "AAAA"}', JSON, 400, "missing_field"),
        (b'{"image": "AAAA", "extra": 1}', JSON, 400, "unexpected_field"),
        (b'{"image": 42}', JSON, 400, "invalid_field"),
        (b'{"image": null}', JSON, 400, "invalid_field"),
        (b'{"image": ["AAAA"]}', JSON, 400, "invalid_field"),
        (b'{"image": "AAAA"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (
            b"image=AAAA",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (b'{"image": "AAAA"}', {}, 415, "unsupported_media_type"),
    ],
    ids=[
        "invalid-json",
        "invalid-utf8",
        "empty-body",
        "json-array",
        "json-string",
        "empty-object",
        "misnamed-field",
        "extra-field",
        "number",
        "null",
        "list",
        "text-plain",
        "form",
        "no-content-type",
    ],
)
@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_malformed_requests_are_refused(client, route, body, headers, status, reason):
    assert_refusal(client.post(route, content=body, headers=headers), status, reason)


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (b"{not json", JSON, 400, "invalid_json"),
        (b'{"image": "AAAA"}', JSON, 400, "missing_field"),
        (b'{"images": ["AAAA"], "extra": 1}', JSON, 400, "unexpected_field"),
        (b'{"images": "AAAA"}', JSON, 400, "invalid_field"),
        (b'{"images": [1, 2]}', JSON, 400, "invalid_field"),
        (b'{"images": ["AAAA"]}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    ],
    ids=["invalid-json", "single-image-field", "extra-field", "string", "numbers", "text-plain"],
)
def test_malformed_batch_requests_are_refused(client, body, headers, status, reason):
    assert_refusal(client.post("/predict_batch", content=body, headers=headers), status, reason)


@pytest.mark.parametrize(
    ("image", "status", "reason"),
    [
        ("", 400, "empty_image"),
        ("data:image/png;base64,", 400, "empty_image"),
        ("!!!not base64???", 400, "invalid_base64"),
        ("data:image/png;base64,AAA", 400, "invalid_base64"),  # bad padding
        ("data:image/png;base64,ÄÖÜ", 400, "invalid_base64"),
        ("data:image/png;base64", 400, "invalid_data_url"),
        ("data:image/png," + "%89PNG", 400, "invalid_data_url"),
        ("data:text/plain;base64," + b64(b"hello"), 415, "unsupported_media_type"),
        ("data:;base64," + b64(b"hello"), 415, "unsupported_media_type"),
        ("data:application/pdf;base64," + b64(b"%PDF-1.4"), 415, "unsupported_media_type"),
        (b64(b"hello, this is text"), 422, "not_an_image"),
        (
            "data:image/svg+xml;base64,"
            + b64(b'<svg xmlns="http://www.w3.org/2000/svg"><text>7</text></svg>'),
            422,
            "not_an_image",
        ),
    ],
    ids=[
        "empty",
        "empty-data-url",
        "not-base64",
        "bad-padding",
        "non-ascii",
        "no-comma",
        "not-base64-data-url",
        "text-mime",
        "no-mime",
        "pdf-mime",
        "text-bytes",
        "svg",
    ],
)
@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_bad_images_are_refused(client, route, image, status, reason):
    assert_refusal(client.post(route, json={"image": image}), status, reason)


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


STROKE = np.zeros((60, 60), np.uint8)
STROKE[10:50, 27:34] = 255  # a "1", light on dark


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (encoded(Image.new("L", (1, 1)), "PNG"), "no_digit"),
        (encoded(Image.new("L", (1, 4_000_000)), "PNG"), "no_digit"),
        (encoded(Image.fromarray(STROKE.astype(np.uint16) * 257), "PNG"), None),
        (encoded(Image.fromarray(STROKE).convert("P"), "PNG", transparency=0), None),
        (encoded(Image.fromarray(np.dstack([255 - STROKE, STROKE]), "LA"), "PNG"), None),
        (encoded(Image.fromarray(STROKE).convert("CMYK"), "JPEG"), None),
        (encoded(Image.fromarray(STROKE).convert("1"), "PNG"), None),
        (encoded(Image.fromarray(STROKE), "WEBP"), None),
        (encoded(Image.fromarray(STROKE), "BMP"), None),
        (encoded(Image.fromarray(STROKE), "ICO"), "unsupported_format"),
    ],
    ids=["1x1", "1x4M", "16-bit", "palette", "gray-alpha", "cmyk", "1-bit", "webp", "bmp", "ico"],
)
def test_unusual_images_get_an_answer_or_a_refusal(client, data, refusal):
    response = predict(client, b64(data))
    if refusal is None:
        assert response.status_code == 200, response.text
        assert response.json()["digit"] == 1
    else:
        assert_refusal(response, 422, refusal)


def test_tiff_is_an_unsupported_format(client):
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, "TIFF")
    assert_refusal(predict(client, b64(buffer.getvalue())), 422, "unsupported_format")


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_truncated_png_is_refused(client, route, mnist_test, canvas_png):
    canvas = canvas_png(mnist_test[0][0])
    image = data_url(canvas[: len(canvas) // 2])
    assert_refusal(client.post(route, json={"image": image}), 422, "corrupt_image")


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_image_above_the_pixel_limit_is_refused_before_decoding(client, route):
    side = int(SETTINGS.max_image_pixels**0.5) + 1
    small_file = png(Image.new("1", (side, side)))
    assert len(small_file) < 20_000
    assert_refusal(client.post(route, json={"image": data_url(small_file)}), 413, "too_large")


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_decompression_bomb_is_refused(client, route):
    image = data_url(png_header(100_000, 100_000))
    assert_refusal(client.post(route, json={"image": image}), 413, "too_large")


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_oversized_body_is_refused_from_its_content_length(client, route):
    body = json.dumps({"image": "A" * (SETTINGS.max_body_bytes + 1)}).encode()
    response = client.post(route, content=body, headers=JSON)
    assert_refusal(response, 413, "body_too_large")
    assert response.headers["connection"] == "close"


def test_oversized_streamed_body_is_refused_without_a_content_length(client):
    def chunks() -> Iterator[bytes]:
        yield b'{"image": "'
        for _ in range(SETTINGS.max_body_bytes // 65536 + 2):
            yield b"A" * 65536
        yield b'"}'

    response = client.post("/predict", content=chunks(), headers=JSON)
    assert_refusal(response, 413, "body_too_large")


@pytest.mark.parametrize("route", [*IMAGE_ROUTES, "/predict_batch"])
def test_api_routes_answer_only_post(client, route):
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, route)
        assert_refusal(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"


def test_unexpected_failure_is_a_bare_500(client, digit, monkeypatch):
    def broken(images):
        raise RuntimeError("/secret/path exploded")

    instance = bentoml.get_current_service()
    monkeypatch.setattr(instance.batcher, "_infer", broken)
    response = predict(client, digit[0])
    assert_refusal(response, 500, "internal_error")
    assert "secret" not in response.text
    monkeypatch.undo()
    assert predict(client, digit[0]).status_code == 200  # the service keeps serving


# ---- Refusing a body that is still arriving ---------------------------------------------------
# The HTTP server closes the connection when such an answer ends; closing it with unread data
# resets it, and a client that sends its whole body before reading (urllib) loses the answer.
# So the guard reads the rest first, within bounds. Here with a scripted client, in-process;
# tests/test_service_e2e.py has the real server and urllib.

CHUNK = 100  # bytes per body message of the scripted client
GUARD_LIMITS = {"max_body_bytes": 1_000, "max_drain_bytes": 10_000, "max_drain_seconds": 0.2}


async def page_not_found(scope, receive, send) -> None:
    """An app that answers without reading the body, as the page's 404 does."""
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"Not Found"})


def guarded(
    chunks: int | None,
    headers: dict[str, str],
    path: str = "/predict",
    ends: bool = True,
) -> tuple[list[dict], int]:
    """Send a POST through RequestGuard: `chunks` body messages (None: without end), the last
    ending the body unless `ends` is False (the client then stalls). Returns the messages sent
    back and the number of body messages read."""
    read = 0

    async def receive() -> dict:
        nonlocal read
        if chunks is not None and read >= chunks:
            await asyncio.sleep(3600)  # a client that stopped sending
        read += 1
        last = ends and read == chunks
        return {"type": "http.request", "body": b"A" * CHUNK, "more_body": not last}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guard = RequestGuard(page_not_found, {"/predict": PredictRequest}, **GUARD_LIMITS)
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
    }
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), timeout=5))
    return sent, read


def assert_answered_then_drained(sent: list[dict], status: int, reason: str) -> None:
    """The answer (JSON, `Connection: close`) went out first, and ended after the drain."""
    start, answer, end = sent
    assert start["status"] == status
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(answer["body"])["reason"] == reason
    assert answer["more_body"] is True
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}


CHUNKED = {"content-type": "application/json", "transfer-encoding": "chunked"}


def test_oversized_streamed_body_is_drained_after_the_413():
    sent, read = guarded(50, CHUNKED)  # 5 kB, over the 1 kB limit, within the 10 kB drain
    assert_answered_then_drained(sent, 413, "body_too_large")
    assert read == 50  # all of it


def test_oversized_declared_body_is_drained_after_the_413():
    sent, read = guarded(50, {"content-type": "application/json", "content-length": "5000"})
    assert_answered_then_drained(sent, 413, "body_too_large")
    assert read == 50


def test_body_never_read_by_the_app_is_drained_after_its_json_404():
    sent, read = guarded(5, {"content-type": "text/plain", "content-length": "500"}, "/nope")
    assert_answered_then_drained(sent, 404, "not_found")
    assert read == 5


def test_endless_body_is_read_only_up_to_the_drain_bound():
    sent, read = guarded(None, CHUNKED)
    assert_answered_then_drained(sent, 413, "body_too_large")
    assert read * CHUNK <= GUARD_LIMITS["max_drain_bytes"] + CHUNK


def test_stalled_body_is_drained_only_for_the_drain_time():
    began = time.perf_counter()
    sent, read = guarded(20, CHUNKED, ends=False)
    assert_answered_then_drained(sent, 413, "body_too_large")
    assert read == 20
    assert time.perf_counter() - began < 2.0


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json", "content-length": "1000000"},  # beyond the bound
        {"content-type": "application/json", "content-length": "5000", "expect": "100-continue"},
    ],
    ids=["declared-beyond-the-drain-bound", "waiting-for-100-continue"],
)
def test_body_that_will_not_be_drained_is_not_read(headers):
    sent, read = guarded(50, headers)
    assert_answered_then_drained(sent, 413, "body_too_large")
    assert read == 0


def test_answer_after_the_whole_body_keeps_the_connection():
    sent, read = guarded(1, {"content-type": "application/json", "content-length": "100"})
    start, answer = sent
    assert start["status"] == 400
    assert all(name != b"connection" for name, _ in start["headers"])
    assert not answer.get("more_body", False)
    assert read == 1


# ---- The page --------------------------------------------------------------------------------


def test_page_is_served_at_the_root(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == (REPO_ROOT / "web" / "index.html").read_text()
    for name in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/{name}").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/%2E%2E/%2E%2E/etc/passwd",
        "/%252e%252e/pyproject.toml",
        "/..%2fpyproject.toml",
        "/..%5cpyproject.toml",
        "/web/../pyproject.toml",
        "/service/service.py",
        "/missing.html",
    ],
)
def test_only_files_inside_web_are_served(client, path):
    response = client.get(path)
    assert_refusal(response, 404, "not_found")
    assert "[project]" not in response.text
    assert "root:" not in response.text


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/nope", "/nope/", "/predict/more", "/info/x", "/app.js/x"])
def test_unknown_routes_are_json_404s_whatever_the_method(client, method, path):
    response = client.request(method, path, content=b'{"image": "AAAA"}', headers=JSON)
    if method == "HEAD":
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
    else:
        assert_refusal(response, 404, "not_found")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest.mark.parametrize(
    "path", ["/", "/index.html", "/app.js", "/style.css", "/favicon.svg", "/info", "/livez"]
)
def test_known_routes_refuse_other_methods_with_json_405s(client, method, path):
    response = client.request(method, path)
    assert_refusal(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


def test_bentoml_routes_still_answer(client):
    for route in ("/livez", "/readyz", "/metrics"):
        assert client.get(route).status_code == 200, route
    assert client.get("/schema.json").json()["name"] == "Digits"


# ---- Metrics ---------------------------------------------------------------------------------


def test_metrics_count_predictions_confidence_and_refusals(client, digit):
    predict(client, digit[0])
    predict(client, "!!!")
    text = client.get("/metrics").text
    assert f'digits_predictions_total{{digit="{digit[1]}"}}' in text
    assert "digits_prediction_confidence_bucket" in text
    assert 'digits_rejected_inputs_total{reason="invalid_base64"}' in text
    assert "digits_model_batch_size_bucket" in text


def counts_by_label(client: TestClient, counter: str, label: str) -> dict[str, float]:
    """A counter of one label, by that label's value, as /metrics reports it."""
    prefix = f'{counter}{{{label}="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    }


def refusals(client: TestClient) -> dict[str, float]:
    """digits_rejected_inputs_total by reason."""
    return counts_by_label(client, "digits_rejected_inputs_total", "reason")


def test_metrics_count_drawings_refused_by_reason(client, number_png):
    before = refusals(client)
    for reason in ("no_digit", "not_a_digit", "several_digits"):
        assert reason in before  # listed from the start, so that dashboards find them
    several = data_url(number_png("47", size=(560, 280)))
    predict(client, several)
    client.post("/predict_batch", json={"images": [several, data_url(png(scribble(3)))]})
    read(client, data_url(png(scribble(4))))
    after = refusals(client)
    assert after["several_digits"] == before["several_digits"] + 2
    assert after["not_a_digit"] == before["not_a_digit"] + 2


# ---- Start-up --------------------------------------------------------------------------------


def test_service_refuses_a_model_from_other_preprocessing(bentoml_home, monkeypatch):
    current = bentoml.models.get("digits-cnn:latest")
    metadata = {**current.info.metadata, "preprocessing_version": "an-older-version"}
    with bentoml.models.create(name="digits-cnn-stale", metadata=metadata) as ref:
        for name in ("model.keras", "model.tflite"):
            shutil.copy(current.path_of(name), ref.path_of(name))
    monkeypatch.setattr(Digits.inner, "model_ref", bentoml.models.BentoModel(ref.tag))
    with pytest.raises(RuntimeError, match="an-older-version"):
        Digits.inner()


def test_service_refuses_a_model_without_the_not_a_digit_class(bentoml_home, monkeypatch):
    """A ten-class model from before the not-a-digit class would read every scribble as a
    digit: the service will not start with it."""
    import keras

    from pipelines.model import build_model
    from pipelines.package import export_for_serving

    current = bentoml.models.get("digits-cnn:latest")
    with bentoml.models.create(name="digits-cnn-ten", metadata=current.info.metadata) as ref:
        build_model((4, 4, 4), 0.0, classes=10).save(ref.path_of("model.keras"))
        keras.backend.clear_session()
        probe = np.zeros((2, 28, 28), np.float32)
        export_for_serving(
            Path(ref.path_of("model.keras")), Path(ref.path_of("model.tflite")), probe
        )
    monkeypatch.setattr(Digits.inner, "model_ref", bentoml.models.BentoModel(ref.tag))
    with pytest.raises(RuntimeError, match="answers 10 classes"):
        Digits.inner()


def test_service_refuses_a_model_without_a_line_reader(bentoml_home, monkeypatch):
    """A model packaged before /read had a line reader could not read touching digits."""
    current = bentoml.models.get("digits-cnn:latest")
    with bentoml.models.create(name="digits-cnn-old", metadata=current.info.metadata) as ref:
        shutil.copyfile(current.path_of("model.tflite"), ref.path_of("model.tflite"))
    monkeypatch.setattr(Digits.inner, "model_ref", bentoml.models.BentoModel(ref.tag))
    with pytest.raises(RuntimeError, match="has no line reader"):
        Digits.inner()


def test_the_server_starts_without_tensorflow(bentoml_home):
    """TensorFlow's import alone takes seconds and hundreds of MB; the service never needs it."""
    script = (
        "import sys; from service.service import Digits; Digits.inner(); "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_service_says_which_model_is_missing(bentoml_home, monkeypatch):
    missing = bentoml.models.BentoModel("digits-cnn-missing:latest")
    monkeypatch.setattr(Digits.inner, "model_ref", missing)
    with pytest.raises(RuntimeError, match="digits-cnn-missing:latest"):
        Digits.inner()


def test_settings_come_from_the_environment():
    settings = Settings.from_env({"DIGITS_MAX_BODY_BYTES": "1000", "DIGITS_BATCH_WAIT_MS": "1.5"})
    assert settings.max_body_bytes == 1000
    assert settings.batch_wait_ms == 1.5
    assert Settings.from_env({"DIGITS_WARMUP_BATCH_SIZES": "1,8"}).warmup_batch_sizes == (1, 8)
    with pytest.raises(ValueError, match="DIGITS_MAX_BODY_BYTES"):
        Settings.from_env({"DIGITS_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ValueError):
        Settings.from_env({"DIGITS_MAX_CONCURRENCY": "0"})
    with pytest.raises(ValueError):
        Settings.from_env({"DIGITS_WORKERS": "0"})


# ---- The micro-batcher -----------------------------------------------------------------------


def test_batcher_groups_requests_that_arrive_while_the_model_is_busy():
    calls: list[int] = []

    def infer(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            time.sleep(0.05)  # the first call is slow; the others queue up behind it
        return np.repeat(images.reshape(len(images), -1)[:, :1], 10, axis=1)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(infer, max_batch=8)
        first = asyncio.create_task(batcher.predict(np.full((1, 28, 28), 0.0, np.float32)))
        await asyncio.sleep(0.01)
        rest = [batcher.predict(np.full((1, 28, 28), value, np.float32)) for value in range(1, 11)]
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [float(result[0, 0]) for result in results] == list(range(11))
    assert calls == [1, 8, 2]  # the ten waiting requests went in two calls of at most 8


def test_batcher_fails_only_the_requests_of_a_failed_call():
    def infer(images: np.ndarray) -> np.ndarray:
        if images[0, 0, 0] < 0:
            raise ValueError("bad batch")
        return np.zeros((len(images), 10), np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(infer)
        with pytest.raises(ValueError):
            await batcher.predict(np.full((1, 28, 28), -1.0, np.float32))
        assert (await batcher.predict(np.zeros((2, 28, 28), np.float32))).shape == (2, 10)
        await batcher.close()

    asyncio.run(scenario())
