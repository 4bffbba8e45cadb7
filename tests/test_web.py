"""End-to-end tests of the drawing page (web/) in Chromium against a real `bentoml serve`.

The tests write digits, numbers and things that are not digits the way a person does, with a
mouse and with a finger, and read what the page shows. Run them with
`.venv/bin/pytest -m slow tests/test_web.py`. They need Debian's Chromium at /usr/bin/chromium
(`scripts/setup --browser`) and take the service's base URL from the `live_service` fixture in
conftest.py. Every test leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import shutil
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
)

from pipelines.corrections import Correction, CorrectionStore
from tests.conftest import serve
from tests.helpers import launched_chromium

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {
    "viewport": {"width": 360, "height": 740},
    "device_scale_factor": 3,
    "is_mobile": True,
    "has_touch": True,
}
ANSWER_TIMEOUT_MS = 10_000  # an answer, or a retry after an error (every 3 s)
INVITATION = re.compile(r"draw a digit or a number", re.IGNORECASE)
# Chromium logs every 4xx answer as a console error; 422 is the API's documented answer to a
# drawing with no digit yet (say, the first dash of a stroke) or with marks that are not
# digits, not a fault of the page.
EXPECTED_CONSOLE_ERRORS = re.compile(r"Failed to load resource: .* status of 422")
DESKTOP_PAD_ASPECT = 3  # the pad is 3:1 on a desktop screen, 2:1 on a phone
PHONE_PAD_ASPECT = 2
EXPORT_HEIGHT = 280  # px: the image sent is this high, and as wide as the pad's aspect makes it
BRUSH_WIDTH = 1 / 13  # of the pad height, as the square pad had it of its side

# Points are in pad heights: x from the pad's left edge (0 to 3 on a 3:1 pad), y from its top
# (0 to 1). A glyph is a digit's (or a letter's) strokes in a box one unit high, x from its left
# edge; `place` and `write` put glyphs on the pad at a size and place.
Point = tuple[float, float]
Stroke = Sequence[Point]
Glyph = Sequence[Stroke]


# ---- Glyphs: digits and not-digits as a hand writes them ---------------------------------------


def arc(
    centre: Point, radii: tuple[float, float], start: float, end: float, steps: int = 24
) -> list[Point]:
    """Points along an ellipse from angle `start` to `end` (degrees; 0 is to the right, 90 is
    down, as y grows downwards on screen)."""
    (x, y), (rx, ry) = centre, radii
    angles = [math.radians(start + (end - start) * i / steps) for i in range(steps + 1)]
    return [(x + rx * math.cos(a), y + ry * math.sin(a)) for a in angles]


ONE: Glyph = [[(0.32, 0.0), (0.26, 1.0)]]
SEVEN: Glyph = [[(0.0, 0.0), (0.7, 0.0), (0.3, 1.0)]]
# A little past a full turn, as people close a 0.
ZERO: Glyph = [arc((0.33, 0.5), (0.3, 0.5), -90, 300, steps=52)]
# An open 4: down and across, then the stem.
FOUR: Glyph = [[(0.14, 0.0), (0.04, 0.58), (0.66, 0.58)], [(0.5, 0.05), (0.47, 1.0)]]
# A hook over a diagonal down to the base line.
TWO: Glyph = [[*arc((0.33, 0.27), (0.29, 0.26), 195, 380, steps=20), (0.04, 1.0), (0.7, 0.98)]]
# A stem curving down the left into a closed loop at the bottom.
SIX: Glyph = [[(0.56, 0.0), (0.3, 0.2), (0.1, 0.5), *arc((0.34, 0.73), (0.26, 0.26), 180, 540)]]

# Not digits: capital letters the test model refuses (a capital A is no good: drawn a little
# wider it reads as a 4 at 98%), and a scribble (a zigzag hatching a box, as one crosses out).
LETTER_X: Glyph = [[(0.0, 0.0), (0.75, 1.0)], [(0.75, 0.0), (0.0, 1.0)]]
LETTER_M: Glyph = [[(0.0, 1.0), (0.05, 0.0), (0.4, 0.7), (0.75, 0.0), (0.8, 1.0)]]
SCRIBBLE: Glyph = [[(0.8 * (i % 2), 0.04 + 0.092 * i + 0.02 * (i % 2)) for i in range(11)]]


def width(glyph: Glyph) -> float:
    return max(x for stroke in glyph for x, _ in stroke)


def place(glyph: Glyph, left: float, top: float = 0.2, height: float = 0.6) -> list[Stroke]:
    """The glyph `height` pad heights tall, its box's top-left corner at (left, top)."""
    return [[(left + x * height, top + y * height) for x, y in stroke] for stroke in glyph]


