"""Reading a drawing mark by mark: the digits of a number, and the marks that are not digits.

A drawing may also hold a whole number. `plan_reading` splits it into marks, left to right:
strokes whose columns overlap belong to one mark (a 4 or a 5 drawn in two strokes, a crossed 7),
and the CNN reads each mark whole. When every mark is one digit (or not a digit) the CNN is sure
of, that is the reading: a number whose digits stand apart needs one model call, and a single
digit reads exactly as /predict reads it. When some mark may hold touching digits (wider than a
digit, or read as several digits, or doubted), the line reader (`pipelines.lines`) reads the
whole drawing as one strip instead, and each digit it reads becomes a mark of the ink between
the columns where the least ink crosses. `plan_single` is the one-digit reading of /predict,
which refuses several digits and non-digits. All are plans: the caller runs the model on
`plan.inputs` (one batch) and hands the probabilities back, so the service can batch the model
calls and evaluation can run Keras.

This is part of the contract between evaluation and serving (the service's /read and /predict
and the evaluate stage import it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from PIL import Image

from pipelines.lines import LineDigit, LineInput, line_input, read_line
from pipelines.preprocessing import (
    CLASSES,
    INK_THRESHOLD,
    INPUT_SHAPE,
    LABELS,
    MIN_CONTRAST,
    MIN_INK_PIXELS,
    NOT_A_DIGIT,
    SEVERAL_DIGITS,
    ImageError,
    NoDigitError,
    Strokes,
    find_strokes,
    finite_float32,
    ink_map,
    ink_to_input,
    not_one_digit,
    refused,
    shrink_factor,
)

SAME_MARK_OVERLAP = 0.4  # strokes sharing this share of the narrower one's columns: one mark
MARK_MARGIN = 16  # faint ink (soft edges) this near a mark's strokes (ink-map pixels) is its
SPLIT_ASPECT = 1.1  # a mark at least this wide for its height may hold touching digits
DOUBT_ASPECT = 0.6  # a narrower mark when the CNN reads it as several digits (two 1s, a 17),
# and one at least this wide also when it doubts that it is not a digit
SURE_NOT_A_DIGIT = 0.9  # ...which is when it is not a digit less sure than this
CUT_WINDOW = (0.9, 1.15)  # a cut between two digits read at columns a < b lies in a + this
# share of b - a: the line reader reads a digit where it begins (on validation numbers, its
# column was the digit box's left edge, quartiles -0.04 and 0.02 of its width, so a digit ends
# just before the next one's column). Of touching pairs, 95.5% came apart (halfway between
# the two columns: 49.4%), of overlapping ones 59.2% (29.6%), on 120 validation numbers.
CUT_BAND = 0.4  # a cut between two digits may bend this far (share of the ink's height) from
# its column
CUT_DRIFT = 0.02  # cost per pixel it bends away, against a pixel of ink crossed: cuts stay
# straight through blank paper and bend to pass between touching digits
MAX_MARKS = 24  # a drawing with more marks is refused: no number is that long, and each costs
# a model input
# Why a line reader: cutting the marks of touching digits where the least ink crosses, and
# classifying every piece between two cuts with the CNN, read 83.0% of 500 numbers of MNIST
# validation digits exactly (evaluate's number settings, another seed), and with a perfect
# classifier its cuts read only 58% of overlapping pairs. The line reader, trained on such
# lines (pipelines.train_lines), reads them whole: see the README's figures.
SEVERAL_DIGITS_CONFIDENCE = 0.8  # /predict refuses when two marks are digits at least this sure
NUMBER_DIGIT_HEIGHT = 0.6  # and at least this share of the tallest mark's height: the digits of
# a number are about as tall as each other, and a short stroke beside a digit (a 7 or a 9 whose
# pen skipped) is part of it, not a second digit. Of the MNIST validation digits drawn on the
# pad, 14 in 5,000 were refused as several digits for such a stroke read as a sure 1; now
# none (2 at half the tallest height).


class NotADigitError(ImageError):
    """The drawing, or some of its marks, is not a digit (a letter, a symbol, a scribble)."""

    def __init__(self, message: str, marks: list[Mark]) -> None:
        super().__init__(message, reason="not_a_digit")
        self.marks = marks


class SeveralDigitsError(ImageError):
    """/predict was sent a drawing that clearly holds several digits."""

    def __init__(self, marks: list[Mark]) -> None:
        held = f"{len(marks)} digits" if len(marks) > 1 else "several touching digits"
        super().__init__(
            f"the drawing holds {held}; /predict reads one, use /read for numbers",
            reason="several_digits",
        )
        self.marks = marks


@dataclass(frozen=True)
class Box:
    """A rectangle in the pixels of the image as it was sent."""

    x: int
    y: int
    width: int
    height: int

    def scaled(self, factor: int, limit: tuple[int, int]) -> Box:
        """The same box in an image `factor` times larger (clipped to its width, height)."""
        x, y = self.x * factor, self.y * factor
        return Box(
            x, y, min(self.width * factor, limit[0] - x), min(self.height * factor, limit[1] - y)
        )


@dataclass(frozen=True)
class Mark:
    """One thing written: where it is, what the model saw, and what it said."""

    box: Box
    input: np.ndarray  # the (28, 28) model input
    probabilities: np.ndarray  # the model's CLASSES outputs

    @property
    def is_digit(self) -> bool:
        return not _is_not_a_digit(self.probabilities)

    @property
    def digit(self) -> int:
        """The most probable digit (also for a mark that is not a digit)."""
        return int(np.argmax(self.probabilities[: len(LABELS)]))

    @property
    def digit_probabilities(self) -> np.ndarray:
        """The ten digits' probabilities, given that the mark is a digit (they sum to 1)."""
        return digit_probabilities(self.probabilities)

    @property
    def confidence(self) -> float:
        """How sure the model is of its answer: the digit's or, if not one digit, that."""
        if self.is_digit:
            return float(self.digit_probabilities[self.digit])
        return float(not_one_digit(self.probabilities))

    @property
    def is_several_digits(self) -> bool:
        """The model reads the mark as several digits (that the reader did not split)."""
        return _reads_several(self.probabilities)


