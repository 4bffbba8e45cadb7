"""Hostile input against a real `bentoml serve` (the `live_service` fixture): does it hold?

    .venv/bin/python -m pytest -m slow tests/test_hostile_input.py -q

One table of crafted requests (broken JSON, wrong types, broken and exotic images, bombs, an
oversized body, unknown paths, real drawings) with the status each must get, sent to /predict
and again to /read (which takes the same body and must refuse alike): never a 5xx, and every
refusal a JSON `{"error": ...}` without a stack trace or a path. Then the static route's
defences (path traversal, no listings, no CORS), and overload: far more clients than the
concurrency limit are refused at once with 429/503 instead of queueing into timeouts, and the
service recovers by itself. `tests/test_service.py` holds the same contract in-process, reason
code by reason code; this file checks it over real sockets, as a client sends the bytes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import io
import json
import math
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.conftest import OVERLOAD_LIMIT, data_url
from tests.helpers import REPO as REPO_ROOT

pytestmark = pytest.mark.slow

JSON = "application/json"
LIMITS = Settings()  # the defaults, which the live server runs with
WEB_DIR = REPO_ROOT / "web"
# Nothing of the server's insides may show in an answer: no traceback, no source file, no path.
LEAKS = ("Traceback", 'File "', ".py", "site-packages", f"{REPO_ROOT.parent}/")


# ---- Talking to the server -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body)


def send(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request on a fresh connection with exactly these bytes (no client-side clean-up of
    the path). A server may answer and close before reading a whole body (413): the upload
    then fails half-way, and the answer is read all the same."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if body:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.send(body)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def assert_clean_refusal(answer: Answer) -> None:
    """A 4xx whose body is JSON with a non-empty `error` and nothing from the server's insides."""
    assert 400 <= answer.status < 500, answer.text[:300]
    assert answer.headers.get("content-type", "").startswith(JSON), answer.headers
    body = answer.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert_no_leak(answer)


def assert_no_leak(answer: Answer) -> None:
    for leak in LEAKS:
        assert leak not in answer.text, f"{leak!r} in {answer.text[:300]!r}"


# ---- Images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawings:
    """MNIST test digits, and the ways a client might send them."""

    images: np.ndarray  # (n, 28, 28) uint8, light ink on black
    labels: np.ndarray
    canvas_png: Callable[..., bytes]

    def ink(self, index: int, side: int = 280) -> Image.Image:
        """Light strokes on black, `side` pixels square, mode L."""
        digit = Image.fromarray(self.images[index], mode="L")
        return digit.resize((side, side), Image.Resampling.BILINEAR)

    def on_white(self, index: int, side: int = 280) -> Image.Image:
        """Dark strokes on white, mode L."""
        return self.ink(index, side).point(lambda value: 255 - value)


