"""Reading a drawing mark by mark: multi-stroke digits stay one mark, numbers are read left to
right, touching digits are split only into digits the model is sure of, and /predict's reading
refuses several digits and non-digits instead of guessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.preprocessing import (
    CLASSES,
    NOT_A_DIGIT,
    SEVERAL_DIGITS,
    ImageError,
    NoDigitError,
    image_to_input,
    ink_map,
)
from pipelines.segmentation import (
    MAX_INPUTS,
    NO_ANSWERS,
    NotADigitError,
    SeveralDigitsError,
    _cut_paths,
    _split_candidates,
    plan_reading,
    plan_single,
    read_marks,
    read_single,
    working_scale,
)


def pad_with(*strokes: list[tuple[int, int]], size: tuple[int, int] = (840, 280)) -> Image.Image:
    """A transparent canvas like the page's, with each stroke drawn as a thick polyline."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=(20, 20, 20, 255), width=16, joint="curve")
    return image


FOUR = ([(100, 60), (70, 170), (160, 170)], [(140, 90), (140, 240)])  # two strokes
FIVE = ([(140, 60), (90, 60)], [(95, 65), (90, 130), (150, 150), (140, 220), (80, 225)])
SEVEN = ([(80, 60), (170, 60), (110, 230)], [(90, 150), (150, 150)])  # crossed
ONE = ([(400, 60), (400, 230)],)


def probabilities_for(plan_inputs: np.ndarray, answers: list[int], sure: float = 0.97):
    """Model answers, one class per input: `sure` on it, the rest spread evenly."""
    rows = np.full((len(plan_inputs), CLASSES), (1 - sure) / (CLASSES - 1))
    rows[np.arange(len(answers)), answers] = sure
    return rows


@pytest.mark.parametrize("digit", [FOUR, FIVE, SEVEN], ids=["four", "five", "crossed-seven"])
def test_a_digit_written_in_several_strokes_is_one_mark(digit):
    image = pad_with(*digit)
    single = plan_single(ink_map(image), working_scale(image), image.size)
    assert len(single.inputs) == 1  # nothing to refuse as several digits
    reading = plan_reading(ink_map(image), working_scale(image), image.size)
    assert len(reading.inputs) == 1
    np.testing.assert_array_equal(reading.inputs[0], image_to_input(image))  # same as /predict


def test_separate_digits_are_read_left_to_right_with_boxes_in_the_sent_pixels():
    one_then_four = pad_with(*ONE, *(_moved(stroke, 500) for stroke in FOUR))
    plan = plan_reading(ink_map(one_then_four), working_scale(one_then_four), (840, 280))
    split = plan.splits(probabilities_for(plan.inputs, [1, 4]))
    assert len(split.inputs) == 0  # two sure digits: one model call
    marks = split.marks(NO_ANSWERS)
    assert [mark.digit for mark in marks] == [1, 4]
    first, second = (mark.box for mark in marks)
    assert 380 <= first.x <= 400 <= first.x + first.width <= 420  # the 1 at x=400, 16 px wide
    assert second.x >= 560 and second.x + second.width <= 670  # the 4 spans x=570..660
    assert 50 <= second.y <= 82 and second.y + second.height >= 230


def test_predict_refuses_several_sure_digits_but_reads_one_beside_a_doubtful_mark():
    two_marks = pad_with(*ONE, *(_moved(stroke, 500) for stroke in FOUR))
    plan = plan_single(ink_map(two_marks), working_scale(two_marks), (840, 280))
    assert len(plan.inputs) == 3  # the whole drawing, then each mark
    with pytest.raises(SeveralDigitsError) as refused:
        plan.digit(probabilities_for(plan.inputs, [4, 1, 4]))
    assert refused.value.reason == "several_digits" and "/read" in str(refused.value)
    # One sure digit and a mark the model doubts: the whole drawing's answer stands.
    answers = probabilities_for(plan.inputs, [4, 1, 4])
    answers[1] = probabilities_for(plan.inputs[:1], [1], sure=0.4)[0]
    assert plan.digit(answers).digit == 4


def test_predict_reads_a_digit_beside_a_short_stroke_as_that_digit_not_as_several():
    # A 7 whose pen skipped: a short stroke beside it, a quarter of its height, that the model
    # reads on its own as a sure 1. The digits of a number are about as tall as each other.
    tick = [(230, 120), (232, 160)]
    image = pad_with(SEVEN[0], tick)
    plan = plan_single(ink_map(image), working_scale(image), image.size)
    assert len(plan.inputs) == 3  # the whole drawing, then the 7 and the tick
    assert plan.digit(probabilities_for(plan.inputs, [7, 7, 1])).digit == 7
    # The same stroke drawn as tall as the 7 is a second digit: "71" is refused.
    image = pad_with(SEVEN[0], [(230, 60), (232, 230)])
    plan = plan_single(ink_map(image), working_scale(image), image.size)
    with pytest.raises(SeveralDigitsError):
        plan.digit(probabilities_for(plan.inputs, [7, 7, 1]))