def _reads_several(probabilities: np.ndarray) -> bool:
    """The model's answer is several digits (in one mark)."""
    return int(np.argmax(probabilities)) == SEVERAL_DIGITS


def _is_not_a_digit(probabilities: np.ndarray) -> bool:
    """No single digit: not a digit, or several."""
    return bool(refused(probabilities))


def digit_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The digits' share of the model's outputs, renormalised: what /predict reports."""
    digits = np.asarray(probabilities, dtype=np.float64)[..., : len(LABELS)]
    return digits / np.clip(digits.sum(axis=-1, keepdims=True), 1e-12, None)


@dataclass(frozen=True)
class _Candidate:
    """One mark: its box and its ink alone, cut to that box."""

    box: Box  # in ink-map pixels
    piece: np.ndarray

    @property
    def wide(self) -> bool:
        """Wider than one digit (SPLIT_ASPECT for its height)."""
        return self.box.width >= SPLIT_ASPECT * self.box.height

    def may_hold_several(self, whole: np.ndarray) -> bool:
        """Wide for one digit, or narrower and the CNN (its answer `whole`) reads it as several
        digits, or doubts that it is not a digit. A mark the CNN reads as a digit, however
        unsure, stays its reading: sending those (below 0.9) to the line reader as well read
        as many of 1,000 validation digits drawn on the pad right (98.7%) and one fewer of 500
        validation numbers. However narrow, a mark read as several digits goes to the reader,
        which reads what the CNN could only refuse: of 100 touching 11s of validation digits,
        84 read right, not 63 (21 were "leave a gap")."""
        if self.wide or _reads_several(whole):
            return True
        if self.box.width < DOUBT_ASPECT * self.box.height:
            return False
        if int(np.argmax(whole)) == NOT_A_DIGIT:
            return float(whole[NOT_A_DIGIT]) < SURE_NOT_A_DIGIT
        return False


@dataclass(frozen=True)
class ReadingPlan:
    """The first pass of /read: each mark whole, by the CNN. `needs_line` says whether its
    answers stand (`marks`), or the line reader must read the drawing (`line_plan`)."""

    inputs: np.ndarray  # (marks, 28, 28)
    candidates: list[_Candidate]
    ink: np.ndarray  # the drawing's ink map, normalised
    scale: int  # ink-map pixels to the sent image's pixels
    image_size: tuple[int, int]

    @property
    def boxes(self) -> list[Box]:
        """Each input's box, in the sent image's pixels."""
        return [c.box.scaled(self.scale, self.image_size) for c in self.candidates]

    def needs_line(self, probabilities: np.ndarray) -> bool:
        """Some mark may hold touching digits, by its shape or the CNN's answer on it."""
        answers = zip(self.candidates, probabilities, strict=True)
        return any(candidate.may_hold_several(whole) for candidate, whole in answers)

    def marks(self, probabilities: np.ndarray) -> list[Mark]:
        """Each mark as the CNN read it whole."""
        return [
            Mark(box, pixels, np.asarray(row, np.float32))
            for box, pixels, row in zip(self.boxes, self.inputs, probabilities, strict=True)
        ]

    def line_plan(self, probabilities: np.ndarray) -> LinePlan:
        """The second pass: the whole drawing as the line reader's strip (`probabilities`: the
        CNN's answers on the marks)."""
        line = line_input(self.ink)
        answers = np.asarray(probabilities, np.float32)
        return LinePlan(line.pixels[np.newaxis, :, : line.width], line, self, answers)