def write(
    glyphs: Sequence[Glyph], left: float, top: float = 0.2, height: float = 0.6, gap: float = 0.15
) -> list[Stroke]:
    """Glyphs left to right, `gap` (of their height) apart; a negative gap makes them overlap."""
    strokes: list[Stroke] = []
    for glyph in glyphs:
        strokes += place(glyph, left, top, height)
        left += (width(glyph) + gap) * height
    return strokes


def centred(glyph: Glyph, aspect: float = DESKTOP_PAD_ASPECT, **size: float) -> list[Stroke]:
    height = size.get("height", 0.6)
    return place(glyph, (aspect - width(glyph) * height) / 2, **size)


# ---- The page under test -------------------------------------------------------------------


class DrawingPage:
    """One browser tab on the drawing page, with what it logged and asked the service."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console_errors: list[str] = []
        self.read_requests: list[Request] = []
        page.on("console", self._record_console)
        page.on("pageerror", lambda error: self.console_errors.append(f"uncaught: {error}"))
        page.on("request", self._record_request)
        self.pad = page.get_by_test_id("pad")
        self.number = page.get_by_test_id("number")
        self.status = page.get_by_test_id("status")
        self.confidence = page.get_by_test_id("confidence")
        self.result = page.get_by_test_id("result")
        self.crops = page.get_by_test_id("crop")
        self.bars = page.get_by_test_id("probabilities").locator("[data-digit]")
        self.bars_caption = page.get_by_test_id("bars-caption")

    def _record_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not EXPECTED_CONSOLE_ERRORS.search(message.text):
            self.console_errors.append(message.text)

    def _record_request(self, request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/read"):
            self.read_requests.append(request)

    def _on_screen(self, stroke: Stroke) -> list[Point]:
        box = self.pad.bounding_box()
        assert box is not None, "the pad is not on screen"
        return [(box["x"] + x * box["height"], box["y"] + y * box["height"]) for x, y in stroke]

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

    def expect_answer(self) -> None:
        """Waits for the answer about the drawing as it is now: while drawing, the page also
        shows answers about the strokes so far, which may read differently."""
        expect(self.result).to_have_attribute("aria-busy", "false", timeout=ANSWER_TIMEOUT_MS)

    def expect_number(self, number: str) -> None:
        self.expect_answer()
        expect(self.number).to_have_text(number, timeout=ANSWER_TIMEOUT_MS)

    def expect_invitation(self) -> None:
        expect(self.number).to_have_text("")
        expect(self.status).to_have_text(INVITATION)
        expect(self.pad).to_have_attribute("data-strokes", "0")
        expect(self.crops).to_have_count(0)
        expect(self.page.locator(".pad-outline")).to_have_count(0)
        expect(self.page.locator("[data-digit][data-probability='0.0000']")).to_have_count(10)

    def top_bar(self) -> int:
        """The digit whose bar is highest."""
        probabilities = self.shown_probabilities()
        return max(probabilities, key=probabilities.__getitem__)

    def crop_digits(self) -> list[str]:
        """The digit under each image of what the model saw, "?" for a mark not a digit."""
        return [text.strip() for text in self.crops.locator(".crop-digit").all_text_contents()]

    def shown_probabilities(self) -> dict[int, float]:
        return {
            int(bar.get_attribute("data-digit") or "-1"): float(
                bar.get_attribute("data-probability") or "nan"
            )
            for bar in self.bars.all()
        }

    def assert_no_console_errors(self) -> None:
        assert self.console_errors == [], f"the page logged errors: {self.console_errors}"


def sent_image(request: Request, mode: str = "L") -> np.ndarray:
    """The image a /read request sent, as an array (height, width) in `mode` "L", or (height,
    width, 4) in "RGBA"."""
    data_url = json.loads(request.post_data or "{}")["image"]
    header, _, payload = data_url.partition(",")
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert(mode))


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    with launched_chromium() as browser:
        yield browser


@pytest.fixture
def open_page(
    chromium: Browser, live_service: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DrawingPage]]:
    """Opens the drawing page in a fresh browser context (options as for `new_context`); each
    page is photographed into test-artifacts/ when the test ends, whether it passed or not."""
    yield from page_opener(chromium, live_service, request)


def page_opener(
    chromium: Browser, base_url: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DrawingPage]]:
    """The body of a fixture like `open_page`, for the page served at `base_url`."""
    opened: list[DrawingPage] = []

    def open_(**context_options: object) -> DrawingPage:
        context = chromium.new_context(**(DESKTOP | context_options))
        drawing_page = DrawingPage(context.new_page())
        drawing_page.page.goto(base_url.rstrip("/") + "/")
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
        ("1", centred(ONE)),
        ("1", place(ONE, left=0.3, top=0.1, height=0.35)),
        ("7", centred(SEVEN)),
        ("7", place(SEVEN, left=2.3, top=0.5, height=0.4)),
        ("0", centred(ZERO)),
        ("0", place(ZERO, left=0.2, top=0.45, height=0.45)),
        ("7", place(SEVEN, left=1.3, top=0.35, height=0.25)),
        ("4", place(FOUR, left=0.6, top=0.1, height=0.22)),
    ],
    ids=[
        "1-centre",
        "1-small-top-left",
        "7-centre",
        "7-small-bottom-right",
        "0-centre",
        "0-small-bottom-left",
        "7-a-quarter-high",
        "4-a-fifth-high",
    ],
)
def test_reads_a_digit_drawn_with_the_mouse(
    open_page: Callable[..., DrawingPage], expected: str, strokes: list[Stroke]
) -> None:
    drawing = open_page()
    drawing.draw(strokes)

    drawing.expect_number(expected)
    expect(drawing.status).to_have_text(f"Looks like a\u00a0{expected}.")
    expect(drawing.confidence).to_have_text(re.compile(r"^\d+(\.\d)?% sure$"))
    probabilities = drawing.shown_probabilities()
    assert sorted(probabilities) == list(range(10))
    assert drawing.top_bar() == int(expected)
    assert sum(probabilities.values()) == pytest.approx(1, abs=0.01)
    # One digit: what the model saw is one image, and the bars need no caption.
    assert drawing.crop_digits() == [expected]
    expect(drawing.crops.locator("img")).to_have_attribute("src", re.compile("^data:image/png"))
    expect(drawing.bars_caption).to_be_hidden()
    drawing.assert_no_console_errors()


def test_reads_a_number_written_with_its_digits_apart(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()
    drawing.draw(write([FOUR, TWO], left=1.0, gap=0.5))

    drawing.expect_number("42")
    expect(drawing.status).to_have_text("Reads 42.")
    expect(drawing.confidence).to_contain_text("sure of the whole number")
    assert drawing.crop_digits() == ["4", "2"]
    for image in drawing.crops.locator("img").all():
        assert (image.get_attribute("src") or "").startswith("data:image/png;base64,")
        assert image.evaluate("(image) => image.complete && image.naturalWidth") == 28

    # Hovering, focusing or tapping a digit's image shows that digit's bars.
    drawing.crops.nth(0).hover()
    expect(drawing.bars_caption).to_have_text("The 1st mark, a\u00a04:")
    assert drawing.top_bar() == 4
    expect(drawing.page.locator(".pad-outline.is-picked")).to_have_count(1)
    drawing.crops.nth(1).focus()
    drawing.page.mouse.move(0, 0)
    expect(drawing.bars_caption).to_have_text("The 2nd mark, a\u00a02:")
    assert drawing.top_bar() == 2
    expect(drawing.crops.nth(1)).to_have_attribute("aria-pressed", "true")
    expect(drawing.crops.nth(0)).to_have_attribute("aria-pressed", "false")
    drawing.assert_no_console_errors()


def test_reads_a_number_whose_digits_touch(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page()
    drawing.draw(write([TWO, ZERO, TWO, SIX], left=0.55, gap=0.0))

    drawing.expect_number("2026")
    ink = sent_image(drawing.read_requests[-1]).min(axis=0) < 128  # (width,): columns with ink
    first, last = np.flatnonzero(ink)[[0, -1]]
    assert ink[first : last + 1].all(), "the digits do not touch: a blank column parts them"
    expect(drawing.status).to_have_text("Reads 2026.")
    assert drawing.crop_digits() == ["2", "0", "2", "6"]
    drawing.assert_no_console_errors()


@pytest.mark.parametrize("letter", [LETTER_X, LETTER_M], ids=["X", "M"])
def test_says_a_letter_is_not_a_digit(open_page: Callable[..., DrawingPage], letter: Glyph) -> None:
    drawing = open_page()
    drawing.draw(centred(letter, height=0.7))

    drawing.expect_answer()
    expect(drawing.result).to_have_attribute("data-state", "not-a-digit")
    expect(drawing.status).to_have_text(
        "That is not a digit. Write a digit from 0 to 9, or a number."
    )
    expect(drawing.confidence).to_have_text(re.compile(r"sure it is not a digit$"))
    expect(drawing.number).to_have_text("?")
    assert drawing.crop_digits() == ["?"]
    expect(drawing.crops.locator(".crop-note")).to_have_text("not a digit")
    expect(drawing.page.get_by_test_id("outline-not-digit")).to_have_count(1)
    drawing.assert_no_console_errors()


def test_outlines_the_part_of_the_drawing_that_is_not_a_digit(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()
    digit = place(SEVEN, left=0.8)
    drawing.draw([*digit, *place(SCRIBBLE, left=1.7)])

    drawing.expect_answer()
    expect(drawing.result).to_have_attribute("data-state", "not-a-digit")
    expect(drawing.status).to_have_text(
        "Part of the drawing is not a digit: the 2nd mark from the left, outlined on the pad."
    )
    expect(drawing.number).to_have_text("7?")
    assert drawing.crop_digits() == ["7", "?"]
    expect(drawing.crops.nth(1)).to_have_attribute("aria-pressed", "true")  # its bars show
    expect(drawing.bars_caption).to_contain_text("The 2nd mark is not a digit")
    # The outline sits on the scribble, right of the 7.
    outline = drawing.page.get_by_test_id("outline-not-digit")
    expect(outline).to_have_count(1)
    expect(outline).to_contain_text("not a digit")
    pad, box = drawing.pad.bounding_box(), outline.bounding_box()
    assert pad is not None and box is not None
    left_of_scribble = pad["x"] + 1.7 * pad["height"]
    seven_right = pad["x"] + max(x for stroke in digit for x, _ in stroke) * pad["height"]
    assert seven_right < box["x"] + 8 and box["x"] < left_of_scribble
    drawing.assert_no_console_errors()


def fake_digit(digit: int, confidence: float, runner_up: int, left: int) -> dict:
    """One digit of a /read answer, its other probability all on `runner_up`."""
    probabilities = [0.0] * 10
    probabilities[digit], probabilities[runner_up] = confidence, 1 - confidence
    box = {"x": left, "y": 60, "width": 100, "height": 160}
    return {"digit": digit, "confidence": confidence, "probabilities": probabilities, "box": box}


def test_says_which_digit_of_a_number_it_is_unsure_of(
    open_page: Callable[..., DrawingPage],
) -> None:
    # The test model is sure of every digit drawn here, so the answer is made up: a 4 it is
    # sure of, then a 2 that might be a 7.
    drawing = open_page()
    digits = [fake_digit(4, 0.99, 9, 250), fake_digit(2, 0.55, 7, 450)]
    answer = {"text": "42", "confidence": 0.5445, "digits": digits, "model_version": "fake"}
    drawing.page.route("**/read", lambda route: route.fulfill(json=answer))

    drawing.draw(write([FOUR, TWO], left=1.0, gap=0.5))

    drawing.expect_number("42")
    expect(drawing.result).to_have_attribute("data-state", "unsure")
    expect(drawing.status).to_have_text("Not sure: 42 or 47?")
    expect(drawing.confidence).to_have_text(
        "54.5% sure of the whole number · the 2nd digit could be a\u00a07 (45%)"
    )
    expect(drawing.number.locator(".is-unsure")).to_have_text("2")
    # The bars show the digit it is unsure of, with its runner-up, until another is picked.
    expect(drawing.bars_caption).to_have_text("The 2nd mark, a\u00a02:")
    expect(drawing.page.locator(".bar.is-runner-up")).to_have_attribute("data-digit", "7")
    drawing.crops.nth(0).click()
    drawing.page.mouse.move(0, 0)
    expect(drawing.bars_caption).to_have_text("The 1st mark, a\u00a04:")
    expect(drawing.page.locator(".bar.is-runner-up")).to_have_count(0)
    drawing.assert_no_console_errors()


def test_asks_for_a_gap_when_digits_touch_too_much_to_be_told_apart(
    open_page: Callable[..., DrawingPage],
) -> None:
    # Which drawings the test model cannot split is not fixed, so the refusal is made up: a 4,
    # then a mark the model reads as several touching digits.
    drawing = open_page()
    joined = {**fake_digit(1, 0.9, 7, 450), "digit": None, "is_digit": False}
    marks = [{**fake_digit(4, 0.99, 9, 250), "is_digit": True, "several_digits": False}]
    marks.append({**joined, "several_digits": True})
    refusal = {"error": "mark 2 of 2 is not a digit", "reason": "not_a_digit", "marks": marks}
    drawing.page.route("**/read", lambda route: route.fulfill(status=422, json=refusal))

    drawing.draw(write([FOUR, TWO], left=1.0, gap=0.5))

    expect(drawing.result).to_have_attribute("data-state", "not-a-digit", timeout=ANSWER_TIMEOUT_MS)
    expect(drawing.status).to_have_text(
        "Some digits touch (the 2nd mark from the left, outlined on the pad), so they could not "
        "be told apart. Leave a little gap between digits."
    )
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
    assert drawing.read_requests == []
    drawing.assert_no_console_errors()


def test_clear_returns_to_the_invitation(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page()

    drawing.draw(centred(SEVEN))
    drawing.expect_number("7")
    expect(drawing.page.get_by_test_id("undo")).to_be_enabled()
    drawing.page.get_by_test_id("clear").click()
    drawing.expect_invitation()

    drawing.draw(write([FOUR, TWO], left=1.0, gap=0.5))
    drawing.expect_number("42")
    drawing.page.keyboard.press("Escape")
    drawing.expect_invitation()

    drawing.draw(centred(ZERO))
    drawing.expect_number("0")
    drawing.page.keyboard.press("c")
    drawing.expect_invitation()
    drawing.page.wait_for_timeout(500)  # no late answer brings a guess back
    drawing.expect_invitation()
    drawing.assert_no_console_errors()


def test_undo_removes_only_the_last_stroke(open_page: Callable[..., DrawingPage]) -> None:
    drawing = open_page()
    stem = [(1.62, 0.2), (1.42, 0.82)]
    bar = [(1.3, 0.2), (1.64, 0.2)]

    drawing.draw([stem])
    drawing.expect_number("1")
    drawing.draw([bar])
    drawing.expect_number("7")
    expect(drawing.pad).to_have_attribute("data-strokes", "2")

    drawing.page.get_by_test_id("undo").click()
    expect(drawing.pad).to_have_attribute("data-strokes", "1")
    drawing.expect_number("1")

    drawing.page.keyboard.press("Control+z")
    drawing.expect_invitation()
    drawing.assert_no_console_errors()


def test_reads_a_number_written_with_a_finger_on_a_phone(
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
    # The pad fills the width (less the page's margins) and is 2:1, so a finger has room.
    pad = drawing.pad.bounding_box()
    assert pad is not None
    assert pad["width"] >= 360 - 2 * 16 - 2 and pad["x"] >= 0  # the page's margins, the border
    assert pad["width"] / pad["height"] == pytest.approx(PHONE_PAD_ASPECT, rel=0.02)

    drawing.draw_with_finger(write([FOUR, TWO], left=0.45, top=0.15, height=0.7, gap=0.4))

    drawing.expect_number("42")
    expect(drawing.status).to_have_text("Reads 42.")
    assert page.evaluate("window.padPointerTypes") == ["touch", "touch", "touch"]
    assert page.evaluate("window.scrollY") == 0, "drawing scrolled the page"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "wider than the phone"
    number_box = drawing.number.bounding_box()
    assert number_box is not None
    assert number_box["y"] + number_box["height"] <= 740, "the answer is below the fold"
    drawing.crops.nth(0).tap()  # a tap on a digit's image shows its bars
    expect(drawing.bars_caption).to_have_text("The 1st mark, a\u00a04:")
    assert drawing.top_bar() == 4
    drawing.assert_no_console_errors()


@pytest.mark.parametrize(
    ("options", "aspect"),
    [({}, DESKTOP_PAD_ASPECT), (PHONE, PHONE_PAD_ASPECT)],
    ids=["desktop", "phone"],
)
def test_sends_black_ink_on_white_as_wide_as_the_pad_in_dark_mode(
    open_page: Callable[..., DrawingPage], options: dict, aspect: int
) -> None:
    drawing = open_page(**options, color_scheme="dark")
    background = drawing.page.evaluate("getComputedStyle(document.body).backgroundColor")
    red, green, blue = map(int, re.findall(r"\d+", background)[:3])
    assert max(red, green, blue) < 80, f"not a dark page: {background}"

    stem = [(aspect / 2, 0.2), (aspect / 2, 0.8)]  # a straight 1, to measure the stroke
    drawing.draw([stem])
    drawing.expect_number("1")

    image = sent_image(drawing.read_requests[-1], mode="RGBA")
    assert image.shape[:2] == (EXPORT_HEIGHT, aspect * EXPORT_HEIGHT)
    assert (image[..., 3] == 255).all(), "the image sent has transparent pixels"
    gray = image[..., :3].mean(axis=-1)
    assert gray[0, 0] == 255 and gray[-1, -1] == 255, "the background sent is not white"
    assert gray.min() == 0, "no black ink in the image sent"
    # The stroke is as wide, for the pad's height, as it was for the square pad's side: the
    # digits the model sees keep their stroke.
    stroke_width = (gray[EXPORT_HEIGHT // 2] < 128).sum()
    assert stroke_width == pytest.approx(BRUSH_WIDTH * EXPORT_HEIGHT, abs=2)
    drawing.assert_no_console_errors()


def test_a_digit_written_small_is_sent_with_a_pen_as_thin_for_its_height_as_mnist_s(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()
    drawing.draw([[(1.5, 0.4), (1.5, 0.6)]])  # a 1 a fifth of the pad high
    drawing.expect_number("1")
    gray = sent_image(drawing.read_requests[-1], mode="L").astype(float)
    stroke_width = (gray[EXPORT_HEIGHT // 2] < 128).sum()
    # MNIST's pen is 0.13 of its digits' height; the pad's would be 0.28 of this one's.
    inked_rows = np.flatnonzero((gray < 128).any(axis=1))
    height = inked_rows[-1] - inked_rows[0] + 1
    assert stroke_width == pytest.approx(0.13 * height, abs=2)
    assert stroke_width < BRUSH_WIDTH * EXPORT_HEIGHT / 2


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
    drawing.page.route("**/read", failure)

    drawing.draw(centred(ONE))
    expect(drawing.status).to_have_text(
        re.compile(message, re.IGNORECASE), timeout=ANSWER_TIMEOUT_MS
    )
    expect(drawing.number).to_have_text("")
    ARTIFACTS.mkdir(exist_ok=True)
    drawing.page.screenshot(path=ARTIFACTS / f"service-failure-{failure.__name__}.png")

    drawing.page.unroute("**/read")
    drawing.expect_number("1")  # the page retries on its own; nobody draws again
    expect(drawing.status).to_contain_text("1")


def test_ignores_a_late_answer_about_a_cleared_drawing(
    open_page: Callable[..., DrawingPage],
) -> None:
    drawing = open_page()
    held: list[Route] = []
    drawing.page.route("**/read", lambda route: held.append(route))

    drawing.draw(centred(ONE))
    for _ in range(100):
        if held:
            break
        drawing.page.wait_for_timeout(50)
    assert held, "the page did not ask the service"
    drawing.page.keyboard.press("Escape")
    five = {
        "digit": 5,
        "confidence": 1.0,
        "probabilities": [0.0] * 5 + [1.0] + [0.0] * 4,
        "box": {"x": 400, "y": 60, "width": 40, "height": 160},
        "input": "",
    }
    late_answer = {"text": "5", "confidence": 1.0, "digits": [five], "model_version": "late"}
    for route in held:
        with contextlib.suppress(Error):  # the page may have cancelled the request already
            route.fulfill(json=late_answer)
    drawing.page.wait_for_timeout(500)

    drawing.expect_invitation()
    drawing.assert_no_console_errors()


# ---- Feedback: confirming or correcting an answer ----------------------------------------------


@pytest.fixture(scope="module")
def feedback_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of `feedback_service`: its model store, its log, its corrections."""
    return tmp_path_factory.mktemp("feedback_service")


