"""The line reader's contract: a mark as a strip, and the strip's frames as digits."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.lines import (
    BLANK,
    LINE_BUCKET,
    LINE_CLASSES,
    LINE_FRAMES,
    LINE_HEIGHT,
    LINE_INK_HEIGHT,
    LINE_LEFT,
    LINE_STRIDE,
    LINE_WIDTH,
    line_input,
    line_text,
    read_line,
    strip_widths,
)
from pipelines.preprocessing import NOT_A_DIGIT, NoDigitError


def bar_mark(height: int, width: int, margin: int = 5) -> np.ndarray:
    """A solid rectangle of ink with blank paper around it."""
    mark = np.zeros((height + 2 * margin, width + 2 * margin), np.float32)
    mark[margin : margin + height, margin : margin + width] = 1.0
    return mark


def frames(*spans: tuple[int, int, int]) -> np.ndarray:
    """Reader output: blank everywhere but (digit, first frame, last frame) runs, 0.9 sure."""
    out = np.full((LINE_FRAMES, LINE_CLASSES), 0.01, np.float32)
    out[:, BLANK] = 0.9
    for digit, first, last in spans:
        out[first : last + 1, BLANK] = 0.01
        out[first : last + 1, digit + 1] = 0.9
    return out / out.sum(axis=1, keepdims=True)


def test_a_mark_is_scaled_to_the_strips_ink_height_and_starts_at_its_left_margin():
    line = line_input(bar_mark(44, 60))  # twice the ink height
    ink = line.pixels > 0.5
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    assert line.pixels.shape == (LINE_HEIGHT, LINE_WIDTH) and line.pixels.dtype == np.float32
    assert len(rows) == LINE_INK_HEIGHT and len(cols) == 30 and cols[0] == LINE_LEFT
    assert abs((rows[0] + rows[-1]) / 2 - (LINE_HEIGHT - 1) / 2) <= 0.5  # centred in height
    assert line.scale == pytest.approx(0.5) and (line.ink_left, line.ink_width) == (5, 60)
    assert line.mark_column(LINE_LEFT) == 5 and line.mark_column(LINE_LEFT + 30) == 65


def test_a_mark_too_long_for_the_strip_is_narrowed_to_fit_it():
    line = line_input(bar_mark(20, 2000))
    cols = np.flatnonzero((line.pixels > 0.5).any(axis=0))
    assert cols[0] == LINE_LEFT and cols[-1] <= LINE_WIDTH - LINE_LEFT
    assert (line.pixels > 0.5).any(axis=1).sum() < LINE_INK_HEIGHT


def test_a_mark_without_ink_is_no_digit():
    with pytest.raises(NoDigitError):
        line_input(np.full((30, 30), 0.1, np.float32))


def test_runs_of_a_digit_are_one_digit_and_a_blank_between_repeats_makes_two():
    line = line_input(bar_mark(22, 200))  # scale 1: strip columns are the mark's plus offsets
    read = read_line(frames((4, 5, 7), (4, 10, 11), (1, 12, 12), (7, 20, 24)), line)
    assert [digit.digit for digit in read] == [4, 4, 1, 7]


def test_each_digit_is_placed_at_its_runs_middle_with_its_surest_frames_probabilities():
    line = line_input(bar_mark(22, 200))  # scale 1: the ink starts at strip column 4, mark's 5
    output = frames((2, 9, 10), (6, 29, 30))
    output[10, 4 + 1] = 0.6  # the 2's second frame doubts it (it may be a 4): the first speaks
    first, second = read_line(output / output.sum(axis=1, keepdims=True), line)
    assert first.centre == pytest.approx(10 * LINE_STRIDE + 1)  # frames 9-10: strip column 40
    assert second.centre == pytest.approx(30 * LINE_STRIDE + 1)
    assert first.probabilities.shape == (11,) and first.probabilities.sum() == pytest.approx(1)
    assert first.probabilities[2] == pytest.approx(0.9 / (0.9 + 10 * 0.01))  # the first frame's


def test_a_strip_is_read_only_as_wide_as_its_ink_in_buckets_of_columns():
    assert line_input(bar_mark(22, 20)).width == LINE_BUCKET  # a digit: the first bucket
    assert line_input(bar_mark(22, 60)).width == 2 * LINE_BUCKET  # 4 + 60 + 4 columns
    assert line_input(bar_mark(22, 2000)).width == LINE_WIDTH
    strips = np.stack([line_input(bar_mark(22, w)).pixels for w in (20, 60)])
    assert strip_widths(strips).tolist() == [LINE_BUCKET, 2 * LINE_BUCKET]


def test_a_strip_of_blanks_reads_no_digit():
    assert read_line(frames(), line_input(bar_mark(22, 40))) == []


def test_a_run_of_the_not_a_digit_symbol_is_a_mark_that_is_not_a_digit():
    line = line_input(bar_mark(22, 200))
    read = read_line(frames((3, 5, 6), (NOT_A_DIGIT, 15, 17)), line)
    assert [(digit.digit, digit.is_digit) for digit in read] == [(3, True), (NOT_A_DIGIT, False)]
    assert read[1].probabilities.shape == (11,)
    assert line_text(read) == "3?"