@dataclass(frozen=True)
class LinePlan:
    """The second pass of /read: the line reader reads the whole drawing, left to right.

    Each thing it reads (a digit, or not a digit) becomes a mark: the ink between the cuts to
    its neighbours, each cut made where the least ink crosses just before the next one begins
    (`_least_ink_column`) and bent around strokes (`_cut_paths`); its box that ink's, its input
    that ink as the CNN would see it (what the page shows), its probabilities the line
    reader's. Ink it reads as nothing is one mark that is not a digit.
    """

    input: np.ndarray  # (1, LINE_HEIGHT, width) the strip, cut to the columns that matter
    line: LineInput
    first: ReadingPlan
    answers: np.ndarray  # the CNN's on each mark whole

    def marks(self, probabilities: np.ndarray) -> list[Mark]:
        ink, first = self.first.ink, self.first
        read = read_line(probabilities[0], self.line)
        if self._one_per_mark(read):  # the CNN reads one mark better than the line reader
            return first.marks(self.answers)
        if not read:
            whole = _union([c.box for c in first.candidates])
            nothing = np.eye(CLASSES, dtype=np.float32)[NOT_A_DIGIT]
            return [Mark(whole.scaled(first.scale, first.image_size), first.inputs[0], nothing)]
        profile = _column_ink(ink)
        columns = [_least_ink_column(profile, a.centre, b.centre) for a, b in pairwise(read)]
        paths = _cut_paths(ink, columns) if columns else np.empty((0, ink.shape[0]), np.int64)
        edges = [np.zeros(ink.shape[0], np.int64), *paths, np.full(ink.shape[0], ink.shape[1])]
        across = np.arange(ink.shape[1])
        marks = []
        for digit, left, right in zip(read, edges, edges[1:], strict=False):
            inside = (across >= left[:, np.newaxis]) & (across < right[:, np.newaxis])
            box, pixels = _ink_piece(np.where(inside, ink, 0.0), int(left.min()), int(right.max()))
            row = np.append(digit.probabilities, np.float32(0.0))  # never SEVERAL_DIGITS
            marks.append(Mark(box.scaled(first.scale, first.image_size), pixels, row))
        return marks

    def _one_per_mark(self, read: list[LineDigit]) -> bool:
        """The line reader read one thing in each mark, no more."""
        boxes = [c.box for c in self.first.candidates]
        return len(read) == len(boxes) and all(
            box.x <= thing.centre <= box.x + box.width
            for thing, box in zip(read, boxes, strict=True)
        )