@pytest.fixture(scope="module")
def feedback_service(bentoml_home: Path, feedback_folder: Path) -> Iterator[str]:
    """A `bentoml serve` of its own (one worker) whose corrections go to a fresh folder, so the
    tests can read what the page sent from the store itself. It gets a copy of the model store,
    as `limited_service` does, so that starting it leaves the live server's metrics alone."""
    shutil.copytree(bentoml_home / "models", feedback_folder / "bentoml" / "models")
    with serve(
        feedback_folder / "bentoml",
        feedback_folder,
        DIGITS_WORKERS="1",
        DIGITS_FEEDBACK_DIR=str(feedback_folder / "corrections"),
    ) as base_url:
        yield base_url


@pytest.fixture
def open_feedback_page(
    chromium: Browser, feedback_service: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DrawingPage]]:
    """`open_page`, on the page of `feedback_service`."""
    yield from page_opener(chromium, feedback_service, request)


@pytest.fixture
def corrections(feedback_service: str, feedback_folder: Path) -> Iterator[CorrectionStore]:
    """The store `feedback_service` writes to, opened as the pipeline opens it."""
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(feedback_folder / "corrections")})
    yield store
    store.close()


class Feedback:
    """The feedback under the answer: buttons, the correction form and what it says."""

    def __init__(self, drawing: DrawingPage) -> None:
        self.drawing = drawing
        page = drawing.page
        self.root = page.get_by_test_id("feedback")
        self.right = page.get_by_test_id("feedback-right")
        self.wrong = page.get_by_test_id("feedback-wrong")
        self.not_a_digit = page.get_by_test_id("feedback-not-digit")
        self.form = page.get_by_test_id("feedback-fix")
        self.label = page.get_by_test_id("feedback-label")
        self.send = page.get_by_test_id("feedback-send")
        self.keypad = page.get_by_test_id("keypad")
        self.status = page.get_by_test_id("feedback-status")

    def key(self, name: str):
        return self.keypad.locator(f"[data-key='{name}']")

    def offered_answer(self) -> str:
        """The answer the page asks about, as a label: the number shown, or not_a_digit."""
        self.drawing.expect_answer()
        expect(self.root).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
        if self.drawing.result.get_attribute("data-state") == "not-a-digit":
            return "not_a_digit"
        return self.drawing.number.inner_text().strip()

    def sent(self, action: Callable[[], None]) -> tuple[dict, dict]:
        """Does `action`, which must send feedback; returns the request's JSON body and the
        service's JSON answer, after checking that it answered 201."""
        with self.drawing.page.expect_response("**/feedback") as info:
            action()
        response = info.value
        assert response.status == 201, response.text()
        return json.loads(response.request.post_data or "{}"), response.json()


