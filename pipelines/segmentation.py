"""Reading a drawing mark by mark: the digits of a number, and the marks that are not digits.

A drawing may also hold a whole number. `plan_reading` splits it into marks, left to right:
strokes whose columns overlap belong to one mark (a 4 or a 5 drawn in two strokes, a crossed 7),
and the model reads each mark whole. A mark that may hold touching digits (wider than a digit,
or narrower and either read as several digits or doubted) is then cut where the least ink
crosses (and, when wide or read as several digits, where equally wide digits would meet), by
cuts that bend around strokes, and every piece between two cuts is classified in a second
model call; the most probable split wins, or the whole mark. A number whose digits stand apart
(the common case) needs one call. `plan_single` is the one-digit reading of /predict, which
refuses several digits and non-digits. All are plans: the caller runs the model
on `plan.inputs` (one batch) and hands the probabilities back, so the service can batch the
model calls and evaluation can run Keras.

This is part of the contract between evaluation and serving (the service's /read and /predict
and the evaluate stage import it), but not of training, which sees single marks only: the
splitting can be changed without retraining. How well it splits still rests on the model, whose
answer on a whole mark competes with every split of it (a model that reads two touching digits
as one sure digit keeps them whole), and which tells several digits (split them) from a letter
(refuse it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.preprocessing import (
    CLASSES,
    INK_THRESHOLD,
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
DOUBT_ASPECT = 0.6  # a narrower mark only when the model reads it as several digits, or doubts
# it is one digit or not a digit (two 1s, a 17)
SURE_DIGIT = 0.9  # ...which is when it is a digit less sure than this
SURE_NOT_A_DIGIT = 0.9  # or not a digit, less sure than this (a letter stays whole)
MAX_DIGIT_ASPECT = 1.3  # no piece of a split is wider than this for the mark's height
MIN_PIECE_HEIGHT = 0.6  # nor lower than this share of the mark's height (the digits of a
# number are about as tall as each other; the strokes of an M or a W are not digits)
MIN_PIECE_ASPECT = 0.12  # nor narrower than this (a 1 is narrow, but not a sliver)
MAX_CUTS = 6  # candidate cuts tried per mark where the least ink crosses
EVEN_PARTS = 4  # and, in a wide mark or one read as several, where 2, 3 or 4 equal digits meet
CUT_BAND = 0.4  # a cut may bend this far (share of the mark's height) from its column
CUT_DRIFT = 0.02  # cost per pixel it bends away, against a pixel of ink crossed: cuts stay
# straight through blank paper and bend to pass between touching digits
MAX_MARKS = 24  # a drawing with more marks is refused: no number is that long, and each costs
MAX_INPUTS = 64  # model inputs per reading: a mark whose pieces would pass it, and the marks
# after it, are read whole, not split
SPLIT_PENALTY = 1.0  # log-probability each extra piece costs: a split must be clearly better
SPLIT_MIN_CONFIDENCE = 0.8  # every piece of a chosen split must be a digit at least this sure
# Measured on 500 numbers of MNIST validation digits (evaluate's number settings, another seed)
# and 40 wide scribbles, with the model trained to refuse joined digits: one pass, straight cuts
# of marks 1.1 times wider than tall read 0.690 of the numbers exactly; a second pass for the
# doubted marks from 0.6 (straight cuts) 0.738; cuts bending 0.25 of the height 0.794, 0.4:
# 0.808 (37 of 40 scribbles refused, 38 before). Pieces 0.6 sure, or a penalty of 0.5, moved
# it by at most 3 numbers in 500; dropping a neighbour's bits from pieces, 1. With the model
# trained on canvas and crowded digits: 0.830; pieces 0.6 sure 0.842 but 8.5% of the validation
# alphabets' drawings read as numbers (0.8: 5.0%, 0.9: 3.5% and 0.810). Bent cuts made an M
# three sure 1s, its strokes: pieces at least 0.6 of the mark's height keep it whole (0.820;
# 0.75: 0.778). But the fast preset's model still read the page's M, a mark as wide as a digit
# and surely not one, as "14": such a mark now stays whole unless the model doubts it (0.742
# of the numbers; 4.5% of the validation alphabets read as numbers; doubting below 0.9: 0.724).
# The twelfth class, several digits, then gave those marks of joined digits a name: 0.762 of
# the numbers (0.744 with eleven classes), and /read left 11.5% of the validation alphabets
# drawn on the pad unrefused, as a digit or a number (10.0%). But its served model was 98.4%
# sure the page's M is not a digit, and read it as "14" at 0.99: at 0.9 the M stays whole
# (0.758 of the numbers, 11.2% of the validation alphabets unrefused; 0.95: 0.760).
# Where digits overlap, no dip in the ink shows where they meet, and 99 of the marks of several
# digits had no chain of pieces that held one digit each. Cutting the marks read as several
# digits into equal parts as well: 0.788 of the numbers (halves and thirds: 0.778; into equal
# parts also the marks the model doubts: the same), 12.7% of the validation alphabets
# unrefused; pieces only 0.5 sure in marks read as several digits instead: 0.778 and 14.9%.
# A mark wider than a digit that the model read as one sure digit (a "14" read as 4) never lost
# to its split, which paid SPLIT_PENALTY: read whole, it pays it too, 0.802 (2 x SPLIT_PENALTY:
# 0.798; also from 0.9 as wide as tall: 0.802), the validation alphabets unchanged.
# With the network of 16, 64 and 128 filters (12 epochs): 0.794, and the pad's "2026" written
# with each digit overlapping the next was one mark read as no digit, never cut where the digits
# meet: cutting every wide mark into equal parts too, 0.804 (only those twice as wide as tall:
# 0.794), and /read refused 94.6% of the validation alphabets drawn on the pad (95.3%).
# With the "not a digit" threshold fitted also on validation digits drawn on the pad (more
# lenient): 0.830 of the numbers, 91.8% of the alphabets refused. Splitting a mark the model is
# 90% sure holds several digits, when no split into 80% sure digits exists, into digits only
# 50% sure: 0.846, but 90.4% refused, and such a mark is refused with "leave a gap": not taken.
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


def digit_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """The digits' share of the model's outputs, renormalised: what /predict reports."""
    digits = np.asarray(probabilities, dtype=np.float64)[..., : len(LABELS)]
    return digits / np.clip(digits.sum(axis=-1, keepdims=True), 1e-12, None)


@dataclass(frozen=True)
class _Candidate:
    """One mark as read whole, and what splitting it needs: its ink alone, cut to its box."""

    box: Box  # in ink-map pixels
    piece: np.ndarray

    @property
    def wide(self) -> bool:
        """Wider than one digit (SPLIT_ASPECT for its height)."""
        return self.box.width >= SPLIT_ASPECT * self.box.height

    def may_hold_several(self, whole: np.ndarray) -> bool:
        """Wide for one digit, or narrower and the model (its answer `whole`) reads it as
        several digits or doubts what it is."""
        if self.wide:
            return True
        if self.box.width < DOUBT_ASPECT * self.box.height:
            return False
        if _reads_several(whole):
            return True
        if int(np.argmax(whole)) == NOT_A_DIGIT:
            return float(whole[NOT_A_DIGIT]) < SURE_NOT_A_DIGIT
        return float(digit_probabilities(whole).max()) < SURE_DIGIT


@dataclass(frozen=True)
class _Span:
    """Candidate pieces of one mark: the inputs of every interval between its cuts but the
    whole mark (read in the first pass)."""

    intervals: list[tuple[int, int]]  # index pairs into the mark's cuts
    cuts: int  # how many cuts, the mark's two edges included
    boxes: list[Box]
    first_input: int  # index of the first interval's input in the split plan's inputs
    wide: bool  # wider than one digit (SPLIT_ASPECT): read whole, it pays for a piece too


@dataclass(frozen=True)
class ReadingPlan:
    """The first pass of /read: each mark whole. `splits` turns the model's answers into the
    second pass, which tries to split the marks that may hold touching digits."""

    inputs: np.ndarray  # (marks, 28, 28)
    candidates: list[_Candidate]
    scale: int  # ink-map pixels to the sent image's pixels
    image_size: tuple[int, int]

    @property
    def boxes(self) -> list[Box]:
        """Each input's box, in the sent image's pixels."""
        return [c.box.scaled(self.scale, self.image_size) for c in self.candidates]

    def splits(self, probabilities: np.ndarray) -> SplitPlan:
        """The pieces to classify of every mark that may hold several digits (none when each
        mark is a digit the model is sure of), within MAX_INPUTS inputs in all."""
        inputs: list[np.ndarray] = []
        spans: dict[int, _Span] = {}
        budget = MAX_INPUTS - len(self.inputs)
        answers = zip(self.candidates, probabilities, strict=True)
        for number, (candidate, whole) in enumerate(answers):
            if len(inputs) >= budget or not candidate.may_hold_several(whole):
                continue
            even = candidate.wide or _reads_several(whole)
            split = _split_candidates(candidate, even, budget - len(inputs))
            if split is None:  # more pieces than the budget has left: this and the rest stay whole
                break
            cuts, intervals, boxes, pieces = split
            if intervals:
                spans[number] = _Span(intervals, cuts, boxes, len(inputs), candidate.wide)
                inputs += pieces
        stacked = np.stack(inputs) if inputs else np.empty((0, *self.inputs.shape[1:]), np.float32)
        return SplitPlan(stacked, self, np.asarray(probabilities, dtype=np.float32), spans)


@dataclass(frozen=True)
class SplitPlan:
    """The second pass of /read: candidate pieces of the marks that may hold several digits.

    The chosen split of a mark is the one whose pieces the model finds most probable as digits,
    each extra piece costing SPLIT_PENALTY; every piece must be a digit at least
    SPLIT_MIN_CONFIDENCE sure (a scribble is not three 1s), and the whole mark competes.
    """

    inputs: np.ndarray  # (M, 28, 28), possibly none
    first: ReadingPlan
    whole: np.ndarray  # the first pass's answers, one row per mark
    spans: dict[int, _Span]  # mark number -> its pieces

    @property
    def boxes(self) -> list[Box]:
        """Each input's box, in the sent image's pixels."""
        first = self.first
        return [
            box.scaled(first.scale, first.image_size)
            for span in self.spans.values()
            for box in span.boxes
        ]

    def marks(self, probabilities: np.ndarray) -> list[Mark]:
        first = self.first
        marks = []
        for number, candidate in enumerate(first.candidates):
            whole = Mark(
                candidate.box.scaled(first.scale, first.image_size),
                first.inputs[number],
                self.whole[number],
            )
            span = self.spans.get(number)
            if span is None:
                marks.append(whole)
                continue
            rows = probabilities[span.first_input : span.first_input + len(span.intervals)]
            chosen = _best_split(span, rows, whole.probabilities)
            if chosen is None:
                marks.append(whole)
                continue
            marks += [
                Mark(
                    span.boxes[offset].scaled(first.scale, first.image_size),
                    self.inputs[span.first_input + offset],
                    np.asarray(rows[offset], dtype=np.float32),
                )
                for offset in chosen
            ]
        return marks


def _is_not_a_digit(probabilities: np.ndarray) -> bool:
    """No single digit: not a digit, or several."""
    return bool(refused(probabilities))


def _best_split(span: _Span, probabilities: np.ndarray, whole: np.ndarray) -> list[int] | None:
    """The chosen pieces of a mark, as offsets into its intervals, or None to keep it whole.

    The whole mark competes with every chain of intervals from its first cut to its last whose
    pieces are all digits at least SPLIT_MIN_CONFIDENCE sure (Viterbi over the cuts). A chain
    scores the sum of its pieces' log digit probabilities, minus SPLIT_PENALTY per extra piece;
    the whole mark its log digit probability, minus SPLIT_PENALTY if it is wider than one digit
    (as likely two digits as one: the model, reading it whole, can be sure of one digit of it).
    A mark that is not a digit as a whole is split only into sure digits; otherwise it stays
    whole (and is refused as not a digit).
    """
    last = span.cuts - 1
    offsets = {interval: offset for offset, interval in enumerate(span.intervals)}
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for end in range(1, last + 1):
        for start in range(end):
            offset = offsets.get((start, end))
            if start not in best or offset is None:
                continue
            row = probabilities[offset]
            sure = float(row[: len(LABELS)].max())
            if _is_not_a_digit(row) or sure < SPLIT_MIN_CONFIDENCE:
                continue
            score = best[start][0] + math.log(sure) - (SPLIT_PENALTY if start > 0 else 0.0)
            if end not in best or score > best[end][0]:
                best[end] = (score, [*best[start][1], offset])
    if last not in best:
        return None
    if _is_not_a_digit(whole):
        return best[last][1]
    whole_score = math.log(max(float(whole[: len(LABELS)].max()), 1e-12))
    whole_score -= SPLIT_PENALTY if span.wide else 0.0
    return best[last][1] if best[last][0] > whole_score else None


def _split_candidates(
    candidate: _Candidate, even: bool, most: int
) -> tuple[int, list[tuple[int, int]], list[Box], list[np.ndarray]] | None:
    """Every piece of a mark between two of its cuts (but the whole): (how many cuts, its edges
    included; cut pairs; boxes in ink-map pixels; model inputs), or None past `most` pieces.
    Cuts bend around ink (`_cut_paths`), so a piece can hold the whole of a digit whose
    neighbour leans over it. With `even` (a mark wider than a digit, or read as several digits),
    it is also cut where equally wide digits would meet."""
    piece, box = candidate.piece, candidate.box
    columns = _cut_columns(piece)
    if even:
        columns = sorted(columns + _even_columns(piece.shape, columns))
    if not columns:
        return 0, [], [], []
    height, width = piece.shape
    paths = np.concatenate(
        [np.zeros((1, height), np.int64), _cut_paths(piece, columns), np.full((1, height), width)]
    )
    across = np.arange(width)
    intervals, boxes, inputs = [], [], []
    for start in range(len(paths) - 1):
        for end in range(start + 1, len(paths)):
            if (start, end) == (0, len(paths) - 1):
                continue
            span = float(np.median(paths[end] - paths[start]))
            if not MIN_PIECE_ASPECT <= span / box.height <= MAX_DIGIT_ASPECT:
                continue
            inside = (across >= paths[start][:, None]) & (across < paths[end][:, None])
            part = np.where(inside, piece, 0.0)
            solid = part >= INK_THRESHOLD
            rows = np.flatnonzero(solid.any(axis=1))
            if len(rows) < MIN_PIECE_HEIGHT * height:  # a part of a letter, not a digit
                continue
            try:
                pixels = ink_to_input(part)
            except NoDigitError:  # a sliver of another piece: no reading of it
                continue
            if len(inputs) == most:
                return None
            cols = np.flatnonzero(solid.any(axis=0))
            intervals.append((start, end))
            boxes.append(
                Box(
                    box.x + int(cols[0]),
                    box.y + int(rows[0]),
                    int(cols[-1] - cols[0] + 1),
                    int(rows[-1] - rows[0] + 1),
                )
            )
            inputs.append(pixels)
    return len(paths), intervals, boxes, inputs


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
        return ReadingPlan(ink_to_input(ink, strokes)[np.newaxis], candidates, scale, size)
    inputs = np.stack([ink_to_input(candidate.piece) for candidate in candidates])
    return ReadingPlan(inputs, candidates, scale, size)


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


Classifier = Callable[[np.ndarray], np.ndarray]
NO_ANSWERS = np.empty((0, CLASSES), np.float32)  # a split plan's answers when it has no inputs


def read_marks(image: Image.Image, classify: Classifier) -> list[Mark]:
    """Every mark of a drawing, left to right, read by `classify` ((N,28,28) -> (N,CLASSES)):
    once for the marks, and once more for the pieces of those that may hold several digits."""
    plan = plan_reading(ink_map(image), working_scale(image), image.size)
    split = plan.splits(classify(plan.inputs))
    return split.marks(classify(split.inputs) if len(split.inputs) else NO_ANSWERS)


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


def _cut_columns(piece: np.ndarray) -> list[int]:
    """Up to MAX_CUTS columns where the least ink crosses the mark: where touching digits join."""
    height, width = piece.shape
    columns = np.pad(piece.sum(axis=0), 1, mode="symmetric")
    profile = (columns[:-2] + columns[1:-1] + columns[2:]) / 3  # a 3-column moving average
    margin = _min_piece_width(height)
    inner = np.arange(margin, width - margin)
    if len(inner) == 0:
        return []
    minima = [c for c in inner if profile[c] <= profile[c - 1] and profile[c] <= profile[c + 1]]
    chosen: list[int] = []
    for column in sorted(minima, key=lambda c: profile[c]):
        if all(abs(column - other) >= margin for other in chosen):
            chosen.append(int(column))
        if len(chosen) == MAX_CUTS:
            break
    return sorted(chosen)


def _min_piece_width(height: int) -> int:
    """The narrowest piece of a mark `height` pixels high (MIN_PIECE_ASPECT), in pixels."""
    return max(1, round(MIN_PIECE_ASPECT * height))


def _even_columns(shape: tuple[int, int], taken: list[int]) -> list[int]:
    """Columns that cut a mark into 2 to EVEN_PARTS equally wide parts, but those within the
    minimum piece width of a column `taken` or of each other: where the digits of a mark of
    several meet when they overlap, which no dip in the ink shows."""
    height, width = shape
    margin = _min_piece_width(height)
    chosen = list(taken)
    for parts in range(2, EVEN_PARTS + 1):
        for part in range(1, parts):
            column = round(width * part / parts)
            if margin <= column < width - margin and all(
                abs(column - other) >= margin for other in chosen
            ):
                chosen.append(column)
    return chosen[len(taken) :]


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