def _column_ink(ink: np.ndarray) -> np.ndarray:
    """The ink crossing each column, smoothed over three columns."""
    columns = np.pad(ink.sum(axis=0), 1, mode="edge")
    return (columns[:-2] + columns[1:-1] + columns[2:]) / 3


def _least_ink_column(profile: np.ndarray, left: float, right: float) -> int:
    """Where two neighbours meet, given the columns the line reader read them at: the column
    where the least ink crosses (of equals, the nearest to the second's) in CUT_WINDOW."""
    gap = right - left
    first = max(0, math.ceil(left + CUT_WINDOW[0] * gap))
    last = min(len(profile) - 1, math.floor(left + CUT_WINDOW[1] * gap))
    if first > last:
        return round(right)
    return int(min(range(first, last + 1), key=lambda c: (profile[c], abs(c - right))))


def _ink_piece(part: np.ndarray, left: int, right: int) -> tuple[Box, np.ndarray]:
    """A digit's ink (the drawing's ink but between its cuts): its box (the columns between the
    cuts, at full height, when it holds no ink) and its 28x28 input (blank then)."""
    solid = part >= INK_THRESHOLD
    if solid.sum() < MIN_INK_PIXELS:
        empty = np.zeros(INPUT_SHAPE[:2], np.float32)
        return Box(left, 0, max(1, right - left), part.shape[0]), empty
    box = _stroke_box(solid)
    return box, ink_to_input(part[box.y : box.y + box.height, box.x : box.x + box.width])


@dataclass(frozen=True)
class SingleDigitPlan:
    """/predict's reading: the whole drawing as one digit, and its marks when there are several
    (to refuse a number, or a digit beside a scribble, instead of guessing one digit)."""

    inputs: np.ndarray  # the whole drawing first, then one input per mark if several
    boxes: list[Box]

    def digit(self, probabilities: np.ndarray) -> Mark:
        """The one digit drawn; raises NotADigitError or SeveralDigitsError."""
        whole = Mark(self.boxes[0], self.inputs[0], np.asarray(probabilities[0], np.float32))
        marks = [
            Mark(box, pixels, np.asarray(row, np.float32))
            for box, pixels, row in zip(
                self.boxes[1:], self.inputs[1:], probabilities[1:], strict=True
            )
        ]
        tallest = max((mark.box.height for mark in marks), default=0)
        sure_digits = [
            mark
            for mark in marks
            if mark.is_digit
            and mark.confidence >= SEVERAL_DIGITS_CONFIDENCE
            and mark.box.height >= NUMBER_DIGIT_HEIGHT * tallest
        ]
        if len(sure_digits) >= 2 or whole.is_several_digits:
            raise SeveralDigitsError(marks or [whole])
        if not whole.is_digit:
            raise NotADigitError("the drawing is not a digit", marks or [whole])
        return whole


def plan_reading(
    ink: np.ndarray, scale: int = 1, image_size: tuple[int, int] | None = None
) -> ReadingPlan:
    """Split an ink map into marks, each read whole first (see ReadingPlan.splits for the rest)."""
    ink = _normalised(ink)
    size = image_size or (ink.shape[1] * scale, ink.shape[0] * scale)
    groups, strokes = _mark_masks(ink)
    candidates = [_Candidate(box, _piece(ink, mask, box)) for mask, box in groups]
    if len(groups) == 1:  # the whole drawing, exactly as /predict sees it
        return ReadingPlan(ink_to_input(ink, strokes)[np.newaxis], candidates, ink, scale, size)
    inputs = np.stack([ink_to_input(candidate.piece) for candidate in candidates])
    return ReadingPlan(inputs, candidates, ink, scale, size)


def plan_single(
    ink: np.ndarray, scale: int = 1, image_size: tuple[int, int] | None = None
) -> SingleDigitPlan:
    """/predict's plan: the whole drawing, plus each mark when there is more than one."""
    ink = _normalised(ink)
    size = image_size or (ink.shape[1] * scale, ink.shape[0] * scale)
    groups, strokes = _mark_masks(ink)
    whole_box = _union([box for _, box in groups])
    inputs = [ink_to_input(ink, strokes)]
    boxes = [whole_box.scaled(scale, size)]
    if len(groups) > 1:
        for mask, box in groups:
            inputs.append(ink_to_input(_piece(ink, mask, box)))
            boxes.append(box.scaled(scale, size))
    return SingleDigitPlan(np.stack(inputs), boxes)


