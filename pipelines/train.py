"""The `train` stage: fit the CNN on the prepared MNIST split and track the run in MLflow.

Run with `python -m pipelines.train` (dvc.yaml does). Settings come from the `train:` section of
params.yaml. Augmentation (rotation, zoom, shift, stroke thickness) runs batched inside a
parallel tf.data pipeline with stateless random ops, so both cores stay busy and the same seed
gives the same model. The schedule is fixed (warm-up then cosine decay) and the final weights are
kept; the validation split chooses only the softmax temperature that calibrates the
probabilities and the threshold for "not a digit", and the test set is never touched here.

The model has an eleventh class, NOT_A_DIGIT, learnt from the non-digit drawings the download
stage prepares (Omniglot characters of the training alphabets, letters and symbols drawn from
pen-stroke fonts) and from synthetic scribbles, and a twelfth, SEVERAL_DIGITS, learnt from two
or three digits drawn touching: the reader splits such a mark and refuses a letter. Some
training digits are also drawn on the page's pad and read back, and some cut out of touching
pairs with their neighbour's bits, as the reader cuts them (`canvas_digits`, `crowded_digits`):
every non-digit comes through the preprocessing contract, and so do the digits people draw. How
readily it answers that class is fitted last, on held-out alphabets and MNIST validation digits:
the largest push towards "not a digit" that refuses at most `max_digit_refusal` of the
validation digits, folded into the classifier's bias so the saved model decides by itself.

Users' corrections that a reviewer accepted (the feedback stage's dataset) join in: their
training split repeated `corrections_weight` times per epoch, their validation split in the
validation set. Which corrections a run saw is its `corrections_hash` tag.

With `members` > 1 the stage trains that many networks from consecutive seeds, side by side in
worker processes (one per core, each single-threaded), and saves their average as one model.
Workers send their epoch metrics to this process, which alone talks to MLflow.

Outputs: the model file, saved byte for byte the same for the same weights (its MD5 tags the
MLflow run, which is how the evaluate and package stages find the run), `reports/train.json`
(validation metrics) and a per-epoch history CSV for `dvc plots`. Only what the same code, data
and params reproduce goes into these files; run ids and timings go to MLflow and the log.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import queue as queue_module
import signal
import tempfile
import time
from multiprocessing.queues import Queue
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw

from pipelines import tracking
from pipelines.download import file_md5, load_prepared
from pipelines.drawing import (
    BACKGROUNDS,
    CanvasStyle,
    centre_lines,
    redraw_with_pens,
    render_number,
    render_on_canvas,
)
from pipelines.model import (
    build_ensemble,
    build_model,
    divide_logits,
    raise_logit,
    resolve_precision,
)
from pipelines.preprocessing import (
    CLASSES,
    INPUT_SHAPE,
    NOT_A_DIGIT,
    PREPROCESSING_VERSION,
    SEVERAL_DIGITS,
    as_batch,
    ink_map,
    ink_to_input,
    refused,
    shrink_factor,
)

log = logging.getLogger("train")

JOINED_CANVAS = (840, 280)  # the pad joined digits are drawn on: the evaluate stage's numbers'
JOINED_PAIRS = 0.7  # share of joined drawings with two digits; the rest have three
JOINED_TOUCHING = 0.7  # share of joins where the inks touch; the rest overlap a little
VALIDATION_JOINED = 500  # joined validation digits: the temperature is fitted on every class
PAD_SIDE = 280  # the page's square pad, on which canvas digits are drawn
PAD_DIGIT_SIZE = (0.2, 0.95)  # a canvas digit's size as a share of the pad side, drawn uniformly
PAD_STROKE = (-0.8, 1.2)  # its pen thinned or thickened by up to this many MNIST pixels
CROWDED_OWN_INK = 0.85  # a crowded digit holds at least this share of the ink in its box


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_epochs: float
    weight_decay: float
    ema_momentum: float  # 0 disables the exponential moving average of weights
    label_smoothing: float
    filters: tuple[int, int, int]
    dropout: float
    rotation_degrees: float
    zoom: float
    shift_pixels: float
    thickness: float
    precision: str  # "float32", or "mixed_bfloat16" for bfloat16 maths on float32 weights
    max_train_images: int  # 0 means all
    members: int  # independently seeded networks whose probabilities are averaged
    not_digit_share: float  # share of each epoch's images that are not digits
    corrections_weight: int  # times each accepted user drawing is seen per epoch
    scribbles: int  # synthetic scribbles added to the non-digit drawings
    joined_digits: int  # drawings of 2-3 touching training digits added to the non-digits
    canvas_digits: int  # training digits drawn on the pad and read back, added to the digits
    crowded_digits: int  # training digits cut from touching pairs with their neighbour's bits
    redrawn_digits: int  # training digits redrawn along their centre line with a round pen
    redrawn_not_digits: int  # and training non-digits, with pens of the same widths
    redrawn_stroke_width: tuple[float, float]  # the pens' widths, in pixels of the 20-pixel box
    max_digit_refusal: float  # share of validation digits the "not a digit" threshold may refuse

    @classmethod
    def from_params(cls, section: dict) -> TrainSettings:
        values = dict(section)
        values["filters"] = tuple(values["filters"])
        values["redrawn_stroke_width"] = tuple(values["redrawn_stroke_width"])
        values["precision"] = resolve_precision(values["precision"])
        return cls(**values)


def random_thickness(images: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Blend each image towards its dilation (thicker) or erosion (thinner) by a random amount.

    images: (B, 28, 28, 1). A blend factor in [-strength, strength] per image: positive thickens.
    """
    amount = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], seed, -strength, strength)
    dilated = tf.nn.max_pool2d(images, ksize=3, strides=1, padding="SAME")
    eroded = -tf.nn.max_pool2d(-images, ksize=3, strides=1, padding="SAME")
    target = tf.where(amount > 0, dilated, eroded)
    return images + tf.abs(amount) * (target - images)


