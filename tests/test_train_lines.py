"""Training the line reader: the lines it learns from, the batches it sees, the loss it lowers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipelines.lines import (
    BLANK,
    LINE_BUCKET,
    LINE_CLASSES,
    LINE_HEIGHT,
    LINE_WIDTH,
    LineInput,
    line_text,
    read_line,
    strip_widths,
)
from pipelines.preprocessing import NOT_A_DIGIT
from pipelines.train_lines import (
    BucketedLines,
    LineSettings,
    build_line_reader,
    ctc_loss,
    draw_lines,
    texts_read,
)

SETTINGS = LineSettings.from_params(
    {
        "seed": 0,
        "lines": 40,
        "validation_lines": 10,
        "max_digits": 4,
        "touching": [0.0, 0.5],
        "overlapping": [0.0, 0.2],
        "not_digit_lines": 0.5,
        "redrawn_lines": 0.5,
        "redrawn_stroke_width": [1.2, 5.0],
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.002,
        "precision": "float32",
    }
)


@pytest.fixture(scope="module")
def lines(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test
    letters = np.zeros((3, 28, 28), np.uint8)
    letters[:, 4:24, 12:16] = 255  # bars: anything that is not one of the digits drawn
    return draw_lines(images[:200], labels[:200], 40, SETTINGS, seed=1, others=letters)


def test_lines_hold_one_to_max_digits_and_some_hold_a_non_digit(lines):
    strips, targets = lines
    assert strips.shape == (40, LINE_HEIGHT, LINE_WIDTH) and strips.dtype == np.float32
    lengths = (targets >= 0).sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() <= SETTINGS.max_digits
    assert all((row[n:] == -1).all() for row, n in zip(targets, lengths, strict=True))
    with_letter = (targets == NOT_A_DIGIT).any(axis=1).mean()
    assert 0.2 <= with_letter <= 0.8  # not_digit_lines is 0.5
    assert ((targets == NOT_A_DIGIT).sum(axis=1) <= 1).all()
    assert all(strip.max() > 0.5 for strip in strips)  # every line has ink


def test_the_same_seed_draws_the_same_lines(mnist_test):
    images, labels = mnist_test
    first = draw_lines(images[:50], labels[:50], 6, SETTINGS, seed=4)
    again = draw_lines(images[:50], labels[:50], 6, SETTINGS, seed=4)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_batches_hold_strips_cut_to_their_widest_and_cover_every_line_once(lines):
    strips, targets = lines
    batches = BucketedLines(strips, targets, batch_size=8, seed=0)
    seen = []
    for index in range(len(batches)):
        x, y = batches[index]
        assert x.shape[1] == LINE_HEIGHT and x.shape[2] % LINE_BUCKET == 0 and x.shape[3] == 1
        members = np.sort(batches.batches[index])
        assert x.sum() == pytest.approx(strips[members].sum(), rel=1e-6)  # no ink cut off
        for row in y:
            seen.append(tuple(row))
    assert sorted(seen) == sorted(tuple(row) for row in targets)
    widths = {batches[index][0].shape[2] for index in range(len(batches))}
    assert len(widths) > 1  # short lines are read in narrow batches


def test_validation_reads_each_strip_cut_to_its_width_as_read_does(lines):
    strips, _ = lines
    keras.utils.set_random_seed(0)
    model = build_line_reader()  # untrained: what it reads differs from strip to strip
    widths = strip_widths(strips)
    assert len(set(widths)) > 1
    one_by_one = []
    for strip, width in zip(strips, widths, strict=True):
        frames = np.asarray(model(strip[np.newaxis, :, :width, np.newaxis]))[0]
        one_by_one.append(line_text(read_line(frames, LineInput(strip, 1.0, 0, int(width)))))
    assert texts_read(model, strips, batch_size=7) == one_by_one


def test_ctc_loss_is_lower_for_the_digits_the_frames_show():
    frames = np.full((1, 16, LINE_CLASSES), 0.01, np.float32)
    frames[0, :, BLANK] = 0.9
    frames[0, 3, BLANK], frames[0, 3, 4 + 1] = 0.01, 0.9  # a 4
    frames[0, 9, BLANK], frames[0, 9, 2 + 1] = 0.01, 0.9  # then a 2
    frames /= frames.sum(axis=2, keepdims=True)
    right = float(ctc_loss(np.array([[4, 2, -1]]), frames))
    wrong = float(ctc_loss(np.array([[2, 4, -1]]), frames))
    assert right + 5.0 < wrong, (right, wrong)
