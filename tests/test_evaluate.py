"""Evaluation arithmetic, and reading drawn numbers the way the service does."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.drawing import RenderedNumber, render_number
from pipelines.evaluate import (
    EvaluateSettings,
    NumberReading,
    auroc,
    calibration_table,
    canvas_robustness,
    classify_plans,
    confusion_matrix,
    describe_reading,
    draw_numbers,
    drawn_not_digits_refused,
    evaluate_numbers,
    letters_refused,
    log_loss,
    misclassified_grid,
    number_scores,
    numbers_grid,
    pen_robustness,
    per_class_scores,
    read_plans,
    reading_plan,
    refused,
    segmentation_scores,
)
from pipelines.lines import BLANK, LINE_CLASSES, LINE_HEIGHT, LINE_LEFT, LINE_STRIDE
from pipelines.preprocessing import CLASSES, NOT_A_DIGIT
from pipelines.segmentation import Classifier, LineReader, read_marks, working_scale
from tests.helpers import letter_settings

CANVAS = (840, 280)
SETTINGS = {
    "batch_size": 1000,
    "calibration_bins": 15,
    "misclassified_shown": 36,
    "canvas_samples": 10,
    "canvas_size": 280,
    "canvas_seed": 11,
    "pen_widths": [1.5, 4.5],
    "number_samples": 6,
    "number_lengths": [2, 5],
    "number_canvas": list(CANVAS),
    "number_touching": 0.3,
    "number_overlapping": 0.1,
    "number_seed": 13,
    "number_examples": 4,
    "letter_fonts": ["cursive", "futuram"],
    "letter_samples": 12,
    "letter_seed": 19,
}


def fixed_classifier(seed: int = 0) -> Classifier:
    """A classifier that answers each input by its pixels alone (a fixed random linear map and
    softmax), whatever else is in the batch: a stand-in model that is honest about batching."""
    weights = np.random.default_rng(seed).normal(size=(28 * 28, CLASSES)) * 3.0

    def classify(inputs: np.ndarray) -> np.ndarray:
        logits = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1) @ weights
        exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)

    return classify


def fixed_line_reader(seed: int = 0) -> LineReader:
    """A line reader that answers each frame by its strip's columns alone (a fixed random linear
    map of each LINE_STRIDE columns, and softmax): a stand-in honest about batching."""
    weights = np.random.default_rng(seed).normal(size=(LINE_HEIGHT * LINE_STRIDE, LINE_CLASSES))

    def read_lines(strips: np.ndarray) -> np.ndarray:
        count, height, width = strips.shape
        columns = strips.reshape(count, height, width // LINE_STRIDE, LINE_STRIDE)
        logits = columns.transpose(0, 2, 1, 3).reshape(count, width // LINE_STRIDE, -1) @ weights
        logits[..., BLANK] += 2.0  # mostly blank, as a trained reader is
        exponentials = np.exp(logits - logits.max(axis=2, keepdims=True))
        return (exponentials / exponentials.sum(axis=2, keepdims=True)).astype(np.float32)

    return read_lines


def oracle_classifier(number: RenderedNumber) -> Classifier:
    """A perfect CNN for one drawn number whose digits stand apart: it answers each mark with
    the label of the rendered digit the mark's box holds, certain."""
    plan = reading_plan(number.image)
    answers = np.zeros((len(plan.inputs), CLASSES), np.float32)
    for row, box in zip(answers, plan.boxes, strict=True):
        which = number.digit_in(box)
        row[NOT_A_DIGIT if which is None else number.labels[which]] = 1.0

    def classify(inputs: np.ndarray) -> np.ndarray:
        assert np.array_equal(inputs, plan.inputs), "asked about another drawing"
        return answers

    return classify