def mark_inputs(ink: np.ndarray) -> list[np.ndarray]:
    """Each mark's 28x28 input, left to right, without splitting touching marks: how a
    labelled number becomes one training example per digit when its digits stand apart."""
    ink = _normalised(ink)
    groups, strokes = _mark_masks(ink)
    if len(groups) == 1:
        return [ink_to_input(ink, strokes)]
    return [ink_to_input(_piece(ink, mask, box)) for mask, box in groups]


Classifier = Callable[[np.ndarray], np.ndarray]  # the CNN: (N, 28, 28) -> (N, CLASSES)
LineReader = Callable[[np.ndarray], np.ndarray]  # (1, LINE_HEIGHT, W) -> (1, W / 4, classes)


def read_marks(image: Image.Image, classify: Classifier, read_lines: LineReader) -> list[Mark]:
    """Every mark of a drawing, left to right: each read whole by `classify`, or, when some
    may hold touching digits, the whole drawing read by `read_lines`."""
    plan = plan_reading(ink_map(image), working_scale(image), image.size)
    answers = classify(plan.inputs)
    if not plan.needs_line(answers):
        return plan.marks(answers)
    line = plan.line_plan(answers)
    return line.marks(read_lines(line.input))


def read_single(image: Image.Image, classify: Classifier) -> Mark:
    """The one digit of a drawing, as /predict reads it (raises NotADigitError,
    SeveralDigitsError or NoDigitError)."""
    plan = plan_single(ink_map(image), working_scale(image), image.size)
    return plan.digit(classify(plan.inputs))


def working_scale(image: Image.Image) -> int:
    """How many sent pixels one ink-map pixel stands for (see _shrink)."""
    return shrink_factor(image.size)


def _normalised(ink: np.ndarray) -> np.ndarray:
    ink = finite_float32(ink)
    contrast = float(ink.max()) if ink.size else 0.0
    if contrast < MIN_CONTRAST:
        raise NoDigitError()
    return ink / contrast


def _mark_masks(ink: np.ndarray) -> tuple[list[tuple[np.ndarray, Box]], Strokes]:
    """The marks of a drawing, left to right: strokes (ignoring specks) grouped by the columns
    they share, each as a mask (its strokes, slightly widened to keep their anti-aliased edges)
    and its bounding box; and the drawing's strokes."""
    strokes = find_strokes(ink)
    labels, count = strokes.labels, strokes.count
    keep = np.flatnonzero(strokes.kept & (strokes.pixels >= MIN_INK_PIXELS))
    if len(keep) == 0:
        raise NoDigitError()
    lefts, rights = _column_spans(labels, count)
    spans = sorted([lefts[k], rights[k], [k]] for k in keep)
    merged: list[list] = []
    for start, stop, members in spans:
        if merged:
            previous = merged[-1]
            overlap = min(stop, previous[1]) - max(start, previous[0])
            narrower = min(stop - start, previous[1] - previous[0])
            if overlap >= SAME_MARK_OVERLAP * narrower:
                previous[1] = max(previous[1], stop)
                previous[2].extend(members)
                continue
        merged.append([start, stop, members])
    if len(merged) > MAX_MARKS:
        raise ImageError(
            f"the drawing holds {len(merged)} separate marks; at most {MAX_MARKS} are read",
            reason="too_many_marks",
        )
    boxes = [_stroke_box(np.isin(labels, members)) for _, _, members in merged]
    if len(merged) == 1:
        return [(np.ones(ink.shape, dtype=bool), boxes[0])], strokes
    owner = np.zeros(count + 1, dtype=np.uint8)  # MAX_MARKS fit
    for number, (_, _, members) in enumerate(merged, start=1):
        owner[members] = number
    claimed = _grow_into_unclaimed(owner[labels], ink > 0, MARK_MARGIN)
    return [(claimed == number, box) for number, box in enumerate(boxes, start=1)], strokes


