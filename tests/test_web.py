"""End-to-end tests of the drawing page (web/) in Chromium against a real `bentoml serve`.

The tests draw digits the way a person does, with a mouse and with a finger, and read what the
page shows. Run them with `.venv/bin/pytest -m slow tests/test_web.py`. They need Debian's
Chromium at /usr/bin/chromium (`scripts/setup --browser`) and take the service's base URL from
the `live_service` fixture in conftest.py. Every test leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Error,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {
    "viewport": {"width": 360, "height": 740},
    "device_scale_factor": 3,
    "is_mobile": True,
    "has_touch": True,
}
ANSWER_TIMEOUT_MS = 10_000  # a prediction, or a retry after an error (every 3 s)
INVITATION = re.compile(r"draw a digit", re.IGNORECASE)
# Chromium logs every 4xx answer as a console error; 422 is the API's documented answer to a
# drawing with no digit yet (say, the first dash of a stroke), not a fault of the page.
EXPECTED_CONSOLE_ERRORS = re.compile(r"Failed to load resource: .* status of 422")

Point = tuple[float, float]  # pad units: 0..1 across and down the pad
Stroke = Sequence[Point]


# ---- Digits as strokes, at any size and place ------------------------------------------------


def one(x: float = 0.5, top: float = 0.2, height: float = 0.6, slant: float = 0.06) -> list[Stroke]:
    return [[(x + slant / 2, top), (x - slant / 2, top + height)]]


def seven(left: float = 0.28, top: float = 0.2, size: float = 0.6) -> list[Stroke]:
    return [[(left, top), (left + 0.7 * size, top), (left + 0.3 * size, top + size)]]


def zero(x: float = 0.5, y: float = 0.5, width: float = 0.4, height: float = 0.6) -> list[Stroke]:
    # A little past a full turn, as people close a 0.
    turns = [step / 48 * 2 * math.pi for step in range(52)]
    return [[(x + width / 2 * math.sin(t), y - height / 2 * math.cos(t)) for t in turns]]


# ---- The page under test -------------------------------------------------------------------


class DrawingPage:
    """One browser tab on the drawing page, with what it logged and asked the service."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.predict_requests: list[Request] = []
        page.on("console", self._record_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))
        page.on("request", self._record_request)
        self.pad = page.get_by_test_id("pad")
        self.digit = page.get_by_test_id("digit")
        self.status = page.get_by_test_id("status")
        self.result = page.get_by_test_id("result")
        self.bars = page.get_by_test_id("probabilities").locator("[data-digit]")

    def _record_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not EXPECTED_CONSOLE_ERRORS.search(message.text):
            self.console_errors.append(message.text)

    def _record_request(self, request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/predict"):
            self.predict_requests.append(request)

    def _on_screen(self, stroke: Stroke) -> list[Point]:
        box = self.pad.bounding_box()
        assert box is not None, "the pad is not on screen"
        return [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]

    def draw(self, strokes: Sequence[Stroke]) -> None:
        """Draws with the mouse: press, move through every point in small steps, release."""
        mouse = self.page.mouse
        for stroke in strokes:
            first, *rest = self._on_screen(stroke)
            mouse.move(*first)
            mouse.down()
            for point in rest:
                mouse.move(*point, steps=24 if len(rest) < 3 else 3)
            mouse.up()

    def draw_with_finger(self, strokes: Sequence[Stroke]) -> None:
        """Draws with touch input through the browser's own input pipeline (CDP), so the page
        gets real pointer events with pointerType "touch", as on a phone."""
        cdp = self.page.context.new_cdp_session(self.page)
        for stroke in strokes:
            points = self._on_screen(stroke)
            path = [points[0]]
            for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
                steps = max(1, int(math.dist((x0, y0), (x1, y1)) / 4))  # a sample every ~4 px
                path += [
                    (x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps)
                    for i in range(1, steps + 1)
                ]
            for index, (x, y) in enumerate(path):
                touch = {"x": x, "y": y, "id": 1}
                kind = "touchStart" if index == 0 else "touchMove"
                cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [touch]})
            cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()

    def expect_digit(self, digit: str) -> None:
        """Waits for the answer about the drawing as it is now: while drawing, the page also
        shows answers about the strokes so far, which may read differently."""
        expect(self.result).to_have_attribute("aria-busy", "false", timeout=ANSWER_TIMEOUT_MS)
        expect(self.digit).to_have_text(digit, timeout=ANSWER_TIMEOUT_MS)

    def expect_invitation(self) -> None:
        expect(self.digit).to_have_text("")
        expect(self.status).to_have_text(INVITATION)
        expect(self.pad).to_have_attribute("data-strokes", "0")
        expect(self.page.locator("[data-digit][data-probability='0.0000']")).to_have_count(10)

    def shown_probabilities(self) -> dict[int, float]:
        return {
            int(bar.get_attribute("data-digit") or "-1"): float(
                bar.get_attribute("data-probability") or "nan"
            )
            for bar in self.bars.all()
        }

    def assert_no_console_errors(self) -> None:
        assert self.console_errors == [], f"the page logged errors: {self.console_errors}"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup --browser)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(
    chromium: Browser, live_service: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DrawingPage]]:
    """Opens the drawing page in a fresh browser context (options as for `new_context`); each
    page is photographed into test-artifacts/ when the test ends, whether it passed or not."""
    opened: list[DrawingPage] = []

    def open_(**context_options: object) -> DrawingPage:
        context = chromium.new_context(**(DESKTOP | context_options))
        drawing_page = DrawingPage(context.new_page())
        drawing_page.page.goto(live_service.rstrip("/") + "/")
        expect(drawing_page.bars).to_have_count(10)  # the module has run
        opened.append(drawing_page)
        return drawing_page

    yield open_

    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    for index, drawing_page in enumerate(opened):
        suffix = f"-{index + 1}" if len(opened) > 1 else ""
        drawing_page.page.screenshot(path=ARTIFACTS / f"{name}{suffix}.png", full_page=True)
        drawing_page.page.context.close()