def oracle_line_reader(number: RenderedNumber) -> LineReader:
    """A perfect line reader for one drawn number: each digit's label at the frame that shows
    its rendered box's left edge, where the trained reader reads a digit."""
    plan = reading_plan(number.image)
    line = plan.line_plan(np.zeros((len(plan.inputs), CLASSES)))  # what the CNN said: unused
    scale = working_scale(number.image)
    out = np.zeros((1, line.input.shape[2] // LINE_STRIDE, LINE_CLASSES), np.float32)
    out[0, :, BLANK] = 1.0
    for box, label in zip(number.boxes, number.labels, strict=True):
        column = (box.x + 2) / scale
        frame = int((LINE_LEFT + (column - line.line.ink_left) * line.line.scale) // LINE_STRIDE)
        out[0, frame] = np.eye(LINE_CLASSES)[label + 1]

    def read_lines(strips: np.ndarray) -> np.ndarray:
        assert np.array_equal(strips, line.input), "asked about another drawing"
        return out

    return read_lines


def no_line_reader(strips: np.ndarray) -> np.ndarray:
    raise AssertionError("the line reader was asked to read digits the CNN is sure of")


@pytest.fixture(scope="module")
def test_digits(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    images, labels = mnist_test
    return images[:500], labels[:500].astype(np.int64)


def reading(truth: str, text: str, found, joins=None, joined=()) -> NumberReading:
    joins = joins or ("gap",) * (len(truth) - 1)
    return NumberReading(truth, tuple(joins), text, tuple(found), frozenset(joined))


# ---- Digits ------------------------------------------------------------------------------------


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


def test_log_loss_counts_the_not_a_digit_class():
    probabilities = np.full((2, CLASSES), 0.05)
    probabilities[0, 3] = 0.5
    probabilities[1, NOT_A_DIGIT] = 0.5
    assert log_loss(probabilities, np.array([3, NOT_A_DIGIT])) == pytest.approx(-np.log(0.5))


def test_misclassified_grid_shows_only_mistakes():
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    probabilities = np.eye(10)[[0, 1, 2, 3, 4]]
    grid = misclassified_grid(images, np.array([0, 1, 2, 9, 9]), probabilities, shown=36)
    assert grid.size == (6 * 112, 112 + 16)  # two mistakes fit in one row


# ---- Not a digit -------------------------------------------------------------------------------


def test_auroc_is_one_when_every_non_digit_scores_above_every_digit():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.5, 0.9])) == 0.0


def test_auroc_counts_ties_as_half():
    assert auroc(np.full(3, 0.5), np.full(4, 0.5)) == 0.5
    # Pairs: 0.8 beats 0.4 and 0.2; 0.4 ties 0.4 (half) and beats 0.2: 3.5 of 4.
    assert auroc(np.array([0.8, 0.4]), np.array([0.4, 0.2])) == pytest.approx(0.875)


def test_auroc_equals_the_share_of_pairs_ranked_right():
    rng = np.random.default_rng(0)
    positives = rng.integers(0, 6, size=40) / 5  # few distinct values: many ties
    negatives = rng.integers(0, 4, size=70) / 5
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives]
    assert auroc(positives, negatives) == pytest.approx(np.mean(pairs))


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.array([]), np.array([0.2]))


def test_refused_means_not_a_digit_is_the_most_probable_class():
    probabilities = np.full((3, CLASSES), 0.01)
    probabilities[0, 7] = 0.9
    probabilities[1, NOT_A_DIGIT] = 0.9
    probabilities[2, :10] = 0.06  # no digit above "not a digit"'s 0.4 below
    probabilities[2, NOT_A_DIGIT] = 0.4
    assert refused(probabilities).tolist() == [False, True, True]


def test_canvas_scores_read_digits_as_predict_does(test_digits):
    images, labels = test_digits
    settings = EvaluateSettings.from_params(SETTINGS)

    def always_seven(inputs: np.ndarray) -> np.ndarray:
        return np.tile(np.eye(CLASSES)[7], (len(inputs), 1))

    def never_a_digit(inputs: np.ndarray) -> np.ndarray:
        return np.tile(np.eye(CLASSES)[NOT_A_DIGIT], (len(inputs), 1))

    accuracy, refusals = canvas_robustness(always_seven, images, labels, settings)
    sample = np.random.default_rng(11).choice(len(images), size=10, replace=False)
    assert accuracy["centred"] == pytest.approx((labels[sample] == 7).mean())
    assert refusals["mean"] == 0.0
    _, refusals = canvas_robustness(never_a_digit, images, labels, settings)
    assert refusals["mean"] == 1.0


