"""Drawings as people make them on the page's canvas, simulated from MNIST digits.

The model is trained on MNIST's 28x28 images, but users draw on a canvas: strokes thicker or
thinner, digits small or off-centre, a transparent background, and, for a whole number, digits
of uneven size on an uneven baseline that sometimes touch or overlap their neighbours. The
evaluate stage draws MNIST *test* digits this way and reads them back through
`pipelines.preprocessing`, the functions the service uses, so it measures what users get while
knowing the truth exactly: every digit's label and where its ink is.

Single digits follow a `CanvasStyle` (`render_on_canvas`); numbers are laid out left to right by
`render_number`. Both draw with `glyph`, which scales an MNIST digit the way the page would show
it, and `canvas_image`, which turns ink into the image the page sends. `redraw_with_pens` draws a
digit (or any model input) again along its centre line (`centre_lines`) with a round pen of even
width, the way the non-digit drawings are prepared, and as a marker or a drawing program's brush
draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.download import centres_to_inputs, skeleton
from pipelines.preprocessing import DIGIT_BOX, IMAGE_SIZE, INK_THRESHOLD
from pipelines.segmentation import Box

BACKGROUNDS = ("white", "transparent", "black")
INK_LEVEL = round(INK_THRESHOLD * 255)  # a pixel at least this dark counts as ink when reading
JOINS = ("gap", "touching", "overlapping")  # how a digit meets the one before it
# How numbers are drawn (fractions of the number's digit size, its 20-pixel box in MNIST terms).
NUMBER_HEIGHT = (0.3, 0.65)  # digit size as a share of the canvas height, drawn uniformly
SIZE_JITTER = 0.12  # each digit is up to 12% larger or smaller than the number's size
BASELINE_JITTER = 0.08  # each digit's bottom wanders up or down by up to 8% of the size
GAP = (0.12, 0.5)  # blank columns between separate digits; narrower gaps vanish when the
# reader shrinks an 840-pixel canvas fourfold, so they would be touching digits in disguise
OVERLAP = (0.03, 0.12)  # how far an overlapping digit is pushed into its neighbour
STROKE = (-0.5, 1.0)  # pen width change in MNIST pixels (see CanvasStyle.stroke)
NUMBER_MARGIN = 0.04  # blank border kept around a number, as a share of the canvas height
# The oracle's notion of "this crop is that digit" (see RenderedNumber.digit_in).
WHOLE_SHARE = 0.8  # at least this share of the digit's ink is inside the crop
STRAY_SHARE = 0.2  # other digits have at most this share of their ink inside,
TIP_SHARE = 0.5  # or at most this share when it is at most STRAY_SHARE of the ink inside
REDRAW_SCALE = 4  # an input is enlarged this much before its centre line is found: a smooth line


@dataclass(frozen=True)
class CanvasStyle:
    """How a test digit is drawn on the simulated pad."""

    box_fraction: float  # the digit's longer side as a fraction of the pad side
    stroke: float  # >0 thickens, <0 thins, in units of one MNIST pixel at the drawn scale
    off_centre: bool  # placed anywhere on the pad instead of near the middle
    background: str  # "white", "transparent" or "black"


CANVAS_STYLES = {
    "centred": CanvasStyle(0.6, 0.0, False, "white"),
    "thick": CanvasStyle(0.6, 1.2, False, "white"),
    "thin": CanvasStyle(0.6, -0.8, False, "white"),
    "small": CanvasStyle(0.2, 0.0, True, "white"),
    "large": CanvasStyle(0.95, 0.0, False, "white"),
    "off_centre": CanvasStyle(0.45, 0.0, True, "white"),
    "transparent": CanvasStyle(0.6, 0.0, True, "transparent"),
    "dark": CanvasStyle(0.6, 0.5, True, "black"),
}


def glyph(digit: np.ndarray, box: float, stroke: float) -> np.ndarray:
    """A 28x28 uint8 MNIST digit scaled so its 20-pixel box spans `box` pixels, its pen widened
    (stroke > 0) or narrowed (stroke < 0) by `stroke` MNIST pixels: (side, side) uint8 ink, with
    the digit's box starting round(4 * box / 20) pixels into it, as in MNIST's frame."""
    scale = box / DIGIT_BOX
    side = round(IMAGE_SIZE * scale)
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR))
    width = round(abs(stroke) * scale)
    if width >= 2:
        morphology = ndimage.grey_dilation if stroke > 0 else ndimage.grey_erosion
        ink = morphology(ink, size=(width, width))
    return ink


def glyphs_in_slots(glyphs: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """28x28 glyphs (light ink on black) left to right on one line of `size` (width, height),
    each scaled up smoothly in its own equal slot, at most 3/4 of the height, so that
    neighbours never touch: a number with exact, known boxes. Returns the uint8 ink."""
    width, height = size
    slot = width // len(glyphs)
    side = min(height * 3 // 4, slot)
    ink = np.zeros((height, width), dtype=np.uint8)
    for position, digit in enumerate(glyphs):
        scaled = Image.fromarray(np.asarray(digit, dtype=np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR
        )
        left, top = position * slot + (slot - side) // 2, (height - side) // 2
        ink[top : top + side, left : left + side] = np.asarray(scaled)
    return ink


def canvas_image(ink: np.ndarray, background: str) -> Image.Image:
    """Ink (uint8, 255 = full ink) as the image the page sends: dark strokes on white, opaque
    strokes on a transparent canvas (RGBA), or light strokes on black."""
    if background == "transparent":
        rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
        rgba[..., 3] = ink
        return Image.fromarray(rgba, mode="RGBA")
    if background == "black":
        return Image.fromarray(ink, mode="L")
    if background == "white":
        return Image.fromarray(255 - ink, mode="L")
    raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")


def render_on_canvas(
    digit: np.ndarray, style: CanvasStyle, size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw a 28x28 uint8 MNIST digit on a size x size pad the way a person would."""
    box = max(8, round(size * style.box_fraction))
    ink = glyph(digit, box, style.stroke)
    side = len(ink)
    pad = np.zeros((size + 2 * side, size + 2 * side), dtype=np.uint8)
    slack = size - box
    if style.off_centre:
        top, left = rng.integers(0, max(slack, 0) + 1, size=2)
    else:
        top, left = rng.integers(slack // 2 - size // 20, slack // 2 + size // 20 + 1, size=2)
    # The digit's 20-pixel box starts 4 MNIST pixels into its 28-pixel frame.
    margin = round(4 * box / DIGIT_BOX)
    row, col = side + top - margin, side + left - margin
    pad[row : row + side, col : col + side] = np.maximum(
        pad[row : row + side, col : col + side], ink
    )
    return canvas_image(pad[side : side + size, side : side + size], style.background)


@dataclass(frozen=True)
class RenderedNumber:
    """A number drawn on a canvas, with the truth about each digit: its label, its ink and where
    that ink is (`origins[i]` is the canvas (x, y) of `inks[i]`'s top-left pixel)."""

    image: Image.Image
    labels: tuple[int, ...]
    joins: tuple[str, ...]  # joins[i] is how digit i+1 meets digit i: one of JOINS
    inks: tuple[np.ndarray, ...]  # each digit's own uint8 ink, cropped to where it is non-zero
    origins: tuple[tuple[int, int], ...]

    @property
    def text(self) -> str:
        return "".join(map(str, self.labels))

    @property
    def boxes(self) -> list[Box]:
        """Each digit's box as a reader sees it: the pixels at least INK_THRESHOLD dark."""
        boxes = []
        for ink, (x, y) in zip(self.inks, self.origins, strict=True):
            rows = np.flatnonzero((ink >= INK_LEVEL).any(axis=1))
            cols = np.flatnonzero((ink >= INK_LEVEL).any(axis=0))
            boxes.append(
                Box(
                    x + int(cols[0]),
                    y + int(rows[0]),
                    len(range(cols[0], cols[-1] + 1)),
                    len(range(rows[0], rows[-1] + 1)),
                )
            )
        return boxes

    def ink_in(self, box: Box) -> np.ndarray:
        """How much of each digit's ink lies inside `box` (canvas pixels): (n,) sums of ink."""
        amounts = np.zeros(len(self.inks))
        for index, (ink, (x, y)) in enumerate(zip(self.inks, self.origins, strict=True)):
            left, top = max(box.x - x, 0), max(box.y - y, 0)
            right = min(box.x + box.width - x, ink.shape[1])
            bottom = min(box.y + box.height - y, ink.shape[0])
            if right > left and bottom > top:
                amounts[index] = float(ink[top:bottom, left:right].sum(dtype=np.float64))
        return amounts

    def shares_in(self, box: Box) -> np.ndarray:
        """The share of each digit's ink that lies inside `box` (canvas pixels): (n,) floats."""
        totals = np.array([ink.sum(dtype=np.float64) for ink in self.inks])
        return self.ink_in(box) / totals

    def present_in(self, box: Box) -> np.ndarray:
        """Which digits a crop holds a real part of: (n,) bools. A digit is in when more than
        STRAY_SHARE of its ink is inside, unless that is at most TIP_SHARE of it and at most
        STRAY_SHARE of the ink inside: the tip of a slanted 1 reaching over its neighbour."""
        shares = self.shares_in(box)
        amounts = self.ink_in(box)
        parts = amounts / max(float(amounts.sum()), 1.0)
        tip = (shares <= TIP_SHARE) & (parts <= STRAY_SHARE)
        return (shares > STRAY_SHARE) & ~tip

    def digit_in(self, box: Box) -> int | None:
        """Which digit (its position in the number) a crop holds: one with at least WHOLE_SHARE
        of its ink inside and no other digit in it (see present_in); None for a piece of a
        digit, or several digits."""
        shares = self.shares_in(box)
        best = int(np.argmax(shares))
        if shares[best] >= WHOLE_SHARE and self.present_in(box).sum() == 1:
            return best
        return None


def render_number(
    digits: np.ndarray,
    labels: np.ndarray,
    canvas: tuple[int, int],
    touching: float,
    overlapping: float,
    rng: np.random.Generator,
) -> RenderedNumber:
    """Draw MNIST digits (n, 28, 28) uint8 as one number on a canvas (width, height).

    Each digit after the first touches the one before with probability `touching`, is pushed a
    little into it with probability `overlapping`, and otherwise follows after a gap. The size,
    pen, baseline and background vary per number and per digit within the ranges above; a number
    too wide for the canvas is drawn again smaller.
    """
    if len(digits) != len(labels) or len(digits) < 1:
        raise ValueError(
            f"need as many labels as digits, at least one: {len(digits)}, {len(labels)}"
        )
    if touching < 0 or overlapping < 0 or touching + overlapping > 1:
        raise ValueError(
            f"touching and overlapping are shares summing to at most 1: {touching}, {overlapping}"
        )
    width, height = canvas
    margin = round(NUMBER_MARGIN * height)
    size = rng.uniform(*NUMBER_HEIGHT) * height
    stroke = rng.uniform(*STROKE)
    background = str(rng.choice(["transparent", "white"]))
    joins = tuple(
        str(join)
        for join in rng.choice(
            ["touching", "overlapping", "gap"],
            p=[touching, overlapping, 1 - touching - overlapping],
            size=len(digits) - 1,
        )
    )
    while True:
        inks, origins = _lay_out(digits, joins, size, stroke, height - 2 * margin, rng)
        extent = max(x + ink.shape[1] for ink, (x, _) in zip(inks, origins, strict=True))
        if extent <= width - 2 * margin:
            break
        size *= 0.95 * (width - 2 * margin) / extent
    shift_x = margin + int(rng.integers(0, width - 2 * margin - extent + 1))
    origins = [(x + shift_x, y + margin) for x, y in origins]
    page = np.zeros((height, width), dtype=np.uint8)
    for ink, (x, y) in zip(inks, origins, strict=True):
        area = page[y : y + ink.shape[0], x : x + ink.shape[1]]
        np.maximum(area, ink, out=area)
    return RenderedNumber(
        canvas_image(page, background),
        tuple(int(label) for label in labels),
        joins,
        tuple(inks),
        tuple(origins),
    )


def _lay_out(
    digits: np.ndarray,
    joins: tuple[str, ...],
    size: float,
    stroke: float,
    height: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Place each digit's ink left to right in a band `height` pixels high, starting at x = 0.

    Returns the cropped inks and their (x, y) origins in the band. Touching digits are placed
    where their ink first meets the ink already drawn (8-connected: a pixel beside or diagonal
    to one), overlapping ones a few pixels further in, separate ones after a gap between boxes.
    """
    inks = []
    for digit in digits:
        drawn = glyph(digit, size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER), stroke)
        rows = np.flatnonzero(drawn.any(axis=1))
        cols = np.flatnonzero(drawn.any(axis=0))
        inks.append(drawn[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    # Bottoms sit on a common baseline, each wandering by its own jitter; the band's top is 0.
    bottoms = np.array(
        [rng.uniform(-BASELINE_JITTER, BASELINE_JITTER) * size for _ in inks]
    ).round()
    tops = bottoms - [ink.shape[0] for ink in inks]
    lowest, highest = tops.min(), bottoms.max()
    if highest - lowest > height:  # only for digits taller than the band: squeeze them in
        return _lay_out(
            digits, joins, size * 0.9 * height / (highest - lowest), stroke, height, rng
        )
    baseline = rng.uniform(-lowest, height - highest)
    tops = (tops + baseline).astype(int)
    rightmost = np.full(height, -np.inf)  # the rightmost ink column drawn so far, per row
    origins: list[tuple[int, int]] = []
    for index, (ink, top) in enumerate(zip(inks, tops, strict=True)):
        solid = ink >= INK_LEVEL
        if index == 0:
            x = 0
        elif joins[index - 1] == "gap":
            gap = rng.uniform(*GAP) * size
            previous_right = max(ox + inks[k].shape[1] for k, (ox, _) in enumerate(origins))
            x = previous_right + round(gap) - int(np.flatnonzero(solid.any(axis=0))[0])
        else:
            x = _touching_x(rightmost, solid, top)
            if joins[index - 1] == "overlapping":
                x -= max(1, round(rng.uniform(*OVERLAP) * size))
        origins.append((x, int(top)))
        inked = solid.any(axis=1)
        last = solid.shape[1] - 1 - solid[:, ::-1].argmax(axis=1)  # per row, where ink is
        band = rightmost[top : top + len(solid)]
        band[inked] = np.maximum(band[inked], x + last[inked])
    left = min(x for x, _ in origins)
    return inks, [(x - left, y) for x, y in origins]


def _touching_x(rightmost: np.ndarray, solid: np.ndarray, top: int) -> int:
    """The x at which ink `solid` (placed with its top at row `top`) first meets the ink drawn
    so far when slid in from the right: one of its pixels then sits beside or diagonally next to
    a drawn one, and none overlaps."""
    inked = np.flatnonzero(solid.any(axis=1))
    first = solid[inked].argmax(axis=1)  # per inked row, its first ink column
    beside = np.concatenate([[-np.inf], rightmost, [-np.inf]])  # rows above and below the band
    bands = top + inked + 1  # each inked row's place in `beside`
    near = np.maximum(np.maximum(beside[bands - 1], beside[bands]), beside[bands + 1])
    best = float((near + 1 - first).max()) if len(inked) else -np.inf
    if np.isinf(best):  # nothing drawn beside it (e.g. the band rows are empty): sit right after
        best = float(rightmost.max()) + 1 - int(np.flatnonzero(solid.any(axis=0))[0])
    return int(best)


def centre_lines(images: np.ndarray) -> np.ndarray:
    """The one-pixel centre lines of uint8 inputs (N, 28, 28), each with some pixel at least
    half dark, found on the input enlarged REDRAW_SCALE times: (N, 112, 112) booleans."""
    side = IMAGE_SIZE * REDRAW_SCALE
    if len(images) == 0:
        return np.zeros((0, side, side), dtype=bool)
    enlarged = np.stack(
        [
            np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
            for image in images
        ]
    )
    return skeleton(enlarged >= 128)


def redraw_with_pens(centres: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Centre lines (`centre_lines`) redrawn with round pens `widths` pixels of the 20-pixel box
    wide and read back through the preprocessing contract: float inputs in [0, 1]."""
    if len(centres) == 0:
        return np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    names = [f"image {index}" for index in range(len(centres))]
    return centres_to_inputs(list(centres), widths, names).astype(np.float32) / 255.0


def with_one_pen(glyphs: np.ndarray, width: float) -> np.ndarray:
    """uint8 digits (n, 28, 28) redrawn along their centre lines with one round pen `width`
    pixels of the 20-pixel box wide, as a number drawn on the pad is: the pad's brush is round
    and even, MNIST's scanned pen strokes are not. Digits without ink to redraw stay as they
    are."""
    inked = (glyphs >= 128).any(axis=(1, 2))  # a centre line to redraw
    redrawn = glyphs.copy()
    if inked.any():
        pens = np.full(int(inked.sum()), width)
        drawn = redraw_with_pens(centre_lines(glyphs[inked]), pens)
        redrawn[inked] = np.round(drawn * 255).astype(np.uint8)
    return redrawn