def test_a_drawing_the_model_calls_not_a_digit_is_refused_by_predict():
    image = pad_with(*SEVEN)
    plan = plan_single(ink_map(image), working_scale(image), image.size)
    with pytest.raises(NotADigitError) as refused:
        plan.digit(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    assert refused.value.reason == "not_a_digit"


def test_touching_digits_are_split_where_the_model_reads_sure_digits():
    bars = [[(x, 60), (x, 230)] for x in (100, 180, 260, 340)]
    touching = pad_with(*bars, [(100, 140), (340, 140)])  # four 1s joined by a stroke
    plan = plan_reading(ink_map(touching), working_scale(touching), (840, 280))
    assert len(plan.inputs) == 1  # one mark, read whole first
    # The model: the whole is not a digit, every narrower piece is a sure 1.
    split = plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    assert len(split.inputs) > 1  # a mark wider than tall: pieces were tried
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs)))
    assert len(marks) >= 2 and all(mark.digit == 1 for mark in marks)
    boxes = [mark.box for mark in marks]
    assert all(a.x + a.width <= b.x for a, b in zip(boxes, boxes[1:], strict=False))
    # The same mark, which the model reads as one sure digit, stays whole.
    split = plan.splits(probabilities_for(plan.inputs, [7]))
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs)))
    assert [mark.digit for mark in marks] == [7]


def test_a_mark_about_as_wide_as_a_digit_is_split_only_when_the_model_doubts_it():
    pair = pad_with(*ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)])  # "11", joined
    plan = plan_reading(ink_map(pair), working_scale(pair), (840, 280))
    assert len(plan.splits(probabilities_for(plan.inputs, [0])).inputs) == 0  # a sure 0
    surely_not = probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.999)  # an M, say
    assert len(plan.splits(surely_not).inputs) == 0
    assert len(plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.95)).inputs) == 0
    split = plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.6))  # doubted
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs)))
    assert [mark.digit for mark in marks] == [1, 1]


def test_a_mark_the_model_reads_as_several_digits_is_split_even_when_it_is_surely_so():
    pair = pad_with(*ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)])  # "11", joined
    plan = plan_reading(ink_map(pair), working_scale(pair), (840, 280))
    several = probabilities_for(plan.inputs, [SEVERAL_DIGITS], sure=0.999)
    split = plan.splits(several)
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs)))
    assert [mark.digit for mark in marks] == [1, 1]
    # No piece is a digit: the mark stays whole, and is no digit.
    (whole,) = split.marks(probabilities_for(split.inputs, [NOT_A_DIGIT] * len(split.inputs)))
    assert not whole.is_digit and whole.is_several_digits


def test_a_mark_wider_than_a_digit_read_as_one_sure_digit_is_split_into_surer_digits():
    apart = pad_with(*ONE, [(640, 60), (640, 230)], [(400, 140), (640, 140)])  # "1-1", joined
    plan = plan_reading(ink_map(apart), working_scale(apart), (840, 280))
    split = plan.splits(probabilities_for(plan.inputs, [4], sure=0.97))
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs), sure=0.99))
    assert [mark.digit for mark in marks] == [1, 1]
    # Far surer of the whole than of its pieces, the model keeps it whole.
    split = plan.splits(probabilities_for(plan.inputs, [4], sure=0.999))
    marks = split.marks(probabilities_for(split.inputs, [1] * len(split.inputs), sure=0.9))
    assert [mark.digit for mark in marks] == [4]


def test_a_mark_read_as_several_digits_is_also_cut_where_equally_wide_digits_meet():
    # Ink that thickens steadily to the right: no dip anywhere says where one digit ends.
    ramp = np.tile(np.linspace(0.2, 1.0, 100, dtype=np.float32), (40, 1))
    candidate = plan_reading(ramp).candidates[0]
    assert _split_candidates(candidate, even=False, most=MAX_INPUTS)[1] == []
    _, intervals, boxes, _ = _split_candidates(candidate, even=True, most=MAX_INPUTS)
    spans = {(box.x, box.x + box.width) for box in boxes}
    assert {(0, 50), (50, 100), (0, 33), (33, 67), (67, 100), (0, 25), (75, 100)} <= spans
    assert _split_candidates(candidate, even=True, most=len(intervals) - 1) is None


