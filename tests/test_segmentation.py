"""Reading a drawing mark by mark: multi-stroke digits stay one mark, numbers are read left to
right, touching digits go to the line reader and come back as marks with their own boxes, and
/predict's reading refuses several digits and non-digits instead of guessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.lines import BLANK, LINE_BUCKET, LINE_CLASSES, LINE_HEIGHT, LINE_LEFT, LINE_STRIDE
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
    NotADigitError,
    SeveralDigitsError,
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
    answers = probabilities_for(plan.inputs, [1, 4])
    assert not plan.needs_line(answers)  # two sure digits: one model call
    marks = plan.marks(answers)
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


def line_output(plan, marks: list[tuple[int, int]]) -> np.ndarray:
    """The line reader's answer for a plan's strip: blank, but for (class, ink-map column)
    pairs, each read at the frame that shows that column (class NOT_A_DIGIT: not a digit)."""
    line = plan.line_plan(probabilities_for(plan.inputs, [SEVERAL_DIGITS] * len(plan.inputs)))
    frames = line.input.shape[2] // LINE_STRIDE
    out = np.full((1, frames, LINE_CLASSES), 0.01, np.float32)
    out[0, :, BLANK] = 0.9
    for label, column in marks:
        strip_column = LINE_LEFT + (column - line.line.ink_left) * line.line.scale
        frame = round(strip_column / LINE_STRIDE - 0.5)  # the frame whose middle is nearest
        out[0, frame, BLANK] = 0.01
        out[0, frame, label + 1] = 0.9
    return out / out.sum(axis=2, keepdims=True)


ONES = (100, 180, 260, 340)
FOUR_ONES = tuple([(x, 60), (x, 230)] for x in ONES)


def test_touching_digits_are_read_by_the_line_reader_and_cut_where_the_least_ink_crosses():
    touching = pad_with(*FOUR_ONES, [(100, 140), (340, 140)])  # four 1s joined by a bar
    plan = plan_reading(ink_map(touching), working_scale(touching), (840, 280))
    assert len(plan.inputs) == 1  # one mark, read whole first
    assert plan.needs_line(probabilities_for(plan.inputs, [NOT_A_DIGIT]))  # wider than tall
    line = plan.line_plan(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    assert line.input.shape[:2] == (1, LINE_HEIGHT) and line.input.shape[2] % LINE_BUCKET == 0
    columns = [(x - 8) / plan.scale for x in ONES]  # read where each begins, as the reader does
    marks = line.marks(line_output(plan, [(1, c) for c in columns]))
    assert [mark.digit for mark in marks] == [1, 1, 1, 1]
    boxes = [mark.box for mark in marks]
    assert all(a.x + a.width <= b.x for a, b in zip(boxes, boxes[1:], strict=False))
    assert boxes[0].x <= ONES[0] - 8 and ONES[-1] + 8 <= boxes[-1].x + boxes[-1].width
    assert sum(box.height >= 170 for box in boxes) >= 3  # whole bars (the reader's columns are
    # a frame apart, 31 px here: a cut can miss a 1 that narrow, evaluate measures real ones)
    assert all(mark.input.shape == (28, 28) and mark.input.max() > 0.5 for mark in marks)


def test_what_the_line_reader_reads_as_not_a_digit_is_a_mark_that_is_not_a_digit():
    touching = pad_with(*FOUR_ONES, [(100, 140), (340, 140)])
    plan = plan_reading(ink_map(touching), working_scale(touching), (840, 280))
    columns = [x // plan.scale for x in (100, 180, 260, 340)]
    read = [(1, columns[0]), (NOT_A_DIGIT, columns[1]), (1, columns[2]), (1, columns[3])]
    line = plan.line_plan(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    marks = line.marks(line_output(plan, read))
    assert [mark.is_digit for mark in marks] == [True, False, True, True]
    assert not any(mark.is_several_digits for mark in marks)
    (nothing,) = line.marks(line_output(plan, []))  # ink read as nothing at all
    assert not nothing.is_digit and nothing.box == plan.boxes[0]


def test_when_the_line_reader_reads_one_thing_per_mark_the_cnns_reading_stands():
    one_then_pair = pad_with(  # a 1, then "11" joined (about as wide as a digit)
        [(100, 60), (100, 230)], *ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)]
    )
    plan = plan_reading(ink_map(one_then_pair), working_scale(one_then_pair), (840, 280))
    answers = probabilities_for(plan.inputs, [1, NOT_A_DIGIT])
    answers[1] = probabilities_for(plan.inputs[:1], [NOT_A_DIGIT], sure=0.6)[0]  # doubted
    assert plan.needs_line(answers)
    centres = [(box.x + box.width / 2) / plan.scale for box in plan.boxes]
    line = plan.line_plan(answers)
    marks = line.marks(line_output(plan, [(1, centres[0]), (4, centres[1])]))
    assert [mark.is_digit for mark in marks] == [True, False]  # the CNN's, not "14"
    assert [mark.box for mark in marks] == plan.boxes
    marks = line.marks(line_output(plan, [(1, centres[0]), (1, centres[1] - 15), (7, centres[1])]))
    assert [mark.digit for mark in marks] == [1, 1, 7]  # two in a mark: the reader's reading


def test_a_mark_about_as_wide_as_a_digit_goes_to_the_line_reader_when_it_may_be_several():
    pair = pad_with(*ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)])  # "11", joined
    plan = plan_reading(ink_map(pair), working_scale(pair), (840, 280))
    assert not plan.needs_line(probabilities_for(plan.inputs, [0]))  # a sure 0
    assert not plan.needs_line(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.999))  # an M
    assert plan.needs_line(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.6))  # doubted
    assert not plan.needs_line(probabilities_for(plan.inputs, [3], sure=0.6))  # a digit stays
    assert plan.needs_line(probabilities_for(plan.inputs, [SEVERAL_DIGITS], sure=0.999))


def test_a_narrow_mark_read_as_several_digits_goes_to_the_line_reader():
    pair = pad_with(*ONE, [(440, 60), (440, 230)], [(400, 140), (440, 140)])  # "11", close
    plan = plan_reading(ink_map(pair), working_scale(pair), (840, 280))
    (box,) = plan.boxes
    assert box.width < 0.6 * box.height  # narrower than most single digits
    assert plan.needs_line(probabilities_for(plan.inputs, [SEVERAL_DIGITS]))
    assert not plan.needs_line(probabilities_for(plan.inputs, [NOT_A_DIGIT], sure=0.6))
    assert not plan.needs_line(probabilities_for(plan.inputs, [1], sure=0.6))


def test_predict_refuses_one_mark_of_touching_digits_as_several_digits():
    pair = pad_with(*ONE, [(520, 60), (520, 230)], [(400, 140), (520, 140)])
    plan = plan_single(ink_map(pair), working_scale(pair), (840, 280))
    assert len(plan.inputs) == 1  # one mark
    with pytest.raises(SeveralDigitsError) as refused:
        plan.digit(probabilities_for(plan.inputs, [SEVERAL_DIGITS]))
    assert "several touching digits" in str(refused.value) and "/read" in str(refused.value)


def test_read_marks_and_read_single_run_the_classifier_once_on_the_plan():
    image = pad_with(*ONE)
    calls = []

    def classify(inputs: np.ndarray) -> np.ndarray:
        calls.append(inputs.shape)
        return probabilities_for(inputs, [1] * len(inputs))

    def read_lines(strips: np.ndarray) -> np.ndarray:
        calls.append(strips.shape)
        return np.eye(LINE_CLASSES)[[BLANK] * (strips.shape[2] // LINE_STRIDE)][np.newaxis]

    assert [mark.digit for mark in read_marks(image, classify, read_lines)] == [1]
    assert read_single(image, classify).digit == 1
    assert calls == [(1, 28, 28), (1, 28, 28)]  # a sure digit: no line reader
    calls.clear()
    joined = pad_with(*FOUR_ONES, [(100, 140), (340, 140)])
    (mark,) = read_marks(joined, classify, read_lines)  # which reads nothing there
    assert not mark.is_digit and calls[0] == (1, 28, 28) and calls[1][:2] == (1, LINE_HEIGHT)
    with pytest.raises(NoDigitError):
        read_marks(Image.new("RGBA", (840, 280)), classify, read_lines)


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
