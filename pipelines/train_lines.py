"""The `train_lines` stage: fit the line reader, which reads a whole line of digits at once.

Run with `python -m pipelines.train_lines`. Settings come from the `train_lines:` section of
params.yaml. Training lines are numbers of 1 to `max_digits` MNIST training digits drawn as the
pad shows them (`pipelines.drawing.render_number`), their neighbours touching, overlapping or
apart in shares drawn per number, each read as one strip (`pipelines.lines.line_input`); a share
of them holds one training non-digit (a letter, a symbol) in place of a digit, and a share has
its digits redrawn with one round pen, as the pad's brush draws (MNIST's strokes are scanned
pen, uneven; a reader that only saw those read the pad's own touching 2026 as 21026). The network
(`build_line_reader`) learns with a CTC loss, which needs no position for each digit, only the
digits in order. Batches hold strips of about one width, cut to it (`BucketedLines`): most
numbers are short, and a short strip costs a fraction of a long one. Validation lines of
validation digits and non-digits, drawn as MNIST has them and again with round pens, give the
shares read exactly; the test set is never touched here (the evaluate stage measures /read
on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from pipelines import tracking
from pipelines.download import load_prepared
from pipelines.drawing import render_number, with_one_pen
from pipelines.lines import (
    BLANK,
    LINE_CLASSES,
    LINE_HEIGHT,
    LINE_STRIDE,
    LineInput,
    line_input,
    line_text,
    read_line,
    strip_widths,
)
from pipelines.model import conv_bn, resolve_precision
from pipelines.preprocessing import NOT_A_DIGIT, ink_map

log = logging.getLogger("train_lines")

LINE_CANVAS = (840, 280)  # the canvas numbers are drawn on: three of the pad's squares


@dataclass(frozen=True)
class LineSettings:
    """The `train_lines:` section of params.yaml."""

    seed: int
    lines: int  # training lines drawn
    validation_lines: int
    max_digits: int  # digits per line: 1 to this many
    touching: tuple[float, float]  # each line's share of touching neighbours, drawn from this
    overlapping: tuple[float, float]  # and of overlapping ones
    not_digit_lines: float  # share of lines with one glyph that is not a digit, labelled so
    redrawn_lines: float  # share of lines whose digits are redrawn with one round pen
    redrawn_stroke_width: tuple[float, float]  # that pen's width, pixels of the 20-pixel box
    epochs: int
    batch_size: int
    learning_rate: float
    precision: str

    @classmethod
    def from_params(cls, section: dict) -> LineSettings:
        return cls(
            seed=int(section["seed"]),
            lines=int(section["lines"]),
            validation_lines=int(section["validation_lines"]),
            max_digits=int(section["max_digits"]),
            touching=tuple(float(v) for v in section["touching"]),
            overlapping=tuple(float(v) for v in section["overlapping"]),
            not_digit_lines=float(section["not_digit_lines"]),
            redrawn_lines=float(section["redrawn_lines"]),
            redrawn_stroke_width=tuple(float(v) for v in section["redrawn_stroke_width"]),
            epochs=int(section["epochs"]),
            batch_size=int(section["batch_size"]),
            learning_rate=float(section["learning_rate"]),
            precision=str(section["precision"]),
        )


def draw_lines(
    digits: np.ndarray,
    labels: np.ndarray,
    count: int,
    settings: LineSettings,
    seed: int,
    others: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` lines of digits as strips (count, LINE_HEIGHT, LINE_WIDTH) and their labels,
    (count, max_digits) with -1 after the last. With `others` (non-digit drawings, 28x28), a
    share `not_digit_lines` of the lines has one glyph replaced by one of them (NOT_A_DIGIT).
    A share `redrawn_lines` has its digits redrawn with one round pen (`with_one_pen`)."""
    rng = np.random.default_rng(seed)
    strips, targets = [], np.full((count, settings.max_digits), -1, np.int64)
    for index in range(count):
        length = int(rng.integers(1, settings.max_digits + 1))
        chosen = rng.integers(0, len(digits), size=length)
        glyphs, truth = digits[chosen].copy(), labels[chosen].astype(np.int64)
        if rng.random() < settings.redrawn_lines:
            glyphs = with_one_pen(glyphs, rng.uniform(*settings.redrawn_stroke_width))
        if others is not None and len(others) and rng.random() < settings.not_digit_lines:
            place = int(rng.integers(0, length))
            glyphs[place] = others[rng.integers(0, len(others))]
            truth[place] = NOT_A_DIGIT
        touching = rng.uniform(*settings.touching)
        overlapping = rng.uniform(*settings.overlapping)
        number = render_number(glyphs, truth, LINE_CANVAS, touching, overlapping, rng)
        strips.append(line_input(ink_map(number.image)).pixels)
        targets[index, :length] = truth
    return np.stack(strips), targets