def test_a_mark_wider_than_a_digit_is_cut_where_equally_wide_digits_meet_whatever_its_reading():
    # Digits written so close that each overlaps the next: one wide mark the model reads as no
    # digit at all, and no dip in its ink says where one digit ends.
    ramp = np.tile(np.linspace(0.2, 1.0, 100, dtype=np.float32), (40, 1))
    plan = plan_reading(ramp)
    split = plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    spans = {(box.x, box.x + box.width) for box in split.boxes}
    assert {(0, 50), (50, 100), (0, 25), (75, 100)} <= spans
    # A mark about as wide as a digit read as no digit (a letter) is not cut into equal parts.
    narrow = np.tile(np.linspace(0.2, 1.0, 40, dtype=np.float32), (40, 1))
    plan = plan_reading(narrow)
    assert not plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.8)).boxes


def test_predict_refuses_one_mark_of_touching_digits_as_several_digits():
    pair = pad_with(*ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)])
    plan = plan_single(ink_map(pair), working_scale(pair), (840, 280))
    assert len(plan.inputs) == 1  # one mark
    with pytest.raises(SeveralDigitsError) as refused:
        plan.digit(probabilities_for(plan.inputs, [SEVERAL_DIGITS]))
    assert "several touching digits" in str(refused.value) and "/read" in str(refused.value)


def test_a_cut_bends_between_slanted_digits_that_no_straight_cut_separates():
    image = Image.new("L", (200, 200))
    draw = ImageDraw.Draw(image)
    draw.line([(20, 190), (90, 10)], fill=255, width=12)  # two slanted 1s, /  /
    draw.line([(90, 190), (160, 10)], fill=255, width=12)
    draw.line([(55, 100), (125, 100)], fill=255, width=6)  # joined by a bar
    ink = np.asarray(image, dtype=np.float32) / 255
    (path,) = _cut_paths(ink, [90])
    columns = np.arange(200)
    for row in range(0, 200, 10):
        if abs(row - 100) > 6:  # away from the bar, it crosses no ink
            assert ink[row, path[row]] == 0.0, row
    left = (columns < path[:, np.newaxis]) & (ink > 0)
    assert left[:, :50].sum() > 0 and not left[190:, 100:].any()  # the second 1's foot is right


def test_read_marks_and_read_single_run_the_classifier_once_on_the_plan():
    image = pad_with(*ONE)
    calls = []

    def classify(inputs: np.ndarray) -> np.ndarray:
        calls.append(inputs.shape)
        return probabilities_for(inputs, [1] * len(inputs))

    assert [mark.digit for mark in read_marks(image, classify)] == [1]
    assert read_single(image, classify).digit == 1
    assert calls == [(1, 28, 28), (1, 28, 28)]  # a sure digit: no second pass
    with pytest.raises(NoDigitError):
        read_marks(Image.new("RGBA", (840, 280)), classify)


def _moved(stroke: list[tuple[int, int]], dx: int) -> list[tuple[int, int]]:
    return [(x + dx, y) for x, y in stroke]


def test_a_tiny_mark_beside_a_digit_is_a_speck_not_a_reason_to_refuse_the_drawing():
    ink = np.zeros((40, 100), np.float32)
    ink[5:35, 10:13] = 1.0  # a 1
    ink[30, 60:63] = 1.0  # three pixels: a speck, though 9% of the ink
    plan = plan_reading(ink)
    assert len(plan.inputs) == 1
    assert len(plan_single(ink).inputs) == 1


def test_a_drawing_of_too_many_marks_is_refused_before_any_work():
    image = pad_with(*([(x, 100), (x + 8, 180)] for x in range(20, 820, 30)))  # 27 strokes
    with pytest.raises(ImageError) as refused:
        plan_reading(ink_map(image), working_scale(image), image.size)
    assert refused.value.reason == "too_many_marks"


def test_wide_marks_beyond_the_input_budget_are_read_whole():
    zigzag = [(x, 60 if (x // 20) % 2 else 220) for x in range(0, 250, 20)]
    image = pad_with(*([(x + dx, y) for x, y in zigzag] for dx in (10, 290, 570)))
    plan = plan_reading(ink_map(image), working_scale(image), image.size)
    split = plan.splits(probabilities_for(plan.inputs, [NOT_A_DIGIT] * 3))
    assert len(plan.inputs) == 3 and len(plan.inputs) + len(split.inputs) <= MAX_INPUTS