def test_pen_scores_redraw_digits_and_non_digits_with_each_pen(test_digits):
    images, labels = test_digits
    settings = EvaluateSettings.from_params(SETTINGS)

    def refuses_inky_inputs(inputs: np.ndarray) -> np.ndarray:
        ink = np.asarray(inputs).reshape(len(inputs), -1).mean(axis=1)  # 0.08 at 1.5, 0.19 at 4.5
        doubt = np.where(ink > 0.13, 0.6, 0.0)[:, np.newaxis]  # and reads a 7 either way
        return (1 - doubt) * np.eye(CLASSES)[7] + doubt * np.eye(CLASSES)[NOT_A_DIGIT]

    scores = pen_robustness(refuses_inky_inputs, images, labels, images[:20], settings)
    assert list(scores) == ["1.5", "4.5"]
    thin, thick = scores["1.5"], scores["4.5"]
    assert thin["digits_refused"] < 0.2 < 0.8 < thick["digits_refused"]
    assert thin["not_digits_refused"] < 0.2 < 0.8 < thick["not_digits_refused"]
    sample = np.random.default_rng(11).choice(len(images), size=10, replace=False)
    assert thin["accuracy"] == thick["accuracy"] == pytest.approx((labels[sample] == 7).mean())


# ---- Numbers -----------------------------------------------------------------------------------


def draw(test_digits, length: int, seed: int, touching=0.3, overlapping=0.1) -> RenderedNumber:
    images, labels = test_digits
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=length, replace=False)
    return render_number(images[chosen], labels[chosen], CANVAS, touching, overlapping, rng)


def test_read_plans_reads_like_read_marks(test_digits):
    classify, read_lines = fixed_classifier(), fixed_line_reader()
    numbers = [draw(test_digits, length, seed) for seed, length in enumerate([2, 3, 5, 6, 4, 4])]
    plans = [reading_plan(number.image) for number in numbers]
    batched = read_plans(plans, classify, read_lines)
    answers = classify_plans(plans, classify)
    assert any(plan.needs_line(rows) for plan, rows in zip(plans, answers, strict=True))
    for number, marks in zip(numbers, batched, strict=True):
        alone = read_marks(number.image, classify, read_lines)
        assert [mark.box for mark in marks] == [mark.box for mark in alone]
        for one, other in zip(marks, alone, strict=True):
            np.testing.assert_allclose(one.probabilities, other.probabilities, atol=1e-5)


@pytest.mark.parametrize("length", [2, 4, 6])
def test_separate_digits_round_trip_through_read_marks(test_digits, length):
    for seed in range(8):
        number = draw(test_digits, length, seed, touching=0.0, overlapping=0.0)
        marks = read_marks(number.image, oracle_classifier(number), oracle_line_reader(number))
        read = describe_reading(number, marks)
        assert read.exact and read.segmented, (seed, number.text, read)


@pytest.mark.parametrize("length", [2, 4, 6])
def test_touching_digits_read_by_a_perfect_line_reader_mostly_get_a_box_each(test_digits, length):
    """Where digits touch, the cut between two is where the least ink crosses just before the
    second begins, bending around strokes: most touching pairs end in separate boxes."""
    apart = []
    for seed in range(10):
        number = draw(test_digits, length, seed, touching=0.8, overlapping=0.0)
        plan = reading_plan(number.image)
        line = plan.line_plan(oracle_classifier(number)(plan.inputs))
        marks = line.marks(oracle_line_reader(number)(line.input))
        read = describe_reading(number, marks)
        assert read.text == number.text, (seed, number.text, read)
        apart += [read.pair_split(i) for i, join in enumerate(read.joins) if join == "touching"]
    assert np.mean(apart) >= 0.6, apart


def test_number_read_exactly_only_when_every_mark_is_the_right_digit():
    assert reading("42", "42", [0, 1]).exact
    assert not reading("42", "4?", [0, 1]).exact  # a mark refused as not a digit
    assert not reading("42", "4", [None]).exact  # both digits in one mark
    assert not reading("42", "427", [0, 1, None]).exact


def test_number_scores_pool_five_digits_and_more():
    readings = [
        reading("12", "12", [0, 1]),
        reading("12", "17", [0, 1]),
        reading("12345", "12345", range(5)),
        reading("123456", "12?456", range(6)),
    ]
    assert number_scores(readings) == {
        "accuracy": 0.5,
        "length_2": 0.5,
        "length_5_plus": 0.5,
    }


