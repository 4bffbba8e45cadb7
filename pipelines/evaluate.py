"""The `evaluate` stage: measure the trained model on the test sets, the only place they are used.

Run with `python -m pipelines.evaluate` (dvc.yaml does). Besides clean test accuracy it measures
what predicts how the product feels, always through the functions the service itself uses
(`pipelines.preprocessing`):

- single digits drawn the way a drawing pad produces them (thick and thin strokes, small, large
  and off-centre digits, dark or transparent backgrounds), read as /predict reads them;
- digits and non-digits redrawn with round pens from thin to a marker's thick stroke (`pens`);
- whole numbers of 2 to 6 MNIST test digits drawn on a wide canvas, neighbours sometimes
  touching or overlapping, read as /read reads them: mark by mark by the CNN, or whole by the
  line reader (`models/line_reader.keras`) where some mark may hold touching digits;
- drawings that are not digits (held-out Omniglot alphabets): how many are refused, and how well
  the probability of no single digit (not a digit, or several) separates them from MNIST test
  digits (AUROC).

`test_accuracy` stays the accuracy of the best of the ten digits on MNIST's test images, as MNIST
is scored and as earlier ten-class models were: a digit refused as "not a digit" counts by its
digits' argmax there, and the refusals are their own metrics (`test_digits_refused`,
`canvas_refused`), so neither hides the other. Everything is written as DVC metrics and plots and
logged to the training run in MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image, ImageDraw

from pipelines import tracking
from pipelines.download import centres_to_inputs, load_prepared
from pipelines.drawing import (
    CANVAS_STYLES,
    RenderedNumber,
    centre_lines,
    redraw_with_pens,
    render_number,
    render_on_canvas,
    with_one_pen,
)
from pipelines.letters import LetterSettings, draw_letters
from pipelines.preprocessing import (
    CLASSES,
    LABELS,
    NOT_A_DIGIT,
    as_batch,
    ink_map,
    not_one_digit,
    refused,
)
from pipelines.segmentation import (
    Classifier,
    LineReader,
    Mark,
    NotADigitError,
    ReadingPlan,
    SeveralDigitsError,
    SingleDigitPlan,
    digit_probabilities,
    plan_reading,
    plan_single,
    working_scale,
)

log = logging.getLogger("evaluate")

NUMBER_CHUNK = 100  # numbers drawn and read at a time: bounds memory (an RGBA canvas is ~1 MB)


@dataclass(frozen=True)
class EvaluateSettings:
    """The `evaluate:` section of params.yaml."""

    batch_size: int
    calibration_bins: int
    misclassified_shown: int
    canvas_samples: int
    canvas_size: int
    canvas_seed: int
    pen_widths: tuple[float, ...]  # round pens digits and non-digits are redrawn with (`pens`)
    number_samples: int  # numbers drawn per length
    number_lengths: tuple[int, ...]
    number_canvas: tuple[int, int]  # width, height in pixels
    number_touching: float  # share of neighbouring digits that touch
    number_overlapping: float  # share pushed a little into their neighbour
    number_seed: int
    number_examples: int  # numbers drawn in reports/numbers_examples.png
    letter_fonts: tuple[str, ...]  # Hershey fonts the training letters were not drawn in
    letter_samples: int
    letter_seed: int

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> EvaluateSettings:
        missing = sorted(set(cls.__dataclass_fields__) - set(section))
        if missing:
            raise ValueError(f"evaluate: section lacks {', '.join(missing)}")
        settings = cls(
            **{
                **section,
                "number_lengths": tuple(int(n) for n in section["number_lengths"]),
                "number_canvas": tuple(int(n) for n in section["number_canvas"]),
                "letter_fonts": tuple(section["letter_fonts"]),
                "pen_widths": tuple(float(width) for width in section["pen_widths"]),
            }
        )
        if min(settings.number_lengths, default=0) < 2 or len(settings.number_canvas) != 2:
            raise ValueError(
                "evaluate: number_lengths must be digits per number, each at least 2, and "
                f"number_canvas [width, height]; got {section}"
            )
        return settings


def letters_refused(
    classify: Classifier,
    letters: LetterSettings,
    stroke_width: tuple[float, float],
    settings: EvaluateSettings,
) -> dict[str, float]:
    """Share of letters and symbols refused when drawn in fonts the training letters never
    used (the same characters and distortions): overall, and per font.

    Synthetic, so a check that the model learnt letters rather than five fonts; the held-out
    Omniglot alphabets (`test_not_digits_refused`) stay the measure of real drawings.
    """
    held_out = dataclasses.replace(
        letters,
        fonts=settings.letter_fonts,
        drawings=settings.letter_samples,
        seed=settings.letter_seed,
    )
    drawn = draw_letters(held_out)
    widths = np.random.default_rng(settings.letter_seed).uniform(*stroke_width, len(drawn))
    names = [f"{letter.font} {letter.character!r}" for letter in drawn]
    images = centres_to_inputs([letter.centre for letter in drawn], widths, names)
    answers = refused(classify(images.astype(np.float32) / 255.0))
    fonts = np.array([letter.font for letter in drawn])
    shares = {"refused": round(float(answers.mean()), 4)}
    for font in settings.letter_fonts:
        shares[font] = round(float(answers[fonts == font].mean()), 4)
    log.info("letters in unseen fonts refused: %s", shares)
    return shares


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, 28, 28) images in [0, 1] -> (N, CLASSES) probabilities: ten digits, not a digit,
    several digits."""
    if len(images) == 0:
        return np.zeros((0, CLASSES), dtype=np.float32)
    probabilities = np.asarray(model.predict(as_batch(images), batch_size=batch_size, verbose=0))
    if probabilities.shape[1] != CLASSES:
        raise ValueError(
            f"the model answers {probabilities.shape[1]} classes; evaluation needs {CLASSES} "
            "(the ten digits, not a digit, several digits)"
        )
    return probabilities


