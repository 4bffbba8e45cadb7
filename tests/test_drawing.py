"""The simulated drawings the evaluate stage reads: single digits in canvas styles, and numbers
whose digits sit left to right, touching where they are said to touch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipelines.drawing import (
    CANVAS_STYLES,
    INK_LEVEL,
    RenderedNumber,
    render_number,
    render_on_canvas,
    with_one_pen,
)
from pipelines.preprocessing import image_to_input
from pipelines.segmentation import Box

CANVAS = (840, 280)


@pytest.fixture(scope="module")
def test_digits(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test
    return images[:600], labels[:600]


def numbers(
    digits: tuple[np.ndarray, np.ndarray], length: int, count: int, touching=0.3, overlapping=0.1
) -> list[RenderedNumber]:
    images, labels = digits
    rng = np.random.default_rng(length)
    drawn = []
    for _ in range(count):
        chosen = rng.choice(len(images), size=length, replace=False)
        drawn.append(
            render_number(images[chosen], labels[chosen], CANVAS, touching, overlapping, rng)
        )
    return drawn


def placed_mask(number: RenderedNumber, index: int) -> np.ndarray:
    """Digit `index`'s pixels that a reader counts as ink, on the whole canvas."""
    mask = np.zeros(CANVAS[::-1], dtype=bool)
    ink, (x, y) = number.inks[index], number.origins[index]
    mask[y : y + ink.shape[0], x : x + ink.shape[1]] = ink >= INK_LEVEL
    return mask


@pytest.mark.parametrize("name", sorted(CANVAS_STYLES))
def test_canvas_renderings_preprocess_back_to_the_digit(name):
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255  # a '1' in MNIST's 20-pixel box
    rendered = render_on_canvas(digit, CANVAS_STYLES[name], 280, np.random.default_rng(0))
    assert rendered.size == (280, 280)
    restored = image_to_input(rendered)
    overlap = (restored > 0.3) & (digit > 0)
    assert overlap.sum() >= 0.5 * (digit > 0).sum()


@pytest.mark.parametrize("length", [2, 4, 6])
def test_numbers_fit_the_canvas_with_their_digits_left_to_right(test_digits, length):
    for number in numbers(test_digits, length, 20):
        assert number.image.size == CANVAS
        assert number.image.mode in ("RGBA", "L")
        assert len(number.labels) == length and len(number.joins) == length - 1
        boxes = number.boxes
        assert all(box.x >= 0 and box.y >= 0 for box in boxes)
        assert all(
            box.x + box.width <= CANVAS[0] and box.y + box.height <= CANVAS[1] for box in boxes
        )
        lefts = [box.x for box in boxes]
        rights = [box.x + box.width for box in boxes]
        assert lefts == sorted(lefts) and rights == sorted(rights)


def test_touching_digits_touch_and_separate_digits_do_not(test_digits):
    joins = {"gap": 0, "touching": 0, "overlapping": 0}
    for number in numbers(test_digits, 4, 40):
        for index, join in enumerate(number.joins):
            joins[join] += 1
            left, right = placed_mask(number, index), placed_mask(number, index + 1)
            grown = ndimage.binary_dilation(left, structure=np.ones((3, 3)))
            touch = bool((grown & right).any())  # 8-connected: beside or diagonal
            if join == "gap":
                box_left, box_right = number.boxes[index], number.boxes[index + 1]
                assert box_left.x + box_left.width < box_right.x  # blank columns between
            else:
                assert touch, f"{join} digits {index} and {index + 1} of {number.text} do not touch"
            if join == "overlapping":
                assert (left & right).any() or touch
    assert min(joins.values()) >= 5  # all three ways of meeting were drawn


def test_touching_digits_meet_without_overlapping(test_digits):
    for number in numbers(test_digits, 3, 30, touching=1.0, overlapping=0.0):
        for index in range(2):
            assert not (placed_mask(number, index) & placed_mask(number, index + 1)).any()


def test_same_seed_draws_the_same_number(test_digits):
    images, labels = test_digits
    first, second = (
        render_number(images[:3], labels[:3], CANVAS, 0.3, 0.1, np.random.default_rng(5))
        for _ in range(2)
    )
    assert first.origins == second.origins
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_a_crop_is_a_digit_only_when_it_holds_one_whole_digit(test_digits):
    number = numbers(test_digits, 3, 1, touching=0.0, overlapping=0.0)[0]
    first, second = number.boxes[0], number.boxes[1]
    assert [number.digit_in(box) for box in number.boxes] == [0, 1, 2]
    both = Box(first.x, 0, second.x + second.width - first.x, CANVAS[1])
    assert number.digit_in(both) is None  # two digits
    half = Box(first.x, first.y, first.width // 2, first.height)
    assert number.digit_in(half) is None  # part of one
    assert number.shares_in(Box(0, 0, *CANVAS)) == pytest.approx([1.0, 1.0, 1.0])


def test_the_tip_of_a_slanted_neighbour_does_not_make_a_crop_two_digits():
    """A slanted 1 reaching over the next digit: that digit's crop holds the 1's tip, little ink
    beside it, and a perfect reader still sees one digit; a whole thin 1 inside is a digit."""
    block, tall, short = (np.full(shape, 255, np.uint8) for shape in ((40, 40), (100, 2), (40, 2)))
    image = Image.new("L", CANVAS, 255)
    crop = Box(100, 100, 42, 40)  # the block, and the 2 columns right of it down to row 140
    reaching = RenderedNumber(image, (0, 1), ("touching",), (block, tall), ((100, 100), (140, 100)))
    assert reaching.digit_in(crop) == 0  # 40% of the tall stroke, 5% of the ink inside
    beside = RenderedNumber(image, (0, 1), ("touching",), (block, short), ((100, 100), (140, 100)))
    assert beside.digit_in(crop) is None  # all of a short stroke: two digits
    assert beside.digit_in(Box(120, 100, 22, 40)) is None  # half the block and the stroke


def test_render_number_rejects_impossible_shares(test_digits):
    images, labels = test_digits
    with pytest.raises(ValueError, match="touching and overlapping"):
        render_number(images[:2], labels[:2], CANVAS, 0.8, 0.4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels"):
        render_number(images[:2], labels[:3], CANVAS, 0.3, 0.1, np.random.default_rng(0))


def test_digits_redrawn_with_one_pen_keep_their_shape_and_take_its_width(mnist_test):
    images, _ = mnist_test
    thin, thick = with_one_pen(images[:3], 1.5), with_one_pen(images[:3], 4.5)
    assert thin.shape == thick.shape == (3, 28, 28) and thin.dtype == np.uint8
    for original, narrow, wide in zip(images[:3], thin, thick, strict=True):
        inked = original >= 128
        assert (wide >= 128).sum() > 1.5 * (narrow >= 128).sum()  # the pen sets the width
        overlap = (inked & (wide >= 128)).sum() / inked.sum()
        assert overlap > 0.6, overlap  # the same digit, where it was
    blank = np.zeros((1, 28, 28), np.uint8)
    assert (with_one_pen(blank, 3.0) == 0).all()  # nothing to redraw