def draw_lines_in_parallel(
    digits: np.ndarray,
    labels: np.ndarray,
    count: int,
    settings: LineSettings,
    seed: int,
    others: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """draw_lines split over the cores, each part from its own seed."""
    workers = max(1, len(os.sched_getaffinity(0)))
    sizes = [count // workers + (part < count % workers) for part in range(workers)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = list(
            pool.map(
                draw_lines,
                [digits] * workers,
                [labels] * workers,
                sizes,
                [settings] * workers,
                [seed * 1000 + part for part in range(workers)],
                [others] * workers,
            )
        )
    return np.concatenate([s for s, _ in parts]), np.concatenate([t for _, t in parts])


def ctc_loss(targets, probabilities):
    """Mean CTC loss of (N, max_digits) targets (-1 after the last digit) under the reader's
    (N, frames, classes) probabilities."""
    targets = ops.cast(targets, "int32")
    lengths = ops.sum(ops.cast(targets >= 0, "int32"), axis=1)
    labels = ops.where(targets >= 0, targets + 1, BLANK)
    batch, frames = ops.shape(probabilities)[0], ops.shape(probabilities)[1]
    log_probabilities = ops.log(ops.clip(ops.cast(probabilities, "float32"), 1e-12, 1.0))
    frame_counts = ops.full((batch,), frames, dtype="int32")
    return ops.mean(
        ops.ctc_loss(labels, log_probabilities, lengths, frame_counts, mask_index=BLANK)
    )


def texts_read(model: keras.Model, strips: np.ndarray, batch_size: int = 500) -> list[str]:
    """What the reader reads in each strip ('?' for what is not a digit), each strip cut to its
    width (`pipelines.lines.strip_widths`) as /read cuts it."""
    widths = strip_widths(strips)
    texts = [""] * len(strips)
    for width in np.unique(widths):
        members = np.flatnonzero(widths == width)
        cut = strips[members, :, :width, None]
        outputs = np.asarray(model.predict(cut, batch_size=batch_size, verbose=0))
        for member, row in zip(members, outputs, strict=True):
            line = LineInput(strips[member], 1.0, 0, int(width))  # where things are: unused
            texts[member] = line_text(read_line(row, line))
    return texts


def exact_share(model: keras.Model, strips: np.ndarray, targets: np.ndarray) -> float:
    """The share of strips read exactly: every digit, and '?' where a glyph is not a digit."""
    truths = [
        "".join("?" if d == NOT_A_DIGIT else str(d) for d in row if d >= 0) for row in targets
    ]
    return float(np.mean([a == b for a, b in zip(texts_read(model, strips), truths, strict=True)]))


def build_line_reader(
    filters: tuple[int, int, int, int] = (16, 32, 64, 64),
    dropout: float = 0.25,
    fused: bool = False,
    precision: str = "float32",
) -> keras.Model:
    """Map (N, LINE_HEIGHT, W, 1) strips (`pipelines.lines.line_input`, W a multiple of
    LINE_STRIDE up to LINE_WIDTH) to (N, W / LINE_STRIDE, LINE_CLASSES) float32 probabilities:
    per frame of LINE_STRIDE columns, no new digit (BLANK), one of the ten digits, or not a
    digit; trained with a CTC loss.

    Four convolution blocks halve the height each time and the width twice (to LINE_STRIDE
    columns a frame); two 1-D convolutions along the frames then see about two digits either
    side, enough to tell where one digit ends and the next begins.
    """
    if len(filters) != 4 or min(filters) < 1:
        raise ValueError(f"filters must be four positive widths, got {filters}")
    inputs = keras.Input(shape=(LINE_HEIGHT, None, 1), name="strip")  # any multiple of 4 wide
    variant = {"fused": fused, "precision": precision}
    x = inputs
    for index, width in enumerate(filters):
        x = conv_bn(x, width, 3, padding="same", **variant)
        across = 2 if 2**index < LINE_STRIDE else 1
        x = layers.MaxPooling2D((2, across), dtype=precision)(x)
    rows = LINE_HEIGHT // 2 ** len(filters)
    x = layers.Permute((2, 1, 3), dtype=precision)(x)  # frames first
    x = layers.Reshape((-1, rows * filters[-1]), dtype=precision)(x)
    x = layers.Dropout(dropout, dtype=precision)(x)
    for _ in range(2):
        x = layers.Conv1D(128, 5, padding="same", activation="relu", dtype=precision)(x)
    x = layers.Dropout(dropout, dtype=precision)(x)
    outputs = layers.Dense(LINE_CLASSES, activation="softmax", name="frames", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="digits_line_reader")


class BucketedLines:
    """Batches of strips of about the same width, cut to that width: short numbers (most of
    them) cost a fraction of the full strip. The batches' order is shuffled every epoch."""

    def __init__(self, strips: np.ndarray, targets: np.ndarray, batch_size: int, seed: int):
        self.strips, self.targets = strips, targets
        self.widths = strip_widths(strips)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.batches: list[np.ndarray] = []
        self.shuffle()

    def shuffle(self) -> None:
        batches = []
        for width in np.unique(self.widths):
            members = self.rng.permutation(np.flatnonzero(self.widths == width))
            batches += np.array_split(members, max(1, round(len(members) / self.batch_size)))
        self.batches = [batches[i] for i in self.rng.permutation(len(batches))]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        members = np.sort(self.batches[index])
        width = int(self.widths[members].max())
        return self.strips[members, :, :width, None], self.targets[members]

    def epoch(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One pass over every batch, then a new order for the next."""
        for index in range(len(self)):
            yield self[index]
        self.shuffle()

    def dataset(self) -> tf.data.Dataset:
        """The batches as a dataset whose strips may be of any width, epoch after epoch (a
        PyDataset would fix the width its first batches have)."""
        signature = (
            tf.TensorSpec((None, LINE_HEIGHT, None, 1), tf.float32),
            tf.TensorSpec((None, self.targets.shape[1]), tf.int64),
        )
        batches = tf.data.Dataset.from_generator(self.epoch, output_signature=signature)
        return batches.repeat().prefetch(2)


def fit_line_reader(strips: np.ndarray, targets: np.ndarray, settings: LineSettings) -> keras.Model:
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()  # the same lines, the same reader, byte for byte
    # The fused batch norm kernel trained 28% faster here; in_float32 saves the stock layers.
    model = build_line_reader(fused=True, precision=resolve_precision(settings.precision))
    batches = BucketedLines(strips, targets, settings.batch_size, settings.seed)
    steps = settings.epochs * len(batches)
    schedule = keras.optimizers.schedules.CosineDecay(
        settings.learning_rate / 25,
        steps,
        warmup_target=settings.learning_rate,
        warmup_steps=max(1, steps // 12),
    )
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss=ctc_loss)
    model.fit(
        batches.dataset(),
        epochs=settings.epochs,
        steps_per_epoch=len(batches),
        shuffle=False,  # BucketedLines shuffles
        verbose=2,
    )
    return in_float32(model)


def in_float32(trained: keras.Model) -> keras.Model:
    """The trained weights in a float32 reader: what is saved, evaluated and served (LiteRT has
    no kernels for the bfloat16 casts of a mixed-precision model)."""
    model = build_line_reader(precision="float32")
    model.set_weights(trained.get_weights())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--not-digits", type=Path, default=Path("data/prepared/not_digits.npz"))
    parser.add_argument("--model", type=Path, default=Path("models/line_reader.keras"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/train_lines.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = LineSettings.from_params(tracking.load_params(args.params)["train_lines"])
    data = load_prepared(args.data)
    drawings = load_prepared(args.not_digits)
    others = {
        split: drawings["images"][drawings["split"] == split] for split in ("train", "validation")
    }
    started = time.perf_counter()
    strips, targets = draw_lines_in_parallel(
        data["x_train"], data["y_train"], settings.lines, settings, settings.seed, others["train"]
    )
    validation = {  # the validation lines as MNIST's pens drew them, and with round pens
        name: draw_lines_in_parallel(
            data["x_val"],
            data["y_val"],
            settings.validation_lines,
            dataclasses.replace(settings, redrawn_lines=share),
            settings.seed + 1,
            others["validation"],
        )
        for name, share in (("val_lines_exact", 0.0), ("val_pen_lines_exact", 1.0))
    }
    drawn = time.perf_counter() - started
    log.info(
        "drew %d training and 2 x %d validation lines in %.0f s",
        len(strips),
        settings.validation_lines,
        drawn,
    )
    model = fit_line_reader(strips, targets, settings)
    seconds = time.perf_counter() - started - drawn
    summary = {name: exact_share(model, *lines) for name, lines in validation.items()}
    log.info("trained in %.0f s: %s", seconds, summary)
    tracking.save_keras_reproducibly(model, args.model)  # the same weights, the same bytes
    tracking.write_json(summary, args.metrics)


if __name__ == "__main__":
    main()