# ---- Digits: MNIST's test images ---------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """counts[actual, predicted]."""
    counts = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def per_class_scores(counts: np.ndarray) -> dict[str, dict[str, float]]:
    true_positives = np.diag(counts).astype(np.float64)
    precision = true_positives / np.maximum(counts.sum(axis=0), 1)
    recall = true_positives / np.maximum(counts.sum(axis=1), 1)
    return {
        str(digit): {"precision": round(float(p), 4), "recall": round(float(r), 4)}
        for digit, p, r in zip(LABELS, precision, recall, strict=True)
    }


def calibration_table(
    probabilities: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability table (confidence vs accuracy per bin)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, error = [], 0.0
    for index in range(bins):
        members = which == index
        if not members.any():
            continue
        mean_confidence = float(confidence[members].mean())
        accuracy = float(correct[members].mean())
        error += members.mean() * abs(accuracy - mean_confidence)
        rows.append(
            {
                "confidence": round(mean_confidence, 4),
                "accuracy": round(accuracy, 4),
                "count": int(members.sum()),
            }
        )
    return float(error), rows


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class) over all the model's classes, as the train stage's val_loss."""
    chosen = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(chosen, 1e-12, 1.0))))


def misclassified_grid(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, shown: int
) -> Image.Image:
    """The most confident mistakes as a labelled grid: 'true 4 -> 9 (0.97)' under each digit."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:shown]
    tile, caption, columns = 112, 16, 6
    rows = max(1, -(-len(worst) // columns))
    grid = Image.new("L", (columns * tile, rows * (tile + caption)), color=255)
    draw = ImageDraw.Draw(grid)
    for position, index in enumerate(worst):
        left, top = (position % columns) * tile, (position // columns) * (tile + caption)
        digit = Image.fromarray(255 - images[index]).resize((tile, tile), Image.Resampling.NEAREST)
        grid.paste(digit, (left, top))
        confidence = probabilities[index, predicted[index]]
        text = f"true {labels[index]} -> {predicted[index]} ({confidence:.2f})"
        draw.text((left + 4, top + tile + 2), text, fill=0)
    return grid


# ---- Not a digit -------------------------------------------------------------------------------


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (the Mann-Whitney U statistic over the product of the counts).

    Ranks are averaged over tied scores, so saturated probabilities (many exact 0s and 1s) are
    handled exactly.
    """
    positives = np.asarray(positives, dtype=np.float64).ravel()
    negatives = np.asarray(negatives, dtype=np.float64).ravel()
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(f"AUROC needs both classes: {len(positives)} positives, {len(negatives)}")
    scores = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Distinct values in increasing order; a group of c tied values holding ranks
    # (r - c + 1) .. r (1-based) gets their mean, r - (c - 1) / 2.
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2.0
    positive_rank_sum = float(mean_ranks[inverse[: len(positives)]].sum())
    u = positive_rank_sum - len(positives) * (len(positives) + 1) / 2.0
    return u / (len(positives) * len(negatives))


# ---- Reading drawings as the service does ------------------------------------------------------


def classify_plans(
    plans: Sequence[ReadingPlan | SingleDigitPlan], classify: Classifier
) -> list[np.ndarray]:
    """Run `classify` once over every plan's inputs (one model call instead of one per drawing)
    and return each plan's rows, for `plan.marks` or `plan.digit`."""
    sizes = [len(plan.inputs) for plan in plans]
    if sum(sizes) == 0:
        return [np.empty((0, CLASSES), np.float32) for _ in plans]
    probabilities = classify(np.concatenate([plan.inputs for plan in plans]))
    return np.split(np.asarray(probabilities), np.cumsum(sizes)[:-1])


def reading_plan(image: Image.Image) -> ReadingPlan:
    """`read_marks`' first plan of a drawing (see read_plans for the rest)."""
    return plan_reading(ink_map(image), working_scale(image), image.size)


def canvas_robustness(
    classify: Classifier, images: np.ndarray, labels: np.ndarray, settings: EvaluateSettings
) -> tuple[dict[str, float], dict[str, float]]:
    """Accuracy and refusals per canvas style on a fixed sample of test digits, read as /predict
    reads them (`read_single`, run here as its plan and its decision around one model call).

    Accuracy is the best of the ten digits on the whole drawing, as test_accuracy; refused is
    the share /predict would answer with not_a_digit or several_digits.
    """
    rng = np.random.default_rng(settings.canvas_seed)
    sample = rng.choice(len(images), size=min(settings.canvas_samples, len(images)), replace=False)
    accuracy, refusals = {}, {}
    for name, style in CANVAS_STYLES.items():
        drawings = [render_on_canvas(images[i], style, settings.canvas_size, rng) for i in sample]
        plans = [plan_single(ink_map(d), working_scale(d), d.size) for d in drawings]
        answers = classify_plans(plans, classify)
        whole = np.stack([rows[0, : len(LABELS)] for rows in answers])
        accuracy[name] = round(float((whole.argmax(axis=1) == labels[sample]).mean()), 4)
        refused_here = [_refuses(plan, rows) for plan, rows in zip(plans, answers, strict=True)]
        refusals[name] = round(float(np.mean(refused_here)), 4)
        log.info("canvas %-12s accuracy %.4f refused %.4f", name, accuracy[name], refusals[name])
    accuracy["mean"] = round(float(np.mean(list(accuracy.values()))), 4)
    refusals["mean"] = round(float(np.mean(list(refusals.values()))), 4)
    return accuracy, refusals


def pen_robustness(
    classify: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    not_digits: np.ndarray,
    settings: EvaluateSettings,
) -> dict[str, dict[str, float]]:
    """Per pen width (pixels of the 20-pixel box): a fixed sample of test digits and the
    held-out non-digits redrawn along their centre line with that round pen, as a marker or a
    drawing program's brush draws, and read as one mark. MNIST's own strokes are 2.2 to 3.3
    pixels wide (quartiles), 4.3 at the 90th percentile.

    For digits: accuracy (best of the ten digits) and the share refused; for non-digits, the
    share refused. A model that learns a pen's look instead of a shape refuses thick digits.
    """
    rng = np.random.default_rng(settings.canvas_seed)
    sample = rng.choice(len(images), size=min(settings.canvas_samples, len(images)), replace=False)
    digit_lines, other_lines = centre_lines(images[sample]), centre_lines(not_digits)
    scores = {}
    for width in settings.pen_widths:
        digits = classify(redraw_with_pens(digit_lines, np.full(len(sample), width)))
        others = classify(redraw_with_pens(other_lines, np.full(len(not_digits), width)))
        scores[f"{width:g}"] = {
            "accuracy": round(
                float((digits[:, : len(LABELS)].argmax(axis=1) == labels[sample]).mean()), 4
            ),
            "digits_refused": round(float(refused(digits).mean()), 4),
            "not_digits_refused": round(float(refused(others).mean()), 4),
        }
        log.info("pen %.1f: %s", width, scores[f"{width:g}"])
    return scores


def drawn_not_digits_refused(
    classify: Classifier, read_lines: LineReader, images: np.ndarray, settings: EvaluateSettings
) -> dict[str, float]:
    """Share of non-digit drawings (28x28 uint8, light ink on black) refused when drawn on the
    pad and read as the service reads them: by /predict (not a digit, or several digits) and
    by /read (some mark not a digit; read as digits, it is read as a number)."""
    rng = np.random.default_rng(settings.canvas_seed)
    style = CANVAS_STYLES["centred"]
    drawings = [render_on_canvas(image, style, settings.canvas_size, rng) for image in images]
    singles = [plan_single(ink_map(d), working_scale(d), d.size) for d in drawings]
    by_predict = [
        _refuses(plan, rows)
        for plan, rows in zip(singles, classify_plans(singles, classify), strict=True)
    ]
    readings = read_plans([reading_plan(d) for d in drawings], classify, read_lines)
    by_read = [not all(mark.is_digit for mark in marks) for marks in readings]
    shares = {"predict": _share(by_predict), "read": _share(by_read)}
    log.info("held-out non-digits drawn on the pad, refused: %s", shares)
    return shares


def _refuses(plan: SingleDigitPlan, probabilities: np.ndarray) -> bool:
    try:
        plan.digit(probabilities)
    except (NotADigitError, SeveralDigitsError):
        return True
    return False


# ---- Numbers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberReading:
    """How one drawn number was read: the text (a mark that is not a digit reads '?'), which
    rendered digit each mark holds (None for part of one, or several), and which neighbouring
    digits ended up in one mark."""

    truth: str
    joins: tuple[str, ...]
    text: str
    found: tuple[int | None, ...]  # per mark, its digit's position in the number
    joined: frozenset[int]  # i when one mark holds a real part of digits i and i + 1

    @property
    def exact(self) -> bool:
        """Read exactly: every mark a digit, and the digits the number drawn."""
        return self.text == self.truth

    @property
    def segmented(self) -> bool:
        """Split into exactly the digits drawn, in order, whatever each was read as."""
        return self.found == tuple(range(len(self.truth)))

    def pair_split(self, index: int) -> bool:
        """Whether digits `index` and `index + 1` were split apart: no mark holds a real part of
        both (RenderedNumber.present_in)."""
        return index not in self.joined


def describe_reading(number: RenderedNumber, marks: Sequence[Mark]) -> NumberReading:
    text = "".join(str(mark.digit) if mark.is_digit else "?" for mark in marks)
    found = tuple(number.digit_in(mark.box) for mark in marks)
    joined = set()
    for mark in marks:
        present = number.present_in(mark.box)
        joined.update(np.flatnonzero(present[:-1] & present[1:]).tolist())
    return NumberReading(number.text, number.joins, text, found, frozenset(joined))


def draw_numbers(
    images: np.ndarray,
    labels: np.ndarray,
    length: int,
    settings: EvaluateSettings,
    pens: bool = False,
) -> Iterator[RenderedNumber]:
    """`number_samples` numbers of `length` test digits, the same ones for the same settings.
    With `pens`, each number's digits are redrawn with one round pen of a width drawn between
    the `pen_widths`, as the pad's brush draws (`pipelines.drawing.with_one_pen`)."""
    rng = np.random.default_rng([settings.number_seed, length])
    pen_rng = np.random.default_rng([settings.number_seed, length, 1])  # leaves `rng` as it was
    widths = (min(settings.pen_widths), max(settings.pen_widths))
    for _ in range(settings.number_samples):
        chosen = rng.choice(len(images), size=length, replace=False)
        pen = pen_rng.uniform(*widths)
        digits = with_one_pen(images[chosen], pen) if pens else images[chosen]
        yield render_number(
            digits,
            labels[chosen],
            settings.number_canvas,
            settings.number_touching,
            settings.number_overlapping,
            rng,
        )


def read_numbers(
    numbers: Iterable[RenderedNumber], classify: Classifier, read_lines: LineReader
) -> Iterator[tuple[RenderedNumber, list[Mark]]]:
    """Each number with its marks as read_marks reads them, by chunks of NUMBER_CHUNK."""
    numbers = iter(numbers)
    while chunk := list(itertools.islice(numbers, NUMBER_CHUNK)):
        plans = [reading_plan(drawn.image) for drawn in chunk]
        yield from zip(chunk, read_plans(plans, classify, read_lines), strict=True)


def read_plans(
    plans: Sequence[ReadingPlan], classify: Classifier, read_lines: LineReader
) -> list[list[Mark]]:
    """The marks of each plan as read_marks reads them: one CNN call for every plan's marks,
    then one line reader call per strip width for the drawings that need it."""
    answers = classify_plans(plans, classify)
    lines = {
        index: plan.line_plan(rows)
        for index, (plan, rows) in enumerate(zip(plans, answers, strict=True))
        if plan.needs_line(rows)
    }
    read: dict[int, np.ndarray] = {}
    by_width = sorted(lines, key=lambda index: lines[index].input.shape[2])
    for _, group in itertools.groupby(by_width, key=lambda index: lines[index].input.shape[2]):
        group = list(group)
        outputs = read_lines(np.concatenate([lines[index].input for index in group]))
        read.update(zip(group, np.split(np.asarray(outputs), len(group)), strict=True))
    return [
        lines[index].marks(read[index]) if index in lines else plan.marks(rows)
        for index, (plan, rows) in enumerate(zip(plans, answers, strict=True))
    ]


def number_scores(readings: Sequence[NumberReading]) -> dict[str, float]:
    """Exact whole-number accuracy, overall and per length (5 digits and more pooled)."""
    scores = {"accuracy": _share(r.exact for r in readings)}
    for name, chosen in _by_length(readings).items():
        scores[name] = _share(r.exact for r in chosen)
    return scores


def segmentation_scores(readings: Sequence[NumberReading], prefix: str) -> dict[str, float]:
    """Share of numbers split into exactly their digits, overall and per length, and of
    neighbouring pairs split apart, per way they meet (gap, touching, overlapping)."""
    scores = {prefix: _share(r.segmented for r in readings)}
    for name, chosen in _by_length(readings).items():
        scores[f"{prefix}_{name}"] = _share(r.segmented for r in chosen)
    for join in ("gap", "touching", "overlapping"):
        pairs = [r.pair_split(i) for r in readings for i, j in enumerate(r.joins) if j == join]
        if pairs:
            scores[f"{prefix}_{join}_pairs"] = _share(pairs)
    return scores


def _by_length(readings: Sequence[NumberReading]) -> dict[str, list[NumberReading]]:
    groups: dict[str, list[NumberReading]] = {}
    for reading in readings:
        length = len(reading.truth)
        groups.setdefault("length_5_plus" if length >= 5 else f"length_{length}", []).append(
            reading
        )
    return dict(sorted(groups.items()))


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return round(float(np.mean(flags)), 4) if flags else 0.0


def numbers_grid(
    examples: Sequence[tuple[RenderedNumber, list[Mark]]], columns: int = 2
) -> Image.Image:
    """Read numbers at half size, each mark's box drawn with what it was read as, and the text
    read under the drawing: green when the whole number was read exactly, red otherwise."""
    if not examples:
        return Image.new("RGB", (1, 1), "white")
    width, height = examples[0][0].image.size
    tile_width, tile_height, caption = width // 2, height // 2, 18
    rows = -(-len(examples) // columns)
    grid = Image.new("RGB", (columns * tile_width, rows * (tile_height + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for position, (number, marks) in enumerate(examples):
        left = (position % columns) * tile_width
        top = (position // columns) * (tile_height + caption)
        reading = describe_reading(number, marks)
        colour = (0, 140, 0) if reading.exact else (200, 0, 0)
        tile = Image.fromarray(255 - _ink(number.image)).resize((tile_width, tile_height))
        grid.paste(tile.convert("RGB"), (left, top))
        for mark, read in zip(marks, reading.text, strict=True):
            box = mark.box
            corners = [left + box.x // 2, top + box.y // 2]
            corners += [corners[0] + box.width // 2, corners[1] + box.height // 2]
            draw.rectangle(corners, outline=colour, width=2)
            draw.text((corners[0] + 2, max(top, corners[1] - 12)), read, fill=colour)
        text = f"read {reading.text}  drawn {reading.truth}  ({'-'.join(reading.joins)})"
        draw.text((left + 4, top + tile_height + 3), text, fill=colour)
        draw.rectangle(
            [left, top, left + tile_width - 1, top + tile_height - 1], outline=(200,) * 3
        )
    return grid


def _ink(image: Image.Image) -> np.ndarray:
    """A drawn number's ink as uint8 (255 = full ink), whatever background it was drawn on."""
    if image.mode == "RGBA":
        return np.asarray(image.getchannel("A"))
    return 255 - np.asarray(image.convert("L"))


def evaluate_numbers(
    classify: Classifier,
    read_lines: LineReader,
    images: np.ndarray,
    labels: np.ndarray,
    settings: EvaluateSettings,
) -> tuple[dict[str, float], dict[str, float], Image.Image]:
    """Number scores, segmentation scores (where the boxes fall) and the examples grid."""
    model_readings: list[NumberReading] = []
    wanted = max(1, settings.number_examples // max(1, len(settings.number_lengths)))
    examples: list[tuple[RenderedNumber, list[Mark]]] = []
    for length in settings.number_lengths:
        right: list[tuple[RenderedNumber, list[Mark]]] = []
        wrong: list[tuple[RenderedNumber, list[Mark]]] = []
        numbers = draw_numbers(images, labels, length, settings)
        for number, marks in read_numbers(numbers, classify, read_lines):
            model_readings.append(describe_reading(number, marks))
            kept = right if model_readings[-1].exact else wrong
            if len(kept) < wanted:
                kept.append((number, marks))
        # Half mistakes when there are some, the rest numbers read right (or more mistakes).
        shown_wrong = min(len(wrong), max(wanted // 2, wanted - len(right)))
        examples += right[: wanted - shown_wrong] + wrong[:shown_wrong]
        scores = number_scores(model_readings[-settings.number_samples :])
        log.info("numbers of %d digits read exactly: %.4f", length, scores["accuracy"])
    segmentation = segmentation_scores(model_readings, "model")
    return number_scores(model_readings), segmentation, numbers_grid(examples)


def pen_number_scores(
    classify: Classifier,
    read_lines: LineReader,
    images: np.ndarray,
    labels: np.ndarray,
    settings: EvaluateSettings,
) -> dict[str, float]:
    """Number scores of the same test numbers drawn with round pens: the pad's strokes are
    even and round, MNIST's are not, and a reader may learn the difference."""
    readings = [
        describe_reading(number, marks)
        for length in settings.number_lengths
        for number, marks in read_numbers(
            draw_numbers(images, labels, length, settings, pens=True), classify, read_lines
        )
    ]
    return number_scores(readings)


# ---- The stage ---------------------------------------------------------------------------------


def users_scores(classify: Classifier, corrections: Path | None) -> dict[str, float]:
    """How the model reads the users' reviewed drawings held out for testing (the feedback
    stage's test split): the share answered with the label, a digit or "not a digit", beside
    MNIST's figures. Without any, `users_test_images` is 0 and there is no accuracy."""
    users = load_prepared(corrections) if corrections is not None else {"y_test": []}
    count = len(users["y_test"])
    if count == 0:
        return {"users_test_images": 0}
    answers = classify(users["x_test"].astype(np.float32) / 255.0).argmax(axis=1)
    return {
        "users_test_images": count,
        "users_test_accuracy": round(float((answers == users["y_test"]).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--not-digits", type=Path, default=Path("data/prepared/not_digits.npz"))
    parser.add_argument("--corrections", type=Path, help="users' accepted corrections (npz)")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--line-reader", type=Path, default=Path("models/line_reader.keras"))
    parser.add_argument("--train-metrics", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--metrics-detail", type=Path, default=Path("reports/metrics_detail.json"))
    parser.add_argument("--confusion", type=Path, default=Path("reports/confusion.csv"))
    parser.add_argument("--calibration", type=Path, default=Path("reports/calibration.csv"))
    parser.add_argument("--misclassified", type=Path, default=Path("reports/misclassified.png"))
    parser.add_argument(
        "--numbers-examples", type=Path, default=Path("reports/numbers_examples.png")
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    params = tracking.load_params(args.params)
    settings = EvaluateSettings.from_params(params["evaluate"])
    data = load_prepared(args.data)
    others = load_prepared(args.not_digits)
    trained = json.loads(args.train_metrics.read_text())
    model = keras.saving.load_model(args.model)

    line_reader = keras.saving.load_model(args.line_reader, compile=False)

    def classify(images: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, images, settings.batch_size)

    def read_lines(strips: np.ndarray) -> np.ndarray:
        return np.asarray(line_reader.predict(strips[..., np.newaxis], verbose=0))

    images, labels = data["x_test"], data["y_test"].astype(np.int64)
    probabilities = classify(images.astype(np.float32) / 255.0)
    digits = digit_probabilities(probabilities)  # what /predict reports for a digit
    predicted = digits.argmax(axis=1)
    not_digits = classify(others["images"][others["split"] == "test"].astype(np.float32) / 255.0)
    counts = confusion_matrix(labels, predicted)
    ece, reliability = calibration_table(digits, labels, settings.calibration_bins)
    canvas, canvas_refused = canvas_robustness(classify, images, labels, settings)
    test_drawings = others["images"][others["split"] == "test"]
    pens = pen_robustness(classify, images, labels, test_drawings, settings)
    numbers, segmentation, examples = evaluate_numbers(
        classify, read_lines, images, labels, settings
    )
    pen_numbers = pen_number_scores(classify, read_lines, images, labels, settings)
    log.info("numbers drawn with round pens read exactly: %.4f", pen_numbers["accuracy"])
    drawn_not_digits = drawn_not_digits_refused(classify, read_lines, test_drawings, settings)
    letters = letters_refused(
        classify,
        LetterSettings.from_section(params["download"]["letters"]),
        tuple(params["download"]["omniglot"]["stroke_width"]),
        settings,
    )
    metrics = {
        "test_accuracy": round(float((predicted == labels).mean()), 4),
        "test_loss": round(
            log_loss(
                np.concatenate([probabilities, not_digits]),
                np.concatenate([labels, np.full(len(not_digits), NOT_A_DIGIT)]),
            ),
            4,
        ),
        "test_errors": int((predicted != labels).sum()),
        "test_digits_refused": round(float(refused(probabilities).mean()), 4),
        "test_not_digits_refused": round(float(refused(not_digits).mean()), 4),
        "not_digit_auroc": round(auroc(not_one_digit(not_digits), not_one_digit(probabilities)), 4),
        "expected_calibration_error": round(ece, 4),
        "canvas_accuracy": canvas["mean"],
        "canvas_refused": canvas_refused["mean"],
        "number_accuracy": numbers["accuracy"],
        **users_scores(classify, args.corrections),
        "val_accuracy": round(trained["val_accuracy"], 4),
        "canvas": canvas,
        "canvas_refusals": canvas_refused,
        "pens": pens,
        "numbers": numbers,
        "pen_numbers": pen_numbers,
        "segmentation": segmentation,
        "not_digits_drawn_refused": drawn_not_digits,
        "letters": letters,
        "per_class": per_class_scores(counts),
    }

    reports = (
        args.metrics,
        args.metrics_detail,
        args.confusion,
        args.calibration,
        args.misclassified,
        args.numbers_examples,
    )
    for path in reports:
        path.parent.mkdir(parents=True, exist_ok=True)
    tracking.write_metrics(metrics, args.metrics, args.metrics_detail)
    tracking.write_csv(
        [{"actual": int(a), "predicted": int(p)} for a, p in zip(labels, predicted, strict=True)],
        args.confusion,
    )
    tracking.write_csv(reliability, args.calibration)
    misclassified_grid(images, labels, digits, settings.misclassified_shown).save(
        args.misclassified
    )
    examples.save(args.numbers_examples)

    run = tracking.ensure_model_run(
        args.model,
        args.data,
        params,
        tracking.train_scores(trained),
        args.corrections,
        args.not_digits,
    )
    figures = {
        "confusion_matrix.png": tracking.confusion_figure(counts),
        "reliability.png": tracking.reliability_figure(reliability, ece),
    }
    datasets = {"mnist": args.data, "not_digits": args.not_digits}
    if args.corrections is not None:
        datasets["corrections"] = args.corrections
    tracking.log_evaluation(run, metrics, datasets, reports, figures)
    log.info(
        "test accuracy %.4f (%d errors), canvas %.4f, numbers %.4f, refused: digits %.4f, "
        "non-digits %.4f (AUROC %.4f), ECE %.4f",
        metrics["test_accuracy"],
        metrics["test_errors"],
        metrics["canvas_accuracy"],
        metrics["number_accuracy"],
        metrics["test_digits_refused"],
        metrics["test_not_digits_refused"],
        metrics["not_digit_auroc"],
        metrics["expected_calibration_error"],
    )


if __name__ == "__main__":
    main()
