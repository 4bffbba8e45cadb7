"""The line reader's contract: a drawing as one strip, and the strip's frames as digits.

Cutting touching or overlapping digits apart fails where no cut separates them: the pieces then
hold no one digit each. The line reader (a small CNN with a CTC head, trained by
`pipelines.train_lines`) reads the whole line at once instead, left to right, one output frame
per LINE_STRIDE columns of the strip: for each frame, "nothing new here" (BLANK), a digit, or
something that is not a digit. Training, evaluation and the service all turn ink into a strip
with `line_input` and its frames into digits with `read_line`, so they agree;
`pipelines.segmentation` decides when a drawing needs it and turns what it reads into marks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.preprocessing import INK_THRESHOLD, LABELS, NOT_A_DIGIT, NoDigitError

LINE_HEIGHT = 32  # the strip's rows
LINE_WIDTH = 256  # and columns: room for eight digits of LINE_INK_HEIGHT side by side
LINE_INK_HEIGHT = 22  # the mark's ink is scaled to this height, about an MNIST digit's 20 rows
LINE_LEFT = 4  # blank columns kept before (and at least after) the ink
LINE_STRIDE = 4  # strip columns per output frame
LINE_BUCKET = 64  # strips are read cut to a multiple of this many columns past their ink
LINE_FRAMES = LINE_WIDTH // LINE_STRIDE
BLANK = 0  # the reader's output class for "nothing new here"; class d + 1 is the digit d,
LINE_CLASSES = len(LABELS) + 2  # and the last, NOT_A_DIGIT + 1, a mark that is not a digit


@dataclass(frozen=True)
class LineInput:
    """A mark as the line reader sees it, and how to find its columns again."""

    pixels: np.ndarray  # (LINE_HEIGHT, LINE_WIDTH) float32 in [0, 1]
    scale: float  # strip pixels per pixel of the mark
    ink_left: int  # the mark's column shown at the strip's column LINE_LEFT
    ink_width: int  # the mark's columns from ink_left to its last ink

    def mark_column(self, strip_column: float) -> float:
        """The mark's column a strip column shows, clipped to the mark's ink."""
        column = self.ink_left + (strip_column - LINE_LEFT) / self.scale
        return float(np.clip(column, self.ink_left, self.ink_left + self.ink_width))

    @property
    def width(self) -> int:
        """The strip's columns that matter (`strip_widths`)."""
        return int(strip_widths(self.pixels[np.newaxis])[0])


@dataclass(frozen=True)
class LineDigit:
    """One thing the line reader read: a digit or not a digit, how sure, and where."""

    probabilities: np.ndarray  # (11,): the ten digits and NOT_A_DIGIT at its surest frame
    centre: float  # the mark's column where the reader saw it (anywhere in its span)

    @property
    def digit(self) -> int:
        """The digit, or NOT_A_DIGIT: a letter, a symbol, a scribble."""
        return int(np.argmax(self.probabilities))

    @property
    def is_digit(self) -> bool:
        return self.digit != NOT_A_DIGIT


def strip_widths(strips: np.ndarray) -> np.ndarray:
    """The columns that matter of each (N, LINE_HEIGHT, LINE_WIDTH) strip: its ink and LINE_LEFT
    blank columns after it, rounded up to a multiple of LINE_BUCKET. The reader reads
    `strip[:, :width]` as it reads the whole, and costs less: most numbers are short."""
    inked = (strips > 0).any(axis=1)
    last = np.where(inked.any(axis=1), inked.shape[1] - 1 - inked[:, ::-1].argmax(axis=1), 0)
    needed = last + 1 + LINE_LEFT
    return np.minimum(-(-needed // LINE_BUCKET) * LINE_BUCKET, strips.shape[2])


def line_input(mark: np.ndarray) -> LineInput:
    """A mark's ink (any size, in [0, 1]) as a strip: its ink box scaled to LINE_INK_HEIGHT rows
    (or narrower, to fit the strip), centred in height, LINE_LEFT columns from the left.
    Raises NoDigitError when no pixel is ink."""
    solid = np.asarray(mark) >= INK_THRESHOLD
    rows, cols = np.flatnonzero(solid.any(axis=1)), np.flatnonzero(solid.any(axis=0))
    if len(rows) == 0:
        raise NoDigitError()
    ink = np.asarray(mark, dtype=np.float32)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = ink.shape
    scale = min(LINE_INK_HEIGHT / height, (LINE_WIDTH - 2 * LINE_LEFT) / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(ink, mode="F").resize(size, Image.Resampling.BILINEAR)
    pixels = np.zeros((LINE_HEIGHT, LINE_WIDTH), np.float32)
    top = (LINE_HEIGHT - size[1]) // 2
    pixels[top : top + size[1], LINE_LEFT : LINE_LEFT + size[0]] = np.clip(resized, 0.0, 1.0)
    return LineInput(pixels, scale, int(cols[0]), width)


def read_line(probabilities: np.ndarray, line: LineInput) -> list[LineDigit]:
    """What a strip's (frames, LINE_CLASSES) output reads, left to right (greedy CTC: the most
    probable class per frame; a run of one class's frames is one digit, and a blank between
    two runs of the same digit makes it twice). Each gets the probabilities of its surest frame
    over everything but BLANK, and the mark's column at the middle of its run."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    best = probabilities.argmax(axis=-1)
    runs = [
        (int(label), [frame for frame, _ in group])
        for label, group in itertools.groupby(enumerate(best), key=lambda item: item[1])
        if label != BLANK
    ]
    digits = []
    for label, frames in runs:
        peak = max(frames, key=lambda frame: probabilities[frame, label])
        row = probabilities[peak, BLANK + 1 :]
        centre = line.mark_column((np.mean(frames) + 0.5) * LINE_STRIDE)
        digits.append(LineDigit((row / max(float(row.sum()), 1e-12)).astype(np.float32), centre))
    return digits


def line_text(digits: list[LineDigit]) -> str:
    """The digits as text, '?' for each that is not a digit."""
    return "".join(str(d.digit) if d.is_digit else "?" for d in digits)