def random_affine(
    images: tf.Tensor, rotation_degrees: float, zoom: float, shift_pixels: float, seed: tf.Tensor
) -> tf.Tensor:
    """Rotate, zoom and shift each image about its centre, filling with background (0)."""
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    angle = tf.random.stateless_uniform([batch], seeds[0], -1.0, 1.0) * (
        rotation_degrees * math.pi / 180.0
    )
    scale = tf.random.stateless_uniform([batch], seeds[1], 1.0 - zoom, 1.0 + zoom)
    shift = tf.random.stateless_uniform([batch, 2], seeds[2], -shift_pixels, shift_pixels)
    # The transform maps output pixel (x, y) to input pixel (x', y'): the inverse of the motion.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    centre = (INPUT_SHAPE[0] - 1) / 2.0
    offset_x = centre - cos * (centre + shift[:, 0]) + sin * (centre + shift[:, 1])
    offset_y = centre - sin * (centre + shift[:, 0]) - cos * (centre + shift[:, 1])
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([cos, -sin, offset_x, sin, cos, offset_y, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=INPUT_SHAPE[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def training_dataset(
    x: np.ndarray, y: np.ndarray, settings: TrainSettings, steps: int
) -> tf.data.Dataset:
    """Shuffled, augmented batches for all epochs at once, reproducible from the seed."""

    def augment(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]):
        images, labels = batch
        seed = tf.stack([tf.cast(settings.seed, tf.int64), step])
        thickness_seed, affine_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        images = random_thickness(images, settings.thickness, thickness_seed)
        images = random_affine(
            images, settings.rotation_degrees, settings.zoom, settings.shift_pixels, affine_seed
        )
        return tf.clip_by_value(images, 0.0, 1.0), tf.one_hot(labels, CLASSES)

    dataset = (
        tf.data.Dataset.from_tensor_slices((as_batch(x), y.astype(np.int32)))
        .shuffle(len(x), seed=settings.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(settings.batch_size, drop_remainder=True)
        .take(steps)
        .enumerate()
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def learning_rate_schedule(settings: TrainSettings, steps_per_epoch: int):
    """Linear warm-up to the peak rate, then cosine decay to zero: a one-cycle schedule."""
    total = settings.epochs * steps_per_epoch
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=settings.learning_rate / 25,
        decay_steps=total - warmup,
        warmup_target=settings.learning_rate,
        warmup_steps=warmup,
        alpha=0.0,
    )


def early_weights_in_average(settings: TrainSettings, steps: int) -> float:
    """Share of the first steps' weights still in the final moving average (0 without one).

    Keras's weight average starts from the initial weights with no bias correction, so a run
    shorter than a few times its horizon (1 / (1 - ema_momentum) steps) ends near the
    untrained network: with 0.999, a 3-epoch run here kept 27% and scored 0.49 on validation.
    """
    return settings.ema_momentum**steps if settings.ema_momentum > 0 else 0.0


class EpochReporter(keras.callbacks.Callback):
    """Inside a worker: send each epoch's metrics to the parent, then save the model and say so.

    The model is saved from `on_train_end`, when fit() has swapped in the averaged weights but
    not yet torn down its input pipeline: that teardown took 15-55 s here with both cores busy,
    and the parent need not wait for it (it stops a worker once the worker reports done).
    """

    def __init__(self, queue: Queue, member: int, settings: TrainSettings, out: Path) -> None:
        super().__init__()
        self.queue = queue
        self.member = member
        self.settings = settings
        self.out = out

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        metrics.pop("learning_rate", None)
        self.queue.put({"member": self.member, "epoch": epoch + 1, **metrics})

    def on_train_end(self, logs: dict | None = None) -> None:
        with_stock_layers(self.model, self.settings).save(self.out)
        self.queue.put({"member": self.member, "done": True})


class EpochLog:
    """In the parent: log each epoch's metrics and elapsed time to the log, MLflow and a history.

    Epochs are numbered across ensemble members (member 2's first epoch follows member 1's last
    one), so MLflow's charts and the history CSV read the same however the members were run.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.reports: list[dict[str, float]] = []
        self.started = time.perf_counter()

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per epoch in step order (parallel members report interleaved)."""
        return sorted(self.reports, key=lambda row: row["epoch"])

    def record(self, report: dict[str, float]) -> None:
        member, epoch = int(report["member"]), int(report["epoch"])
        metrics = {k: v for k, v in report.items() if k not in ("member", "epoch")}
        step = (member - 1) * self.epochs + epoch
        self.reports.append({"epoch": step, "member": member, **metrics})
        # Prefixed so that `val_accuracy` is reserved for the final model, which may differ
        # from the last epoch's (averaged weights, several members).
        mlflow.log_metrics({f"epoch_{name}": value for name, value in metrics.items()}, step=step)
        log.info(
            "member %d epoch %d: val_accuracy %.4f, %.0f s elapsed",
            member,
            epoch,
            metrics.get("val_accuracy", float("nan")),
            time.perf_counter() - self.started,
        )


def scribbles(count: int, seed: int) -> np.ndarray:
    """`count` random scribbles as model inputs: tangles of 8-15 random points joined by a
    thick pen, which no one would read as a digit (fewer points can make a 7 or a 2)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, *INPUT_SHAPE[:2]), dtype=np.float32)
    for index in range(count):
        canvas = Image.new("L", (96, 96), 0)
        points = rng.uniform(8, 88, size=(int(rng.integers(8, 16)), 2))
        ImageDraw.Draw(canvas).line(
            [tuple(point) for point in points],
            fill=255,
            width=int(rng.integers(5, 10)),
            joint="curve",
        )
        images[index] = ink_to_input(np.asarray(canvas, dtype=np.float32) / 255.0)
    return images


def joined_digits(digits: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` drawings of two or three MNIST training digits whose ink touches or overlaps,
    drawn as the page's pad would show a number (`pipelines.drawing`) and read as one mark.

    One mark holding several digits is not one digit, nor a letter: trained as SEVERAL_DIGITS,
    these teach the model to tell such a mark, which the reader then splits into digits
    (`pipelines.segmentation` weighs the whole mark against every split of it), from a letter,
    which it refuses.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((count, *INPUT_SHAPE[:2]), dtype=np.float32)
    for index in range(count):
        length = 2 if rng.random() < JOINED_PAIRS else 3
        chosen = digits[rng.integers(0, len(digits), size=length)]
        number = render_number(
            chosen,
            np.zeros(length, dtype=np.int64),  # labels: unused, the drawing is not a digit
            JOINED_CANVAS,
            touching=JOINED_TOUCHING,
            overlapping=1.0 - JOINED_TOUCHING,
            rng=rng,
        )
        images[index] = ink_to_input(ink_map(number.image))
    return images


def canvas_digits(
    digits: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` training digits drawn on the page's pad (any size, pen, place and background)
    and read back through the preprocessing contract, with their labels.

    The non-digits all come through that contract, so without these the model could learn that
    a re-read image is "not a digit" and refuse digits drawn on the pad; these are also the
    drawings people send."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(digits), size=min(count, len(digits)), replace=False)
    images = np.empty((len(chosen), *INPUT_SHAPE[:2]), dtype=np.float32)
    for index, digit in enumerate(digits[chosen]):
        style = CanvasStyle(
            box_fraction=rng.uniform(*PAD_DIGIT_SIZE),
            stroke=rng.uniform(*PAD_STROKE),
            off_centre=bool(rng.random() < 0.5),
            background=str(rng.choice(BACKGROUNDS)),
        )
        images[index] = ink_to_input(ink_map(render_on_canvas(digit, style, PAD_SIDE, rng)))
    return images, labels[chosen]


def crowded_digits(
    digits: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` training digits cut by their box out of a pair drawn touching or overlapping,
    with the bits of the neighbour that reach into the box, and their labels: what the reader's
    pieces of joined digits look like (`pipelines.segmentation`), which must still read as the
    digit. A box holding less than CROWDED_OWN_INK of its digit's ink is drawn again."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, *INPUT_SHAPE[:2]), dtype=np.float32)
    targets = np.empty(count, dtype=np.int64)
    made = 0
    while made < count:
        pair = rng.integers(0, len(digits), size=2)
        number = render_number(
            digits[pair],
            labels[pair],
            JOINED_CANVAS,
            touching=JOINED_TOUCHING,
            overlapping=1.0 - JOINED_TOUCHING,
            rng=rng,
        )
        which = int(rng.integers(0, 2))
        box = number.boxes[which]
        amounts = number.ink_in(box)
        if amounts[which] < CROWDED_OWN_INK * amounts.sum():
            continue
        scale = shrink_factor(number.image.size)
        ink = ink_map(number.image)[
            box.y // scale : -(-(box.y + box.height) // scale),
            box.x // scale : -(-(box.x + box.width) // scale),
        ]
        images[made], targets[made] = ink_to_input(ink), labels[pair[which]]
        made += 1
    return images, targets


def redrawn(
    images: np.ndarray, count: int, widths: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` of the uint8 inputs `images` (N, 28, 28), chosen at random, redrawn along their
    centre line with round pens of widths drawn uniformly from `widths` (pixels of the 20-pixel
    box) and read back through the preprocessing contract; and which ones they are (indices).

    The non-digit drawings are all redrawn this way (the download stage), so without redrawn
    digits the model learns that an even, round stroke is not a digit: it refused 43% of the
    validation digits redrawn 4 pixels wide, as thick as one MNIST digit in twenty. Redrawn
    digits and non-digits with the same pens leave the pen nothing to say about the class, and
    widths past the non-digits' own cover a marker's thick, even stroke."""
    rng = np.random.default_rng(seed)
    inked = np.flatnonzero((images >= 128).any(axis=(1, 2)))  # a centre line to redraw
    chosen = np.sort(rng.choice(inked, size=min(count, len(inked)), replace=False))
    pens = rng.uniform(*widths, size=len(chosen))
    return redraw_with_pens(centre_lines(images[chosen]), pens), chosen


def load_data(
    mnist: Path, not_digits: Path, corrections: Path | None, settings: TrainSettings
) -> dict[str, np.ndarray]:
    """Training and validation images as float inputs in [0, 1] with labels, non-digits
    labelled NOT_A_DIGIT and joined digits SEVERAL_DIGITS: MNIST's splits, the non-digit
    drawings' (by alphabet), scribbles and joined digits, repeated and sampled to make
    exactly `not_digit_share` of the training images, and
    users' accepted corrections (train split repeated `corrections_weight` times; validation
    split as is)."""
    (x_train, y_train), (x_val, y_val), drawn_val = _load_without_corrections(
        mnist, not_digits, settings
    )
    if corrections is not None:
        users = load_prepared(corrections)
        repeats = settings.corrections_weight
        x_train = np.concatenate([x_train, *[users["x_train"] / np.float32(255.0)] * repeats])
        y_train = np.concatenate([y_train, *[users["y_train"]] * repeats])
        x_val = np.concatenate([x_val, users["x_val"] / np.float32(255.0)])
        y_val = np.concatenate([y_val, users["y_val"]])
    return {
        "x_train": x_train.astype(np.float32),
        "y_train": y_train.astype(np.int64),
        "x_val": as_batch(x_val),
        "y_val": y_val.astype(np.int64),
        "x_val_drawn": as_batch(drawn_val[0]),
        "y_val_drawn": drawn_val[1].astype(np.int64),
    }


def _load_without_corrections(
    mnist: Path, not_digits: Path, settings: TrainSettings
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_val, y_val), (x_val_drawn, y_val_drawn)) of MNIST and the
    non-digits; the last are the validation digits drawn on the pad, each once."""
    digits = load_prepared(mnist)
    others = load_prepared(not_digits)
    count = min(settings.max_train_images or len(digits["x_train"]), len(digits["x_train"]))
    x_train = digits["x_train"][:count].astype(np.float32) / 255.0
    y_train = digits["y_train"][:count]
    pens = settings.redrawn_stroke_width
    redrawn_images, redrawn_indices = redrawn(
        digits["x_train"][:count], settings.redrawn_digits, pens, settings.seed
    )
    drawn = [
        canvas_digits(digits["x_train"][:count], y_train, settings.canvas_digits, settings.seed),
        crowded_digits(digits["x_train"][:count], y_train, settings.crowded_digits, settings.seed),
        (redrawn_images, y_train[redrawn_indices]),
    ]
    drawings = others["images"][others["split"] == "train"]
    not_digits = np.concatenate(
        [
            drawings.astype(np.float32) / 255.0,
            redrawn(drawings, settings.redrawn_not_digits, pens, settings.seed + 1)[0],
            scribbles(settings.scribbles, settings.seed),
        ]
    )
    joined = joined_digits(digits["x_train"][:count], settings.joined_digits, settings.seed)
    pool = np.concatenate([not_digits, joined])
    pool_labels = np.repeat([NOT_A_DIGIT, SEVERAL_DIGITS], [len(not_digits), len(joined)])
    digit_count = count + sum(len(labels) for _, labels in drawn)
    kept = _at_share(
        len(pool), settings.not_digit_share / (1.0 - settings.not_digit_share) * digit_count
    )
    x_val_others = others["images"][others["split"] == "validation"].astype(np.float32) / 255.0
    x_val_joined = joined_digits(digits["x_val"], VALIDATION_JOINED, settings.seed)
    train = (
        np.concatenate([x_train, *(images for images, _ in drawn), pool[kept]]),
        np.concatenate([y_train, *(labels for _, labels in drawn), pool_labels[kept]]),
    )
    validation = (
        np.concatenate([digits["x_val"].astype(np.float32) / 255.0, x_val_others, x_val_joined]),
        np.concatenate(
            [
                digits["y_val"],
                np.full(len(x_val_others), NOT_A_DIGIT),
                np.full(len(x_val_joined), SEVERAL_DIGITS),
            ]
        ),
    )
    drawn_validation = canvas_digits(
        digits["x_val"], digits["y_val"], len(digits["x_val"]), settings.seed
    )
    return train, validation, drawn_validation


def _at_share(size: int, wanted: float) -> np.ndarray:
    """Indices into a pool of `size` images making `wanted` of them: the pool whole as many
    times as it fits, then a fixed sample of it for the rest. So the share is the one asked
    for, and a small training set (`max_train_images`) is not drowned in non-digits."""
    repeats, rest = divmod(round(wanted), size)
    sample = np.sort(np.random.default_rng(0).permutation(size)[:rest])
    return np.concatenate([np.tile(np.arange(size), repeats), sample])


def fit_member(
    data: dict[str, np.ndarray], settings: TrainSettings, name: str, reporter: EpochReporter
) -> None:
    """Fit one network from its own seed on the training split, watching the validation split.

    The reporter saves the trained model at the end.
    """
    keras.utils.set_random_seed(settings.seed)
    x_train, y_train = data["x_train"], data["y_train"]
    steps_per_epoch = len(x_train) // settings.batch_size
    x_val, y_val = data["x_val"], data["y_val"]
    model = build_model(
        settings.filters, settings.dropout, name=name, fused=True, precision=settings.precision
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=learning_rate_schedule(settings, steps_per_epoch),
            weight_decay=settings.weight_decay,
            use_ema=settings.ema_momentum > 0,
            ema_momentum=settings.ema_momentum or 0.99,
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
        metrics=["accuracy"],
    )
    total_steps = steps_per_epoch * settings.epochs
    untrained = early_weights_in_average(settings, total_steps)
    if untrained > 0.01:
        log.warning(
            "%s: ema_momentum %g is too long a memory for %d steps: %.0f%% of the final weights "
            "would come from the first, untrained ones; lower it or set 0 for short runs",
            name,
            settings.ema_momentum,
            total_steps,
            100 * untrained,
        )
    log.info(
        "training %s: %d parameters on %d images for %d epochs",
        name,
        model.count_params(),
        len(x_train),
        settings.epochs,
    )
    model.fit(
        training_dataset(x_train, y_train, settings, steps_per_epoch * settings.epochs),
        epochs=settings.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=(x_val, keras.utils.to_categorical(y_val, CLASSES)),
        validation_batch_size=1000,
        callbacks=[reporter],
        verbose=2,
    )


def with_stock_layers(trained: keras.Model, settings: TrainSettings) -> keras.Model:
    """The trained weights in the stock-layer model that is saved, evaluated and served."""
    model = build_model(settings.filters, settings.dropout, name=trained.name)
    model.set_weights(trained.get_weights())
    return model


def fit_member_in_worker(
    data_file: Path,
    settings: TrainSettings,
    member: int,
    threads: int,
    queue: Queue,
    out: Path,
) -> None:
    """Worker process: fit member `member` (seed + member - 1) on `threads` cores, save to `out`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.experimental.enable_op_determinism()
    member_settings = dataclasses.replace(settings, seed=settings.seed + member - 1)
    reporter = EpochReporter(queue, member, member_settings, out)
    with np.load(data_file) as saved:  # the parent's images: the same for every member
        data = {name: saved[name] for name in saved.files}
    fit_member(data, member_settings, f"member_{member}", reporter)


def worker_layout(members: int, cores: int) -> tuple[int, int]:
    """(processes at once, threads each): one process per member, up to one per core.

    Two single-threaded trainings on two cores get through about 35% more images per second
    than one two-threaded training: small convolutions do not split well across threads.
    """
    processes = max(1, min(members, cores))
    return processes, max(1, cores // processes)


def run_workers(
    workers: dict[int, multiprocessing.Process], queue: Queue, epochs: EpochLog
) -> None:
    """Run members' workers until each has saved its model; stop them all if anything fails.

    A worker that reported done is only tearing down TensorFlow, so it is stopped, not awaited.
    """
    done: set[int] = set()

    def running() -> bool:
        return any(worker.is_alive() for m, worker in workers.items() if m not in done)

    try:
        for worker in workers.values():
            worker.start()
        while running():
            done |= drain(queue, epochs, wait=1.0)
        done |= drain(queue, epochs, wait=0.0)
    finally:
        for worker in workers.values():
            if worker.is_alive():
                worker.terminate()
            worker.join()
    failed = [worker.name for member, worker in workers.items() if member not in done]
    if failed:
        raise RuntimeError(f"training failed in {', '.join(failed)}; see the log above")


def train(
    data: dict[str, np.ndarray], settings: TrainSettings, workdir: Path
) -> tuple[list[keras.Model], EpochLog]:
    """Fit `members` networks from consecutive seeds in parallel workers, on `data`
    (load_data's), which they read from one file in `workdir` rather than draw again."""
    processes, threads = worker_layout(settings.members, len(os.sched_getaffinity(0)))
    log.info(
        "training %d member(s), %d at a time with %d thread(s) each",
        settings.members,
        processes,
        threads,
    )
    context = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
    queue = context.Queue()
    epochs = EpochLog(settings.epochs)
    paths = [workdir / f"member_{member}.keras" for member in range(1, settings.members + 1)]
    data_file = workdir / "data.npz"
    np.savez(data_file, **data)
    for first in range(0, settings.members, processes):
        wave = {
            member: context.Process(
                target=fit_member_in_worker,
                args=(data_file, settings, member, threads, queue, paths[member - 1]),
                name=f"member {member}",
            )
            for member in range(first + 1, min(first + processes, settings.members) + 1)
        }
        run_workers(wave, queue, epochs)
    return [keras.saving.load_model(path) for path in paths], epochs


def drain(queue: Queue, epochs: EpochLog, wait: float) -> set[int]:
    """Record every report waiting in the queue, waiting up to `wait` s for the first.

    Returns the members that reported done (their model is saved).
    """
    done: set[int] = set()
    try:
        report = queue.get(timeout=wait) if wait else queue.get_nowait()
        while True:
            if report.get("done"):
                done.add(int(report["member"]))
            else:
                epochs.record(report)
            report = queue.get_nowait()
    except queue_module.Empty:
        pass
    return done


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true labels (cross-entropy), clipped at 1e-12."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def fit_temperature(member_probabilities: list[np.ndarray], labels: np.ndarray) -> float:
    """The logit temperature under which the members' average has the least validation log-loss.

    Temperature scaling (Guo et al., 2017). Label smoothing teaches a network to answer about
    90% even for digits it never gets wrong; one division of the logits, fitted on validation
    images, makes its confidence mean what it says. A single network's answers do not change.
    """
    # log(p) equals the logits up to a per-image constant, which softmax ignores.
    log_probabilities = [np.log(np.clip(p, 1e-12, 1.0)) for p in member_probabilities]

    def validation_loss(temperature: float) -> float:
        averaged = np.mean([softmax(logs / temperature) for logs in log_probabilities], axis=0)
        return log_loss(averaged, labels)

    return float(min(np.geomspace(0.05, 5.0, 401), key=validation_loss))


def fit_refusal_shift(
    member_probabilities: list[np.ndarray], labels: np.ndarray, max_digit_refusal: float
) -> float:
    """The largest push on the NOT_A_DIGIT logit that refuses (as not a digit or as several) at
    most `max_digit_refusal` of the validation digits: as many non-digits refused as that
    allows."""
    log_probabilities = [np.log(np.clip(p, 1e-12, 1.0)) for p in member_probabilities]
    is_digit = labels < NOT_A_DIGIT
    for shift in np.linspace(8.0, -8.0, 321):
        push = np.zeros(CLASSES)
        push[NOT_A_DIGIT] = shift
        averaged = np.mean([softmax(logs + push) for logs in log_probabilities], axis=0)
        if refused(averaged)[is_digit].mean() <= max_digit_refusal:
            return float(shift)
    return -8.0


def calibrated_model(
    members: list[keras.Model], data: dict[str, np.ndarray], max_digit_refusal: float
) -> tuple[keras.Model, float, float]:
    """The members with their fitted temperature and refusal shift folded in, averaged when
    there are several. Returns the model, the temperature and the shift.

    The temperature is fitted on the validation set; the shift on its digits as MNIST has them
    and as drawn on the pad (`x_val_drawn`): a threshold fitted on MNIST's alone refused 0.12%
    of them but 0.66% of the same digits drawn, the drawings people send."""
    x_val, y_val = data["x_val"], data["y_val"]
    digits = np.concatenate([x_val, data["x_val_drawn"]])
    labels = np.concatenate([y_val, data["y_val_drawn"]])

    def member_probabilities(images: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(m.predict(images, batch_size=1000, verbose=0)) for m in members]

    temperature = fit_temperature(member_probabilities(x_val), y_val)
    for member in members:
        divide_logits(member, temperature)
    shift = fit_refusal_shift(member_probabilities(digits), labels, max_digit_refusal)
    for member in members:
        raise_logit(member, shift)
    model = members[0] if len(members) == 1 else build_ensemble(members)
    return model, temperature, shift


def validation_scores(model: keras.Model, data: dict[str, np.ndarray]) -> dict[str, float]:
    """The final model (averaged weights, whole ensemble) on validation: digit accuracy (the
    best of the ten digits, as MNIST is scored), loss over all classes, and the share of
    digits refused (as not a digit or as several; also drawn on the pad), of non-digits
    (held-out alphabets) refused, and of joined validation digits read as several."""
    x_val, y_val = data["x_val"], data["y_val"]
    probabilities = np.asarray(model.predict(x_val, batch_size=1000, verbose=0))
    is_digit = y_val < NOT_A_DIGIT
    answers = probabilities.argmax(axis=1)
    digits_read = probabilities[is_digit, :NOT_A_DIGIT].argmax(axis=1)
    return {
        "val_accuracy": float((digits_read == y_val[is_digit]).mean()),
        "val_loss": log_loss(probabilities, y_val),
        "val_digits_refused": float(refused(probabilities)[is_digit].mean()),
        "val_drawn_digits_refused": float(
            refused(model.predict(data["x_val_drawn"], batch_size=1000, verbose=0)).mean()
        ),
        "val_not_digits_refused": float(refused(probabilities)[y_val == NOT_A_DIGIT].mean()),
        "val_several_digits_found": float(
            (answers[y_val == SEVERAL_DIGITS] == SEVERAL_DIGITS).mean()
        ),
    }


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--not-digits", type=Path, default=Path("data/prepared/not_digits.npz"))
    parser.add_argument("--corrections", type=Path, help="users' accepted corrections (npz)")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--history", type=Path, default=Path("reports/train_history.csv"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # A stopped stage (SIGTERM from a scheduler, Ctrl-C) ends its MLflow run as KILLED, so the
    # package stage never mistakes a half-trained model for a candidate.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    params = tracking.load_params(args.params)
    settings = TrainSettings.from_params(params["train"])
    data_paths = (args.data, args.not_digits, args.corrections)
    data = load_data(*data_paths, settings)
    data_hash = file_md5(args.data)

    lineage = tracking.lineage_tags(
        data_hash, tracking.corrections_hash(args.corrections), file_md5(args.not_digits)
    )
    datasets = {"mnist": args.data, "not_digits": args.not_digits}
    if args.corrections is not None:
        datasets["corrections"] = args.corrections
    with tracking.start_training_run(params, settings.precision, lineage, datasets) as run:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as workdir:
            members, epochs = train(data, settings, Path(workdir))
        seconds = time.perf_counter() - started
        model, temperature, shift = calibrated_model(members, data, settings.max_digit_refusal)
        images = settings.members * settings.epochs * len(data["x_train"])
        summary = {
            **validation_scores(model, data),
            "temperature": round(temperature, 4),
            "not_a_digit_shift": round(shift, 4),
            "parameters": model.count_params(),
            "data_hash": data_hash,
            "preprocessing_version": PREPROCESSING_VERSION,
        }
        timing = {
            "train_seconds": round(seconds, 1),
            "images_per_second": round(images / seconds, 1),
        }
        mlflow.log_metrics({**timing, **tracking.train_scores(summary)})
        tracking.save_keras_reproducibly(model, args.model)
        mlflow.set_tag(tracking.MODEL_MD5_TAG, file_md5(args.model))
        tracking.log_keras_model(model, load_prepared(args.data)["x_val"][:2])
        tracking.write_csv(epochs.history, args.history)
        tracking.write_json(summary, args.metrics)
    log.info(
        "trained in %.0f s (%.0f images/s): val_accuracy %.4f, run %s",
        seconds,
        timing["images_per_second"],
        summary["val_accuracy"],
        run.info.run_id,
    )


if __name__ == "__main__":
    main()
