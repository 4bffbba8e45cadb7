"""Evaluation arithmetic and the canvas renderings behind the robustness numbers."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluate import (
    CANVAS_STYLES,
    calibration_table,
    confusion_matrix,
    misclassified_grid,
    per_class_scores,
    render_on_canvas,
)
from pipelines.preprocessing import image_to_input


def test_confusion_matrix_counts_actual_by_predicted():
    counts = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]))
    assert counts[0, 0] == 1 and counts[0, 1] == 1 and counts[1, 1] == 1 and counts[2, 2] == 1
    assert counts.sum() == 4


def test_per_class_precision_and_recall():
    counts = confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    scores = per_class_scores(counts)
    assert scores["0"] == {"precision": 1.0, "recall": 0.5}
    assert scores["1"] == {"precision": pytest.approx(0.6667, abs=1e-4), "recall": 1.0}


def test_calibration_error_is_zero_when_confidence_matches_accuracy():
    probabilities = np.zeros((10, 10))
    probabilities[:, 3] = 0.8
    probabilities[:, 4] = 0.2
    labels = np.array([3] * 8 + [4] * 2)  # 80% confident, 80% right
    error, rows = calibration_table(probabilities, labels, bins=10)
    assert error == pytest.approx(0.0, abs=1e-9)
    assert rows == [{"confidence": 0.8, "accuracy": 0.8, "count": 10}]


def test_calibration_error_measures_overconfidence():
    probabilities = np.full((4, 10), 0.0)
    probabilities[:, 0] = 1.0
    error, _ = calibration_table(probabilities, np.array([0, 1, 1, 1]), bins=10)
    assert error == pytest.approx(0.75)


def test_misclassified_grid_shows_only_mistakes():
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    probabilities = np.eye(10)[[0, 1, 2, 3, 4]]
    grid = misclassified_grid(images, np.array([0, 1, 2, 9, 9]), probabilities, shown=36)
    assert grid.size == (6 * 112, 112 + 16)  # two mistakes fit in one row


@pytest.mark.parametrize("name", sorted(CANVAS_STYLES))
def test_canvas_renderings_preprocess_back_to_the_digit(name):
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255  # a '1' in MNIST's 20-pixel box
    rendered = render_on_canvas(digit, CANVAS_STYLES[name], 280, np.random.default_rng(0))
    assert rendered.size == (280, 280)
    restored = image_to_input(rendered)
    overlap = (restored > 0.3) & (digit > 0)
    assert overlap.sum() >= 0.5 * (digit > 0).sum()