def stored(store: CorrectionStore, reply: dict) -> Correction:
    assert reply["status"] == "pending" and re.fullmatch(r"[0-9a-f]+", reply["id"])
    correction = store.get(reply["id"])
    assert correction is not None, "the service answered 201 but the store does not hold it"
    assert correction.status == "pending"
    return correction


def assert_sent_the_image_read(drawing: DrawingPage, body: dict, correction: Correction) -> None:
    """The correction holds the very image whose answer was on screen (the last one read)."""
    last_read = json.loads(drawing.read_requests[-1].post_data or "{}")["image"]
    assert body["image"] == last_read
    assert correction.image_png == base64.b64decode(last_read.partition(",")[2])


def test_feedback_saves_the_digit_tapped_after_a_wrong_answer_on_a_phone(
    open_feedback_page: Callable[..., DrawingPage], corrections: CorrectionStore
) -> None:
    drawing = open_feedback_page(**PHONE, color_scheme="dark")
    feedback = Feedback(drawing)
    expect(feedback.root).to_be_hidden()
    drawing.draw_with_finger(centred(SEVEN, aspect=PHONE_PAD_ASPECT))
    shown = feedback.offered_answer()
    expect(feedback.root).to_contain_text("Is this right?")

    feedback.wrong.tap()
    expect(feedback.wrong).to_have_attribute("aria-expanded", "true")
    expect(feedback.form).to_be_visible()
    feedback.key("4").tap()
    feedback.key("1").tap()
    feedback.key("Backspace").tap()  # a slip of the finger, taken back
    expect(feedback.label).to_have_value("4")
    assert drawing.page.evaluate("document.documentElement.scrollWidth") <= 360, "too wide"
    body, reply = feedback.sent(feedback.send.tap)

    expect(feedback.status).to_have_text("Thanks — saved for review: it is 4.")
    expect(feedback.status).to_have_attribute("aria-live", "polite")
    expect(feedback.form).to_be_hidden()
    expect(feedback.right).to_be_hidden()
    correction = stored(corrections, reply)
    assert correction.label == body["label"] == "4"
    assert correction.client_answer is not None
    assert correction.client_answer["text"] == shown
    assert_sent_the_image_read(drawing, body, correction)
    drawing.assert_no_console_errors()