def _column_spans(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """First column and one past the last of each label (index 0, the background, unused)."""
    columns = np.broadcast_to(np.arange(labels.shape[1]), labels.shape)[labels > 0]
    numbers = labels[labels > 0]
    lefts = np.full(count + 1, labels.shape[1])
    rights = np.zeros(count + 1, dtype=np.int64)
    np.minimum.at(lefts, numbers, columns)
    np.maximum.at(rights, numbers, columns + 1)
    return lefts, rights


def _grow_into_unclaimed(claimed: np.ndarray, inked: np.ndarray, steps: int) -> np.ndarray:
    """Give each unclaimed pixel (0) within `steps` pixels (diagonals count as one) of claimed
    ones to the nearest of them, one ring at a time (where two meet, the higher number), until
    no inked pixel is left unclaimed."""
    for _ in range(steps):
        if not (inked & (claimed == 0)).any():
            break
        claimed = np.where(claimed == 0, _largest_neighbour(claimed), claimed)
    return claimed


def _largest_neighbour(values: np.ndarray) -> np.ndarray:
    """Each pixel's largest value among itself and its eight neighbours (a 3x3 maximum filter,
    as a row pass then a column pass)."""
    rows = values.copy()
    np.maximum(rows[:, 1:], values[:, :-1], out=rows[:, 1:])
    np.maximum(rows[:, :-1], values[:, 1:], out=rows[:, :-1])
    both = rows.copy()
    np.maximum(both[1:], rows[:-1], out=both[1:])
    np.maximum(both[:-1], rows[1:], out=both[:-1])
    return both


def _piece(ink: np.ndarray, mask: np.ndarray, box: Box) -> np.ndarray:
    """One mark's ink alone, cut to its box."""
    return np.where(mask, ink, 0.0)[box.y : box.y + box.height, box.x : box.x + box.width]


def _stroke_box(strokes: np.ndarray) -> Box:
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    return Box(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def _union(boxes: list[Box]) -> Box:
    left, top = min(b.x for b in boxes), min(b.y for b in boxes)
    right = max(b.x + b.width for b in boxes)
    bottom = max(b.y + b.height for b in boxes)
    return Box(left, top, right - left, bottom - top)


def _cut_paths(piece: np.ndarray, columns: list[int]) -> np.ndarray:
    """For each cut column, the cut from the mark's top to its bottom that crosses the least ink
    (a seam: one column per row, moving at most one column a row, at most CUT_BAND of the
    height from its column, each pixel away costing CUT_DRIFT): (cuts, rows) columns. Pixels
    left of a row's cut column belong to the piece on the left."""
    height, width = piece.shape
    band = max(1, round(CUT_BAND * height))
    offsets = np.arange(-band, band + 1)
    cells = np.asarray(columns)[:, np.newaxis] + offsets  # (cuts, 2 * band + 1) columns
    outside = (cells < 1) | (cells > width - 1)
    cost = piece[:, np.clip(cells, 0, width - 1)] + CUT_DRIFT * np.abs(offsets)  # (rows, ...)
    cost[:, outside] = np.inf
    total = cost[0].copy()
    moves = np.empty(cost.shape, dtype=np.int8)  # -1, 0, 1: where each cell's cut came from
    for row in range(1, height):
        left = np.pad(total[:, :-1], ((0, 0), (1, 0)), constant_values=np.inf)
        right = np.pad(total[:, 1:], ((0, 0), (0, 1)), constant_values=np.inf)
        choices = np.stack([left, total, right])
        moves[row] = np.argmin(choices, axis=0) - 1
        total = cost[row] + np.take_along_axis(choices, moves[row][np.newaxis] + 1, 0)[0]
    position = np.argmin(total, axis=1)
    paths = np.empty((len(columns), height), dtype=np.int64)
    chosen = np.arange(len(columns))
    for row in range(height - 1, -1, -1):
        paths[:, row] = cells[chosen, position]
        position = position + moves[row, chosen, position]
    return paths
