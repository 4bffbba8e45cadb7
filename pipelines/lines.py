"""The line reader's contract: a mark of touching digits as one strip, and what it reads there.

Cutting touching or overlapping digits apart (`pipelines.segmentation`) fails where no cut
separates them: the pieces then hold no one digit each. The line reader (a small CNN with a
CTC head, `pipelines.model.build_line_reader`) reads the whole mark at once instead, left to
right, one output frame per LINE_STRIDE columns of the strip: for each frame, "no new digit"
(BLANK) or a digit. Training (`pipelines.train`), evaluation and the service all turn a mark
into a strip with `line_input` and its frames into digits with `read_line`, so they agree.
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

    def mark_column(self, strip_column: float) -> int:
        """The mark's column a strip column shows, clipped to the mark's ink."""
        column = self.ink_left + (strip_column - LINE_LEFT) / self.scale
        return int(np.clip(round(column), self.ink_left, self.ink_left + self.ink_width))


@dataclass(frozen=True)
class LineDigit:
    """One digit the line reader read: which, how sure, and the mark's columns it owns."""

    digit: int  # or NOT_A_DIGIT: a letter, a symbol, a scribble
    probabilities: np.ndarray  # (10,) the digits' probabilities at the frame that reads it
    columns: tuple[int, int]  # [start, stop) of the mark's columns, between its neighbours'

    @property
    def is_digit(self) -> bool:
        return self.digit != NOT_A_DIGIT


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
    """The digits in a strip's (LINE_FRAMES, LINE_CLASSES) output, left to right (greedy CTC:
    the most probable class per frame; a run of one digit's frames is one digit, and a blank
    between two runs of the same digit makes it twice).

    Each digit's probabilities are those of its most confident frame, over the ten digits. Its
    columns run from halfway to the digit before to halfway to the one after (the mark's
    edges for the first and last): where the reader places the change from one to the next.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    best = probabilities.argmax(axis=-1)
    runs: list[list[int]] = []
    previous = BLANK
    for frame, label in enumerate(best):
        if label != BLANK:
            if label == previous:
                runs[-1].append(frame)
            else:
                runs.append([frame])
        previous = label
    centres = []
    digits = []
    for frames in runs:
        label = int(best[frames[0]])
        peak = max(frames, key=lambda frame: probabilities[frame, label])
        row = probabilities[peak, BLANK + 1 : BLANK + 1 + len(LABELS)]
        digits.append((label - 1, row / max(float(row.sum()), 1e-12)))
        centres.append((np.mean(frames) + 0.5) * LINE_STRIDE)
    edges = [float(LINE_LEFT)]
    edges += [(left + right) / 2 for left, right in itertools.pairwise(centres)]
    edges.append(LINE_LEFT + line.ink_width * line.scale)
    return [
        LineDigit(
            digit,
            row.astype(np.float32),
            (line.mark_column(edges[index]), line.mark_column(edges[index + 1])),
        )
        for index, (digit, row) in enumerate(digits)
    ]