def test_feedback_takes_the_right_number_from_the_keyboard(
    open_feedback_page: Callable[..., DrawingPage], corrections: CorrectionStore
) -> None:
    drawing = open_feedback_page()
    feedback = Feedback(drawing)
    drawing.draw(write([FOUR, TWO], left=1.0, gap=0.5))
    feedback.offered_answer()
    keyboard = drawing.page.keyboard

    keyboard.press("1")  # a digit key opens the correction with that digit typed
    expect(feedback.form).to_be_visible()
    expect(feedback.label).to_be_focused()
    expect(feedback.label).to_have_value("1")
    keyboard.press("Escape")  # cancels the correction, and leaves the drawing alone
    expect(feedback.form).to_be_hidden()
    expect(drawing.pad).to_have_attribute("data-strokes", "3")
    keyboard.press("4")
    keyboard.type("x7")  # the field takes digits only
    expect(feedback.label).to_have_value("47")
    body, reply = feedback.sent(lambda: keyboard.press("Enter"))

    expect(feedback.status).to_have_text("Thanks — saved for review: it is 47.")
    correction = stored(corrections, reply)
    assert correction.label == "47"
    assert_sent_the_image_read(drawing, body, correction)
    drawing.assert_no_console_errors()


def test_feedback_confirms_an_answer_and_starts_over_when_drawn_again(
    open_feedback_page: Callable[..., DrawingPage], corrections: CorrectionStore
) -> None:
    drawing = open_feedback_page()
    feedback = Feedback(drawing)
    drawing.draw(centred(SEVEN))
    shown = feedback.offered_answer()
    expect(feedback.right).to_have_accessible_name(re.compile(r"^Right: it is"))

    body, reply = feedback.sent(feedback.right.click)

    expect(feedback.status).to_have_text(re.compile(r"^Thanks — saved for review: "))
    correction = stored(corrections, reply)
    # What the page showed is what it confirmed, and what the server's model read again.
    assert correction.label == body["label"] == shown == correction.model_answer
    assert body["answer"]["text"] == shown
    assert body["answer"]["model_version"] == correction.model_version
    assert_sent_the_image_read(drawing, body, correction)

    # Drawing again puts the feedback away; the next answer is asked about afresh.
    drawing.draw([[(0.5, 0.3), (0.5, 0.7)]])
    feedback.offered_answer()
    expect(feedback.status).to_have_text("")
    expect(feedback.right).to_be_visible()
    drawing.assert_no_console_errors()