# ---- Tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "strokes"),
    [
        ("1", one()),
        ("1", one(x=0.25, top=0.1, height=0.35, slant=0.04)),
        ("7", seven()),
        ("7", seven(left=0.5, top=0.5, size=0.4)),
        ("0", zero()),
        ("0", zero(x=0.3, y=0.68, width=0.3, height=0.45)),
    ],
    ids=[
        "1-centre",
        "1-small-top-left",
        "7-centre",
        "7-small-bottom-right",
        "0-centre",
        "0-small-bottom-left",
    ],
)
def test_reads_a_digit_drawn_with_the_mouse(
    open_page: Callable[..., DrawingPage], expected: str, strokes: list[Stroke]
) -> None:
    drawing = open_page()
    drawing.draw(strokes)

    drawing.expect_digit(expected)
    expect(drawing.status).to_contain_text(expected)
    probabilities = drawing.shown_probabilities()
    assert sorted(probabilities) == list(range(10))
    assert max(probabilities, key=probabilities.__getitem__) == int(expected)
    assert sum(probabilities.values()) == pytest.approx(1, abs=0.01)
    drawing.assert_no_console_errors()


def test_empty_pad_shows_the_invitation_without_asking_the_service(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()

    drawing.expect_invitation()
    expect(drawing.page.get_by_test_id("clear")).to_be_disabled()
    expect(drawing.page.get_by_test_id("undo")).to_be_disabled()
    drawing.page.keyboard.press("z")
    drawing.page.keyboard.press("Escape")
    drawing.page.wait_for_timeout(500)
    drawing.expect_invitation()
    assert drawing.predict_requests == []
    drawing.assert_no_console_errors()


def test_clear_returns_to_the_invitation(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page()

    drawing.draw(seven())
    drawing.expect_digit("7")
    expect(drawing.page.get_by_test_id("undo")).to_be_enabled()
    drawing.page.get_by_test_id("clear").click()
    drawing.expect_invitation()

    drawing.draw(one())
    drawing.expect_digit("1")
    drawing.page.keyboard.press("Escape")
    drawing.expect_invitation()

    drawing.draw(zero())
    drawing.expect_digit("0")
    drawing.page.keyboard.press("c")
    drawing.expect_invitation()
    drawing.page.wait_for_timeout(500)  # no late answer brings a guess back
    drawing.expect_invitation()
    drawing.assert_no_console_errors()


def test_undo_removes_only_the_last_stroke(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page()
    stem = [(0.62, 0.2), (0.42, 0.82)]
    bar = [(0.3, 0.2), (0.64, 0.2)]

    drawing.draw([stem])
    drawing.expect_digit("1")
    drawing.draw([bar])
    drawing.expect_digit("7")
    expect(drawing.pad).to_have_attribute("data-strokes", "2")

    drawing.page.get_by_test_id("undo").click()
    expect(drawing.pad).to_have_attribute("data-strokes", "1")
    drawing.expect_digit("1")

    drawing.page.keyboard.press("Control+z")
    drawing.expect_invitation()
    drawing.assert_no_console_errors()


def test_reads_a_digit_drawn_with_a_finger_on_a_phone(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page(**PHONE, color_scheme="dark")
    page = drawing.page
    drawing.pad.evaluate(
        """(pad) => {
            window.padPointerTypes = [];
            pad.addEventListener("pointerdown", (event) => padPointerTypes.push(event.pointerType));
        }"""
    )
    assert drawing.pad.evaluate("(pad) => getComputedStyle(pad).touchAction") == "none"

    drawing.draw_with_finger(one(height=0.65))

    drawing.expect_digit("1")
    assert page.evaluate("window.padPointerTypes") == ["touch"]
    assert page.evaluate("window.scrollY") == 0, "drawing scrolled the page"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "wider than the phone"
    digit_box = drawing.digit.bounding_box()
    assert digit_box is not None
    assert digit_box["y"] + digit_box["height"] <= 740, "the answer is below the fold"
    drawing.assert_no_console_errors()


def test_sends_black_ink_on_white_in_dark_mode(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page(color_scheme="dark")
    background = drawing.page.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = map(int, re.findall(r"\d+", background)[:3])
    assert max(red, green, blue) < 80, f"not a dark page: {background}"

    drawing.draw(zero())
    drawing.expect_digit("0")

    data_url = json.loads(drawing.predict_requests[-1].post_data or "{}")["image"]
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64"
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGBA"))
    assert (image[..., 3] == 255).all(), "the image sent has transparent pixels"
    gray = image[..., :3].mean(axis=-1)
    centre = (image.shape[0] // 2, image.shape[1] // 2)  # inside the 0
    assert gray[0, 0] == 255 and gray[centre] == 255, "the background sent is not white"
    assert gray.min() == 0, "no black ink in the image sent"
    drawing.assert_no_console_errors()


def abort(route: Route) -> None:
    route.abort()


def answer_busy(route: Route) -> None:
    route.fulfill(status=503, json={"error": "the model is warming up"})


@pytest.mark.parametrize(
    ("failure", "message"),
    [(abort, r"can.t reach the digit service"), (answer_busy, r"busy.*the model is warming up")],
    ids=["unreachable", "overloaded"],
)
def test_says_when_the_service_fails_and_recovers_by_itself(
    open_page: Callable[..., DrawingPage], failure: Callable[[Route], None], message: str
) -> None:
    drawing = open_page()
    drawing.page.route("**/predict", failure)

    drawing.draw(one())
    expect(drawing.status).to_have_text(
        re.compile(message, re.IGNORECASE), timeout=ANSWER_TIMEOUT_MS
    )
    expect(drawing.digit).to_have_text("")
    ARTIFACTS.mkdir(exist_ok=True)
    drawing.page.screenshot(path=ARTIFACTS / f"service-failure-{failure.__name__}.png")

    drawing.page.unroute("**/predict")
    drawing.expect_digit("1")  # the page retries on its own; nobody draws again
    expect(drawing.status).to_contain_text("1")


def test_ignores_a_late_answer_about_a_cleared_drawing(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()
    held: list[Route] = []
    drawing.page.route("**/predict", lambda route: held.append(route))

    drawing.draw(one())
    for _ in range(100):
        if held:
            break
        drawing.page.wait_for_timeout(50)
    assert held, "the page did not ask the service"
    drawing.page.keyboard.press("Escape")
    late_answer = {"digit": 5, "confidence": 1.0, "probabilities": [0.0] * 5 + [1.0] + [0.0] * 4}
    for route in held:
        with contextlib.suppress(Error):  # the page may have cancelled the request already
            route.fulfill(json=late_answer)
    drawing.page.wait_for_timeout(500)

    drawing.expect_invitation()
    drawing.assert_no_console_errors()