def test_segmentation_scores_count_numbers_and_pairs_by_how_they_meet():
    readings = [
        reading("12", "17", [0, 1], joins=["touching"]),  # split right, misread
        reading("123", "?3", [None, 2], joins=["touching", "gap"], joined=[0]),
        reading("45", "4", [None], joins=["overlapping"], joined=[0]),
    ]
    scores = segmentation_scores(readings, "model")
    assert scores["model"] == pytest.approx(1 / 3, abs=1e-4)
    assert scores["model_touching_pairs"] == 0.5
    assert scores["model_gap_pairs"] == 1.0
    assert scores["model_overlapping_pairs"] == 0.0


def test_evaluate_numbers_reports_every_length_and_draws_examples(test_digits):
    images, labels = test_digits
    settings = EvaluateSettings.from_params(SETTINGS)
    numbers, segmentation, grid = evaluate_numbers(
        fixed_classifier(), fixed_line_reader(), images, labels, settings
    )
    assert set(numbers) == {"accuracy", "length_2", "length_5_plus"}
    assert all(0.0 <= value <= 1.0 for value in numbers.values())
    assert {"model", "model_length_2", "model_gap_pairs"} <= set(segmentation)
    assert grid.size == (CANVAS[0], 2 * (CANVAS[1] // 2 + 18))  # 4 examples, 2 per row


def test_numbers_drawn_with_pens_are_the_same_numbers_in_even_strokes(test_digits):
    images, labels = test_digits
    settings = EvaluateSettings.from_params(SETTINGS)
    scanned = list(draw_numbers(images, labels, 3, settings))
    penned = list(draw_numbers(images, labels, 3, settings, pens=True))
    assert [n.text for n in penned] == [n.text for n in scanned]
    assert [n.joins for n in penned] == [n.joins for n in scanned]
    assert all(
        not np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(scanned, penned, strict=True)
    )


def test_numbers_grid_colours_right_green_and_wrong_red(test_digits):
    number = draw(test_digits, 2, 0, touching=0.0, overlapping=0.0)
    right = read_marks(number.image, oracle_classifier(number), oracle_line_reader(number))
    surely_not = lambda inputs: np.eye(CLASSES)[[NOT_A_DIGIT] * len(inputs)]  # noqa: E731
    wrong = read_marks(number.image, surely_not, no_line_reader)
    for marks, colour in ((right, (0, 140, 0)), (wrong, (200, 0, 0))):
        pixels = np.asarray(numbers_grid([(number, marks)]).convert("RGB")).reshape(-1, 3)
        assert (pixels == colour).all(axis=1).any()


def test_letters_refused_draws_the_training_characters_in_unseen_fonts_and_counts_refusals():
    letters = letter_settings(fonts=("futural",), characters="ER", drawings=100)
    settings = EvaluateSettings.from_params(SETTINGS)
    seen = []

    def refuse_the_first_half(inputs: np.ndarray) -> np.ndarray:
        seen.append(inputs)
        answers = np.full(len(inputs), 3)
        answers[: len(inputs) // 2] = NOT_A_DIGIT
        return np.eye(CLASSES)[answers]

    shares = letters_refused(refuse_the_first_half, letters, (1.7, 3.3), settings)
    assert seen[0].shape == (12, 28, 28) and 0.99 < seen[0].max() <= 1.0
    # glyphs in turn, cursive E and R then futuram E and R: the first six drawings are four
    # cursive ones and two futuram ones
    assert shares == {"refused": 0.5, "cursive": 0.6667, "futuram": 0.3333}


def test_settings_reject_single_digit_numbers():
    with pytest.raises(ValueError, match="number_lengths"):
        EvaluateSettings.from_params({**SETTINGS, "number_lengths": [1, 2]})
    with pytest.raises(ValueError, match="lacks number_seed"):
        EvaluateSettings.from_params({k: v for k, v in SETTINGS.items() if k != "number_seed"})


def test_non_digits_drawn_on_the_pad_are_counted_refused_as_predict_and_read_answer(test_digits):
    images, _ = test_digits
    settings = EvaluateSettings.from_params(SETTINGS)

    def answering(label: int) -> Classifier:
        return lambda inputs: np.eye(CLASSES, dtype=np.float32)[[label] * len(inputs)]

    refused_all = drawn_not_digits_refused(
        answering(NOT_A_DIGIT), no_line_reader, images[:5], settings
    )
    assert refused_all == {"predict": 1.0, "read": 1.0}
    assert drawn_not_digits_refused(answering(3), no_line_reader, images[:5], settings) == {
        "predict": 0.0,
        "read": 0.0,
    }