def test_feedback_says_not_a_digit_with_one_key(
    open_feedback_page: Callable[..., DrawingPage], corrections: CorrectionStore
) -> None:
    drawing = open_feedback_page()
    feedback = Feedback(drawing)
    drawing.draw(centred(ONE))
    feedback.offered_answer()

    body, reply = feedback.sent(lambda: drawing.page.keyboard.press("n"))

    expect(feedback.status).to_have_text("Thanks — saved for review: not a digit.")
    assert stored(corrections, reply).label == body["label"] == "not_a_digit"
    drawing.assert_no_console_errors()


def refuse(status: int, sentence: str, reason: str) -> Callable[[Route], None]:
    """A stand-in for POST /feedback that refuses, as the service does, with `status`."""

    def handler(route: Route) -> None:
        route.fulfill(status=status, json={"error": sentence, "reason": reason})

    return handler


def test_feedback_says_why_it_was_not_saved(
    open_feedback_page: Callable[..., DrawingPage], corrections: CorrectionStore
) -> None:
    drawing = open_feedback_page()
    feedback = Feedback(drawing)
    refusals = [
        (
            429,
            "at most 60 corrections per client within 1:00:00; try again later",
            "too_many_corrections",
        ),
        (507, "corrections cannot be stored now: the server's disk is full", "storage_full"),
    ]
    drawing.draw(centred(ZERO))
    shown = feedback.offered_answer()
    for status, sentence, reason in refusals:
        drawing.page.route("**/feedback", refuse(status, sentence, reason))
        feedback.right.click()
        expect(feedback.status).to_have_text(f"Not saved: {sentence}.")
        expect(feedback.status).to_have_class(re.compile("is-error"))
        drawing.page.unroute("**/feedback")

    # The buttons stay, so the person can try again once the service takes it.
    body, reply = feedback.sent(feedback.right.click)
    expect(feedback.status).to_have_text(re.compile(r"^Thanks — saved for review: "))
    assert stored(corrections, reply).label == shown
    unexpected = [m for m in drawing.console_errors if not re.search(r"status of (429|507)", m)]
    assert unexpected == []
