"""End-to-end tests against a real `bentoml serve` of the service (the `live_service` fixture).

    .venv/bin/python -m pytest -m slow tests/test_service_e2e.py -q

Raw sockets and http.client send exactly the bytes under test (no client-side URL clean-up,
chunked bodies, bodies that stop half-way); urllib is the client that sends its whole body
before it reads the answer.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import itertools
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from PIL import Image

from pipelines.corrections import CorrectionStore, validate_label
from service.settings import Settings
from tests.conftest import (
    NUMBER_CANVAS,
    OVERLOAD_LIMIT,
    copied_bentoml_home,
    kill_tree,
    remount,
    render_canvas,
    scribble,
    serve,
    serving,
    small_disk,
)
from tests.helpers import REPO as REPO_ROOT

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_DRAIN_BYTES = Settings().max_drain_bytes  # the live server runs with the defaults


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def canvas(mnist_test, canvas_png) -> tuple[str, int]:
    images, labels = mnist_test
    return data_url(canvas_png(images[0])), int(labels[0])


def address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname, parts.port


def raw_request(base_url: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are; return the status and body of the answer."""
    with socket.create_connection(address(base_url), timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_predict_over_http(live_service, canvas):
    image, label = canvas
    response = httpx.post(f"{live_service}/predict", json={"image": image}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["digit"] == label
    assert len(body["probabilities"]) == 10
    assert body["model_version"].startswith("digits-cnn:")


def post(base_url: str, route: str, image: str) -> httpx.Response:
    return httpx.post(f"{base_url}{route}", json={"image": image}, timeout=10)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("text", ["47", "2026"])
def test_read_over_http_reads_a_number_left_to_right(live_service, number_png, text):
    response = post(live_service, "/read", data_url(number_png(text)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == text
    width, height = NUMBER_CANVAS
    boxes = [entry["box"] for entry in body["digits"]]
    for box in boxes:
        assert 0 <= box["x"] < box["x"] + box["width"] <= width
        assert 0 <= box["y"] < box["y"] + box["height"] <= height
    for left, right in zip(boxes, boxes[1:], strict=False):
        assert left["x"] + left["width"] <= right["x"]
    assert all(entry["input"].startswith("data:image/png;base64,") for entry in body["digits"])


def test_read_of_one_digit_answers_as_predict(live_service, mnist_test, canvas_png):
    images, _ = mnist_test
    for index in range(5):
        image = data_url(canvas_png(images[index]))
        single = post(live_service, "/predict", image).json()
        number = post(live_service, "/read", image).json()
        assert number["text"] == str(single["digit"]), index
        assert number["digits"][0]["probabilities"] == single["probabilities"], index


def test_predict_refuses_several_digits(live_service, number_png):
    response = post(live_service, "/predict", data_url(number_png("47", size=(560, 280))))
    assert response.status_code == 422
    assert response.json()["reason"] == "several_digits"


def test_a_scribble_is_not_a_digit(live_service):
    image = data_url(png(scribble(0)))
    single = post(live_service, "/predict", image)
    assert single.status_code == 422
    assert single.json() == {"error": "the drawing is not a digit", "reason": "not_a_digit"}
    number = post(live_service, "/read", image)
    assert number.status_code == 422
    assert number.json()["reason"] == "not_a_digit"
    assert [mark["is_digit"] for mark in number.json()["marks"]] == [False]


def test_health_routes(live_service):
    for route in ("/livez", "/readyz"):
        assert httpx.get(f"{live_service}{route}", timeout=5).status_code == 200
    info = httpx.get(f"{live_service}/info", timeout=5).json()
    assert info["model_tag"].startswith("digits-cnn:")
    assert httpx.get(f"{live_service}/", timeout=5).headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "reason"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b'{"image": "AAAA"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"image": "!!"}', "application/json", 400, "invalid_base64"),
        (b'{"image": "AAAA", "more": 1}', "application/json", 400, "unexpected_field"),
        (b'{"image": "aGVsbG8="}', "application/json", 422, "not_an_image"),
    ],
)
def test_bad_requests_get_json_refusals(live_service, content, content_type, status, reason):
    response = httpx.post(
        f"{live_service}/predict",
        content=content,
        headers={"content-type": content_type},
        timeout=10,
    )
    assert response.status_code == status
    assert response.json() == {"error": response.json()["error"], "reason": reason}


def test_blank_canvas_is_no_digit(live_service):
    buffer = io.BytesIO()
    Image.new("RGBA", (280, 280), (0, 0, 0, 0)).save(buffer, "PNG")  # an untouched canvas
    response = httpx.post(
        f"{live_service}/predict", json={"image": data_url(buffer.getvalue())}, timeout=10
    )
    assert response.status_code == 422
    assert response.json() == {"error": "no digit found in the image", "reason": "no_digit"}


def test_declared_oversized_body_is_refused_unread(live_service):
    head = (
        "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES * 50}\r\n\r\n"
    ).encode()
    status, body = raw_request(live_service, head + b'{"image": "')  # the rest never comes
    assert status == 413
    assert json.loads(body)["reason"] == "body_too_large"


def test_streamed_oversized_body_is_refused(live_service):
    chunk = b"A" * 65536
    with socket.create_connection(address(live_service), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the server may answer and close mid-upload
            for _ in range(MAX_BODY_BYTES // len(chunk) + 4):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        assert json.loads(response.read())["reason"] == "body_too_large"


def urllib_answer(url: str, data: bytes | Iterator[bytes] | None = None) -> tuple[int, dict]:
    """Ask as urllib does: `Connection: close`, and the whole body (chunked if `data` is an
    iterator) written before the answer is read. Returns the status and the JSON body."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refusal:
        return refusal.code, json.loads(refusal.read())


@pytest.mark.parametrize("size", [7_000_000, 20_000_000])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_client_sending_its_whole_body_first_gets_the_413(live_service, size, declared):
    """Until the server drained such a body, urllib got a connection reset, not the 413."""
    body = b'{"image": "' + b"A" * size + b'"}'
    data = body if declared else (body[i : i + 65536] for i in range(0, len(body), 65536))
    status, answer = urllib_answer(f"{live_service}/predict", data)
    assert status == 413
    assert answer == {"error": answer["error"], "reason": "body_too_large"}


def test_endless_body_is_cut_off_after_the_drain_bound(live_service):
    chunk = b"A" * 65536
    sent = 0
    with socket.create_connection(address(live_service), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while sent < 2**30:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
    assert sent < MAX_DRAIN_BYTES + 16 * 2**20  # the bound, plus what the socket buffers hold


@pytest.mark.parametrize(
    ("path", "data", "status", "reason"),
    [
        ("/nope", None, 404, "not_found"),
        ("/nope", b'{"image": "' + b"A" * 1_000_000 + b'"}', 404, "not_found"),
        ("/index.html", b"{}", 405, "method_not_allowed"),
    ],
    ids=["get-unknown", "post-unknown", "post-page-file"],
)
def test_unknown_route_and_wrong_method_get_json_refusals(live_service, path, data, status, reason):
    answer_status, answer = urllib_answer(f"{live_service}{path}", data)
    assert answer_status == status
    assert answer == {"error": answer["error"], "reason": reason}


@pytest.mark.parametrize(
    "path",
    ["/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fpyproject.toml", "/%252e%252e/x"],
)
def test_path_traversal_finds_nothing(live_service, path):
    status, body = raw_request(live_service, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert status == 404
    assert b"[project]" not in body


def test_concurrent_requests_share_model_calls(live_service, canvas):
    image, label = canvas
    with httpx.Client(timeout=30) as client:

        def predict(_: int) -> int:
            response = client.post(f"{live_service}/predict", json={"image": image})
            return response.json()["digit"] if response.status_code == 200 else -1

        with ThreadPoolExecutor(16) as pool:
            digits = list(pool.map(predict, range(96)))
    assert digits == [label] * 96
    metrics = httpx.get(f"{live_service}/metrics", timeout=5).text
    samples = dict(
        line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("digits_model")
    )
    single_calls = float(samples['digits_model_batch_size_bucket{le="1.0"}'])
    assert single_calls < float(samples["digits_model_batch_size_count"])  # some calls batched


def test_excess_requests_get_429_at_once(limited_service, canvas):
    """Requests that keep their body coming hold a slot each; one more is refused at once."""
    held = []
    try:
        for _ in range(OVERLOAD_LIMIT):
            sock = socket.create_connection(address(limited_service), timeout=10)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            held.append(sock)
        time.sleep(0.5)
        started = time.perf_counter()
        response = httpx.post(f"{limited_service}/predict", json={"image": canvas[0]}, timeout=10)
        assert response.status_code == 429
        assert "error" in response.json()
        assert time.perf_counter() - started < 1.0
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert httpx.post(f"{limited_service}/predict", json={"image": canvas[0]}).status_code == 200


def test_metrics_expose_the_service_counters(live_service, canvas):
    httpx.post(f"{live_service}/predict", json={"image": canvas[0]}, timeout=10)
    httpx.post(f"{live_service}/predict", json={"image": "!!"}, timeout=10)
    metrics = httpx.get(f"{live_service}/metrics", timeout=5).text
    assert f'digits_predictions_total{{digit="{canvas[1]}"}}' in metrics
    assert "digits_prediction_confidence_bucket" in metrics
    assert 'digits_rejected_inputs_total{reason="invalid_base64"}' in metrics
    for reason in ("no_digit", "not_a_digit", "several_digits"):
        assert f'digits_rejected_inputs_total{{reason="{reason}"}}' in metrics
    assert "bentoml_service_request_total" in metrics  # BentoML's own metrics still there


def test_server_stays_healthy_after_abuse(live_service, canvas):
    for garbage in (b"\x00" * 100, b"GET / HTTP/9.9\r\n\r\n", b"POST /predict HTTP/1.1\r\n\r\n"):
        with socket.create_connection(address(live_service), timeout=5) as sock:
            sock.sendall(garbage)
            sock.settimeout(2)
            with contextlib.suppress(OSError):
                sock.recv(1000)
    assert httpx.get(f"{live_service}/livez", timeout=5).status_code == 200
    response = httpx.post(f"{live_service}/predict", json={"image": canvas[0]}, timeout=10)
    assert response.json()["digit"] == canvas[1]


# ---- Corrections (POST /feedback) ------------------------------------------------------------


def feedback(base_url: str, image: str, label: str) -> httpx.Response:
    """One correction on a connection of its own (so that the workers share them out)."""
    return httpx.post(f"{base_url}/feedback", json={"image": image, "label": label}, timeout=30)


def opened_store(folder: Path) -> CorrectionStore:
    return CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(folder)})


def test_the_per_client_limit_holds_across_workers(bentoml_home, tmp_path, canvas):
    """Two workers, five corrections an hour per client: the sixth is refused whichever worker
    takes it, because the count is the database's."""
    image, label = canvas
    with serve(
        copied_bentoml_home(bentoml_home, tmp_path),
        tmp_path,
        DIGITS_WORKERS="2",
        DIGITS_FEEDBACK_PER_CLIENT_PER_HOUR="5",
    ) as base_url:
        answers = [feedback(base_url, image, str(label)) for _ in range(8)]
        info = httpx.get(f"{base_url}/info", timeout=10).json()
    assert [answer.status_code for answer in answers] == [201] * 5 + [429] * 3
    assert {answer.json()["reason"] for answer in answers[5:]} == {"too_many_corrections"}
    store = opened_store(tmp_path / "feedback")
    corrections = store.list()
    store.close()
    assert [c.id for c in corrections] == [answer.json()["id"] for answer in answers[:5]]
    for correction in corrections:
        assert correction.model_answer == str(label)
        assert correction.model_version == info["model_tag"]
        assert correction.label_probability > 0.5
        assert correction.client_hash != "127.0.0.1"  # salted, never the address


def test_a_read_only_disk_refuses_corrections_and_predicting_goes_on(
    bentoml_home, tmp_path, canvas
):
    image, label = canvas
    with (
        small_disk(tmp_path / "disk", read_only=True) as disk,
        serve(
            copied_bentoml_home(bentoml_home, tmp_path),
            tmp_path,
            DIGITS_FEEDBACK_DIR=str(disk / "feedback"),
        ) as base_url,
    ):
        refused = feedback(base_url, image, str(label))
        predicted = httpx.post(f"{base_url}/predict", json={"image": image}, timeout=10)
        remount(disk, read_only=False)  # the disk is fixed: no restart needed
        accepted = feedback(base_url, image, str(label))
    assert refused.status_code == 503, refused.text
    assert refused.json()["reason"] == "storage_unavailable"
    assert predicted.status_code == 200 and predicted.json()["digit"] == label
    assert accepted.status_code == 201, accepted.text
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert "a correction was not stored" in server_log  # the operator is told why


KILL_AFTER = 60  # corrections answered 201 before the server is killed
SENDERS = 8  # clients sending corrections at once
SEND_DEADLINE = 300.0  # seconds; a sender stops then whatever happens


def test_kill_9_mid_stream_loses_no_answered_correction(bentoml_home, tmp_path, mnist_test):
    """Two workers take corrections from eight clients at once; the server and its workers are
    killed with SIGKILL in the middle. Every correction answered 201 is in the store afterwards,
    and every stored row is whole: a PNG that decodes, a valid label, the model's reading."""
    images, labels = mnist_test
    drawings = [(data_url(render_canvas(images[i])), str(labels[i])) for i in range(20)]
    answered: list[str] = []
    statuses: list[int] = []
    killed = threading.Event()
    enough = threading.Event()

    def send(base_url: str, sender: int) -> None:
        deadline = time.monotonic() + SEND_DEADLINE
        with httpx.Client(timeout=30) as client:
            for attempt in itertools.count():
                if time.monotonic() > deadline:
                    return
                image, label = drawings[(sender + attempt) % len(drawings)]
                try:
                    response = client.post(
                        f"{base_url}/feedback", json={"image": image, "label": label}
                    )
                except httpx.TransportError:
                    if killed.is_set():
                        return
                    raise
                statuses.append(response.status_code)
                if response.status_code != 201:
                    return
                answered.append(response.json()["id"])
                if len(answered) >= KILL_AFTER:
                    enough.set()

    with (
        serving(
            copied_bentoml_home(bentoml_home, tmp_path),
            tmp_path,
            DIGITS_WORKERS="2",
            DIGITS_FEEDBACK_PER_CLIENT_PER_HOUR="100000",
        ) as (base_url, process),
        ThreadPoolExecutor(SENDERS) as pool,
    ):
        senders = [pool.submit(send, base_url, sender) for sender in range(SENDERS)]
        assert enough.wait(timeout=SEND_DEADLINE), f"only {len(answered)} corrections stored"
        killed.set()
        kill_tree(process)  # mid-write: eight requests are in flight
        for sender in senders:
            sender.result(timeout=60)
    assert set(statuses) == {201}  # two workers writing at once: no write ever failed
    store = opened_store(tmp_path / "feedback")
    corrections = store.list()
    with store.engine.connect() as connection:
        integrity = connection.exec_driver_sql("PRAGMA integrity_check").scalar()
    store.close()
    assert integrity == "ok"
    stored_ids = {correction.id for correction in corrections}
    assert set(answered) <= stored_ids  # a 201 is a promise
    assert len(stored_ids) <= len(answered) + SENDERS  # at most the requests in flight more
    sent = dict(drawings)
    for correction in corrections:
        png = Image.open(io.BytesIO(correction.image_png))
        png.load()
        assert png.format == "PNG"
        assert correction.label == sent[data_url(correction.image_png)]
        assert validate_label(correction.model_answer)
        assert correction.model_version and correction.status == "pending"


def test_bento_builds_with_code_page_model_pinned_packages_and_a_dockerfile(bentoml_home):
    """`bentoml build` packs what `bentoml containerize` and `docker run` need, pinned as locked."""
    built = subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "bentoml"), "build", "-o", "tag"],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = bentoml_home / "bentos" / name / version
    for packed in (
        "env/docker/Dockerfile",
        "src/service/service.py",
        "src/service/answers.py",
        "src/service/runtime.py",
        "src/pipelines/preprocessing.py",
        "src/pipelines/segmentation.py",
        "src/pipelines/corrections.py",
        "src/service/feedback.py",
        "src/web/index.html",
        "src/web/app.js",
    ):
        assert (bento / packed).is_file(), packed
    # BentoML 1.4 records the model by tag and adds it from the store when containerizing.
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    models = [model["tag"] for service in manifest["services"] for model in service["models"]]
    assert [tag.split(":")[0] for tag in models] == ["digits-cnn"]
    locked = dict(
        line.split("==")
        for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    for pin in bentofile["python"]["packages"]:
        package, pinned = pin.split("==")
        assert locked[package] == pinned, f"{package}: bentofile {pinned}, lock {locked[package]}"