def encode(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return len(payload).to_bytes(4, "big") + kind + payload + crc.to_bytes(4, "big")


def png_bomb(side: int = 20_000) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels: 400 megapixels in ~50 kB.

    Written row by row, so making it costs no memory; decoding it would cost 400 MB."""
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 1-bit grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then 8 pixels per byte
    compressor = zlib.compressobj(9)
    rows_per_call = 200
    pixels = b"".join(
        compressor.compress(row * min(rows_per_call, side - start))
        for start in range(0, side, rows_per_call)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels + compressor.flush())
        + png_chunk(b"IEND", b"")
    )


def png_text_bomb(drawings: Drawings) -> bytes:
    """A canvas PNG carrying a zTXt comment that inflates from ~100 kB to 100 MB."""
    canvas = drawings.canvas_png(drawings.images[0])
    comment = b"Comment\x00\x00" + zlib.compress(b"\x00" * 100_000_000, 9)
    return canvas[:33] + png_chunk(b"zTXt", comment) + canvas[33:]  # after the 33-byte header


def sixteen_bit_png(drawings: Drawings, index: int, side: int = 280) -> bytes:
    pixels = np.asarray(drawings.on_white(index, side), dtype=np.uint16) * 257
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    return encode(image)


def palette_png_with_transparency(drawings: Drawings, index: int) -> bytes:
    """Palette entry 0 is the (transparent) background; the ink uses dark entries 1-255."""
    ink = np.asarray(drawings.ink(index))
    indices = np.where(ink > 40, ink, 0).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([channel for value in range(256) for channel in (255 - value,) * 3])
    return encode(image, transparency=0)


def animated_gif(drawings: Drawings, first: int, second: int) -> bytes:
    frames = [drawings.on_white(index, side=140) for index in (first, second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


PIXEL_LIMIT_SIDE = math.isqrt(LIMITS.max_image_pixels) + 1  # 2049: a square just over the limit


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="280" height="280"><text>7</text></svg>'


# ---- The table -------------------------------------------------------------------------------

Body = bytes | Callable[[Drawings], bytes]


@dataclass(frozen=True)
class Hostile:
    name: str
    body: Body | None  # raw bytes, or built from the drawings; None sends no body
    status: int
    digit_of: int | None = None  # 200 only: the MNIST test index whose label must be read
    content_type: str | None = JSON
    method: str = "POST"
    path: str = "/predict"

    def bytes(self, drawings: Drawings) -> bytes | None:
        return self.body(drawings) if callable(self.body) else self.body


def image_field(make: Callable[[Drawings], str]) -> Callable[[Drawings], bytes]:
    """A /predict body `{"image": make(drawings)}`."""
    return lambda drawings: json.dumps({"image": make(drawings)}).encode()


def image(make: Callable[[Drawings], bytes], mime: str = "image/png") -> Callable:
    """A /predict body holding the bytes `make` builds as a data URL of `mime`."""
    return image_field(lambda drawings: data_url(make(drawings), mime))


def canvas(index: int) -> Callable[[Drawings], bytes]:
    return lambda drawings: drawings.canvas_png(drawings.images[index])


def blank(mode: str, colour) -> Callable[[Drawings], bytes]:
    return lambda drawings: encode(Image.new(mode, (280, 280), colour))


CASES = [
    # The request around the image.
    Hostile("malformed-json", b'{"image": "AAAA"', 400),
    Hostile("invalid-utf8-json", b'{"image": "\xff\xfe"}', 400),
    Hostile("deeply-nested-json", b'{"image": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
    Hostile("json-array", b'["AAAA"]', 400),
    Hostile("json-string", b'"AAAA"', 400),
    Hostile("empty-body", b"", 400),
    Hostile("missing-field", b"{}", 400),
    Hostile("misnamed-field", b'{"img": "AAAA"}', 400),
    Hostile("extra-field", b'{"image": "AAAA", "label": 7}', 400),
    Hostile("number-field", b'{"image": 7}', 400),
    Hostile("huge-number-field", b'{"image": 1e999999}', 400),
    Hostile("null-field", b'{"image": null}', 400),
    Hostile("object-field", b'{"image": {"data": "AAAA"}}', 400),
    Hostile("text-plain", b'{"image": "AAAA"}', 415, content_type="text/plain"),
    Hostile("no-content-type", b'{"image": "AAAA"}', 415, content_type=None),
    Hostile(
        "multipart-upload",
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="7.png"\r\n\r\n'
        b"\x89PNG\r\n--b--\r\n",
        415,
        content_type="multipart/form-data; boundary=b",
    ),
    Hostile("get-predict", None, 405, method="GET", content_type=None),
    Hostile("put-predict", b'{"image": "AAAA"}', 405, method="PUT"),
    Hostile("body-over-limit", json.dumps({"image": "A" * LIMITS.max_body_bytes}).encode(), 413),
    Hostile("get-unknown-path", None, 404, method="GET", content_type=None, path="/nope"),
    Hostile("post-unknown-path", b'{"image": "AAAA"}', 404, path="/nope"),
    Hostile("post-to-a-page-file", b'{"image": "AAAA"}', 405, path="/index.html"),
    # The image string.
    Hostile("empty-string", b'{"image": ""}', 400),
    Hostile("nul-character", b'{"image": "\\u0000"}', 400),
    Hostile("lone-surrogate", b'{"image": "\\ud800"}', 400),
    Hostile("invalid-base64", b'{"image": "!!not base64??"}', 400),
    Hostile("bad-base64-padding", b'{"image": "data:image/png;base64,AAA"}', 400),
    Hostile("data-url-without-comma", b'{"image": "data:image/png;base64"}', 400),
    Hostile("data-url-not-base64", b'{"image": "data:image/png,%89PNG"}', 400),
    Hostile("data-url-text-mime", image(canvas(0), "text/plain"), 415),
    Hostile("data-url-no-mime", image(canvas(0), ""), 415),
    Hostile("data-url-html-mime", image(lambda d: b"<script>alert(1)</script>", "text/html"), 415),
    # Bytes that are not a usable image.
    Hostile("base64-of-text", image_field(lambda d: b64(b"hello, I am a seven")), 422),
    Hostile("random-bytes-1.4MB", image(lambda d: np.random.default_rng(0).bytes(1_400_000)), 422),
    Hostile("svg", image(lambda d: SVG, "image/svg+xml"), 422),
    Hostile("tiff", image(lambda d: encode(d.on_white(0), "TIFF"), "image/tiff"), 422),
    Hostile("truncated-png", image(lambda d: truncated(canvas(0)(d))), 422),
    Hostile(
        "truncated-jpeg",
        image(lambda d: truncated(encode(d.on_white(0), "JPEG")), "image/jpeg"),
        422,
    ),
    Hostile("png-header-only", image(lambda d: canvas(0)(d)[:33]), 422),
    Hostile("1x1-png", image(lambda d: encode(Image.new("L", (1, 1), 0))), 422),
    Hostile("blank-white", image(blank("RGB", "white")), 422),
    Hostile("blank-black", image(blank("RGB", "black")), 422),
    Hostile("untouched-canvas", image(blank("RGBA", (0, 0, 0, 0))), 422),
    # Images too large to decode, whatever their file size.
    Hostile("decompression-bomb-20000x20000", image(lambda d: png_bomb()), 413),
    Hostile("png-text-chunk-bomb", image(png_text_bomb), 422),
    Hostile(
        "over-pixel-limit", image(lambda d: encode(Image.new("1", (PIXEL_LIMIT_SIDE,) * 2))), 413
    ),
    # Unusual but real drawings: read like any other.
    Hostile(
        "animated-gif-first-frame", image(lambda d: animated_gif(d, 10, 11), "image/gif"), 200, 10
    ),
    Hostile("16-bit-png", image(lambda d: sixteen_bit_png(d, 1, side=200)), 200, 1),
    Hostile("16-bit-png-canvas-size", image(lambda d: sixteen_bit_png(d, 1)), 200, 1),
    Hostile(
        "cmyk-jpeg",
        image(lambda d: encode(d.on_white(2).convert("CMYK"), "JPEG"), "image/jpeg"),
        200,
        2,
    ),
    Hostile(
        "palette-png-transparent", image(lambda d: palette_png_with_transparency(d, 0)), 200, 0
    ),
    Hostile("dark-background", image(lambda d: encode(d.ink(9).convert("RGB"))), 200, 9),
    Hostile("webp", image(lambda d: encode(d.on_white(4), "WEBP"), "image/webp"), 200, 4),
    # Ordinary good requests.
    Hostile("canvas-png", image(canvas(0)), 200, 0),
    Hostile("canvas-on-white", image(lambda d: encode(d.on_white(1))), 200, 1),
    Hostile("bare-base64", image_field(lambda d: b64(canvas(2)(d))), 200, 2),
    Hostile("jpeg", image(lambda d: encode(d.on_white(13), "JPEG"), "image/jpeg"), 200, 13),
    Hostile("mismatched-image-mime", image(canvas(4), "image/jpeg"), 200, 4),
    Hostile(
        "uppercase-data-url",
        image_field(lambda d: "DATA:IMAGE/PNG;BASE64," + b64(canvas(11)(d))),
        200,
        11,
    ),
    Hostile(
        "base64-with-line-breaks",
        image_field(lambda d: base64.encodebytes(canvas(0)(d)).decode("ascii")),
        200,
        0,
    ),
    Hostile(
        "json-with-charset",
        image(canvas(1)),
        200,
        1,
        content_type="application/json; charset=utf-8",
    ),
    # The batch route.
    Hostile(
        "batch-over-limit",
        json.dumps({"images": ["AAAA"] * (LIMITS.max_batch_images + 1)}).encode(),
        400,
        path="/predict_batch",
    ),
    Hostile(
        "batch-mixing-good-and-bad",
        lambda d: json.dumps({"images": [data_url(canvas(0)(d)), "!!", data_url(SVG)]}).encode(),
        200,
        0,
        path="/predict_batch",
    ),
]


# /read takes the same body as /predict: every /predict case again, on /read.
CASES += [
    dataclasses.replace(case, name=f"{case.name}-read", path="/read")
    for case in CASES
    if case.path == "/predict"
]


@pytest.fixture(scope="module")
def drawings(mnist_test, canvas_png) -> Drawings:
    images, labels = mnist_test
    return Drawings(images, labels, canvas_png)


# Cases that show a known bug: they fail now, and must start passing when it is fixed.
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request_gets_its_expected_answer(live_service, drawings, case):
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    answer = send(live_service, case.method, case.path, case.bytes(drawings), headers)
    assert answer.status < 500, answer.text[:300]
    assert answer.status == case.status, answer.text[:300]
    if answer.status >= 400:
        assert_clean_refusal(answer)
        return
    body = answer.json()
    if case.path == "/predict_batch":
        body, *refusals = body["predictions"]
        assert [refusal["reason"] for refusal in refusals] == ["invalid_base64", "not_an_image"]
    if case.digit_of is not None:
        expected = int(drawings.labels[case.digit_of])
        read = int(body["text"]) if case.path == "/read" else body["digit"]
        assert read == expected, f"read {read}, drawn {expected}"


def test_server_is_healthy_after_the_table(live_service, drawings):
    assert send(live_service, "GET", "/readyz").status == 200
    body = image(canvas(0))(drawings)
    answer = send(live_service, "POST", "/predict", body, {"Content-Type": JSON})
    assert answer.status == 200
    assert answer.json()["digit"] == drawings.labels[0]


# ---- The static route ------------------------------------------------------------------------

TRAVERSALS = [
    "/../pyproject.toml",
    "/..%2fpyproject.toml",
    "/%2e%2e/pyproject.toml",
    "/%2E%2E%2Fpyproject.toml",
    "/%252e%252e/pyproject.toml",
    "/%252e%252e%252fpyproject.toml",
    "/static/../../etc/passwd",
    "/../../../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "/..\\pyproject.toml",
    "/..%5cpyproject.toml",
    "/..%5c..%5cetc%5cpasswd",
    "/.%2e/pyproject.toml",
    "/web/../pyproject.toml",
    "/service/service.py",
    "/.git/config",
    "/index.html%00.txt",
    "/" + "a" * 5000,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_static_route_serves_nothing_outside_web(live_service, path):
    answer = send(live_service, "GET", path)
    assert answer.status == 404, answer.text[:300]
    for secret in ("[project]", "root:", "[core]", "import "):
        assert secret not in answer.text
    assert_no_leak(answer)


def test_page_is_the_page_not_a_listing(live_service):
    index = (WEB_DIR / "index.html").read_text()
    for path in ("/", "/index.html", "/./"):
        answer = send(live_service, "GET", path)
        assert answer.status == 200, path
        assert answer.headers["content-type"].startswith("text/html")
        assert answer.text == index, path
    # Directories inside web/ (if any) have no listing: 404 unless they hold an index.html.
    for directory in (path for path in WEB_DIR.rglob("*") if path.is_dir()):
        route = "/" + directory.relative_to(WEB_DIR).as_posix() + "/"
        answer = send(live_service, "GET", route)
        if (directory / "index.html").exists():
            assert answer.text == (directory / "index.html").read_text()
        else:
            assert answer.status == 404, route
    for route in ("/nothing-here/", "/web/", "/service/"):
        assert send(live_service, "GET", route).status == 404, route


EVIL = "http://evil.example"


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/predict"), ("POST", "/read"), ("GET", "/"), ("GET", "/info")]
)
def test_cors_is_off(live_service, drawings, method, path):
    body = image(canvas(0))(drawings) if method == "POST" else None
    headers = {"Origin": EVIL, **({"Content-Type": JSON} if body else {})}
    answer = send(live_service, method, path, body, headers)
    assert answer.status == 200
    assert answer.headers.get("access-control-allow-origin") is None
    assert answer.headers.get("access-control-allow-credentials") is None


@pytest.mark.parametrize("path", ["/predict", "/predict_batch", "/read", "/", "/info"])
def test_cors_preflight_is_not_granted(live_service, path):
    headers = {
        "Origin": EVIL,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    answer = send(live_service, "OPTIONS", path, headers=headers)
    assert 400 <= answer.status < 500, answer.status
    assert not any(name.lower().startswith("access-control-allow") for name in answer.headers)
    assert_no_leak(answer)


# ---- Overload --------------------------------------------------------------------------------

BURST_REQUESTS = 200
BURST_CLIENTS = 64  # 16x the limit
CLIENT_TIMEOUT = 10.0  # seconds; a request queued this long counts as a failure
BURST_TIME_LIMIT = 60.0  # seconds for the whole burst; unanswered requests are then missing


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no answer within CLIENT_TIMEOUT, or the connection failed
    seconds: float
    answer: Answer | None


def burst(base_url: str, body: bytes, requests: int, clients: int) -> list[Outcome]:
    """`clients` threads released together send `requests` POST /predict in all, each on a
    fresh connection (as many independent users would)."""
    tickets = iter(range(requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    start_line = threading.Barrier(clients)

    def client() -> None:
        start_line.wait()
        while True:
            with lock:
                if next(tickets, None) is None:
                    return
            began = time.perf_counter()
            try:
                answer = send(
                    base_url, "POST", "/predict", body, {"Content-Type": JSON}, CLIENT_TIMEOUT
                )
                outcome = Outcome(answer.status, time.perf_counter() - began, answer)
            except (OSError, http.client.HTTPException):
                outcome = Outcome(0, time.perf_counter() - began, None)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + BURST_TIME_LIMIT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return outcomes


def test_overload_is_refused_fast_and_recovers(limited_service, drawings):
    body = image(canvas(0))(drawings)
    began = time.perf_counter()
    outcomes = burst(limited_service, body, BURST_REQUESTS, BURST_CLIENTS)
    elapsed = time.perf_counter() - began
    statuses = [outcome.status for outcome in outcomes]
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    assert len(outcomes) == BURST_REQUESTS
    assert set(counts) <= {200, 429, 503}, counts  # no timeouts, no failures, no other 5xx
    assert counts.get(200, 0) > 0, counts
    refusals = [outcome for outcome in outcomes if outcome.status in (429, 503)]
    assert refusals, f"{BURST_CLIENTS} clients never passed a limit of {OVERLOAD_LIMIT}: {counts}"
    refusal_p99 = float(np.percentile([outcome.seconds for outcome in refusals], 99))
    assert refusal_p99 < 1.0, f"refusals took up to {refusal_p99:.2f} s (p99); {counts}"
    for refusal in refusals[:5]:
        assert_clean_refusal(refusal.answer)
    assert elapsed < BURST_TIME_LIMIT, f"the burst took {elapsed:.0f} s"

    # The load is gone: the next requests are served, without a restart.
    assert send(limited_service, "GET", "/readyz").status == 200
    for _ in range(5):
        answer = send(limited_service, "POST", "/predict", body, {"Content-Type": JSON})
        assert answer.status == 200, answer.text[:300]
        assert answer.json()["digit"] == drawings.labels[0]
