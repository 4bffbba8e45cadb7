"""The contract between training, evaluation and serving: the model's input and how any image
becomes it.

MNIST digits were made by fitting each digit into a 20x20 box (aspect ratio kept, anti-aliased)
and placing that box in a 28x28 frame so that the ink's centre of mass sits in the middle. A
drawing from a canvas looks nothing like that until it goes through the same steps, so this
module repeats them for any image: find the ink (on a light, dark or transparent background),
ignore specks, crop, fit into 20x20, centre by mass. The service calls `image_to_input` on every
request and evaluation calls it on canvas-like renderings of the test set; both import it from
here so the two can never drift apart.

How a drawing is split into marks (digits of a number, or not digits) is `pipelines.segmentation`.

Bump `PREPROCESSING_VERSION` whenever the output of this module changes for the same image: the
package stage only promotes models trained under the current version.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, ImageSequence

# v2: the model's input is unchanged, but it answers CLASSES (digits, then not a digit).
# v3: and then several digits.
# v4: the background may brighten or darken evenly across the image (a photographed page).
PREPROCESSING_VERSION = "mnist-box20-com-v4"
IMAGE_SIZE = 28
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
LABELS = tuple(range(10))  # class index i is the digit i
NOT_A_DIGIT = len(LABELS)  # the model's eleventh class: letters, symbols, scribbles
SEVERAL_DIGITS = len(LABELS) + 1  # its last: one mark of touching digits (split it, not refuse)
CLASSES = len(LABELS) + 2  # the model's outputs: the ten digits, NOT_A_DIGIT, SEVERAL_DIGITS
DIGIT_BOX = 20  # MNIST fits every digit into a 20x20 box inside the 28x28 frame

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP"})
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before any pixel is decoded
PNG_RGBA = 6  # the IHDR colour type of truecolour with alpha
MAX_WORKING_SIDE = 256  # larger images are box-averaged down first: same result, far less work
INK_THRESHOLD = 0.2  # a pixel is ink when it differs from the background by 20% of full range
MIN_CONTRAST = 0.15  # below this the image is blank (uniform, or only compression noise)
SPECK_FRACTION = 0.02  # ink blobs holding less than 2% of all ink are specks, not strokes
MIN_INK_PIXELS = 4  # fewer ink pixels than this is not a digit
PAPER_RANK = 80  # a side of the border is paper at this percentile of its shades (from the ink's
# end): the median, half of a large digit's edge that touched the side made it a shadow
MAX_SHADING = 0.2  # a side further than this from the whole border's median is ink (a stroke
# running along a tightly cropped edge), not the page's shading


class ImageError(ValueError):
    """An image that cannot become model input. `reason` is a short machine-readable code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoDigitError(ImageError):
    """The image decodes fine but holds no digit (blank, or only specks)."""

    def __init__(self, message: str = "no digit found in the image") -> None:
        super().__init__(message, reason="no_digit")


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes strictly: known formats only, size checked before decoding.

    Animated images (GIF, APNG, WebP) are read from their first frame.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image is too large: {error}", reason="too_large") from error
    except Exception as error:  # Pillow raises many types for unreadable bytes
        raise ImageError("the data is not a readable image", reason="not_an_image") from error
    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(
            f"unsupported image format {image.format}; use one of {sorted(ACCEPTED_FORMATS)}",
            reason="unsupported_format",
        )
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted",
            reason="too_large",
        )
    try:
        if _is_plain_rgba_png(data, image):
            return Image.fromarray(pyspng.load(data, format="RGBA"), mode="RGBA")
        first_frame = next(ImageSequence.Iterator(image))
        first_frame.load()
    except Exception as error:  # truncated or corrupt pixel data
        raise ImageError(
            "the image data is truncated or corrupt", reason="corrupt_image"
        ) from error
    return first_frame


def _is_plain_rgba_png(data: bytes, image: Image.Image) -> bool:
    """Whether the bytes are the page's own PNG (`canvas.toDataURL()`), whole: 8-bit RGBA, not
    interlaced, not animated, every chunk matching its checksum. libspng decodes those twice
    as fast as Pillow, pixel for pixel the same (tested); Pillow decodes everything else, and
    refuses what is damaged."""
    if image.format != "PNG" or getattr(image, "is_animated", False) or len(data) < 29:
        return False
    bit_depth, colour_type, interlace = data[24], data[25], data[28]  # from the IHDR chunk
    return bit_depth == 8 and colour_type == PNG_RGBA and interlace == 0 and _chunks_intact(data)


def _chunks_intact(png: bytes) -> bool:
    """Whether every chunk up to IEND is complete and matches its CRC (pyspng checks none)."""
    view = memoryview(png)
    position = 8  # after the signature
    while position + 12 <= len(png):
        length = int.from_bytes(view[position : position + 4])
        end = position + 8 + length
        if end + 4 > len(png):
            return False
        kind = view[position + 4 : position + 8]
        if zlib.crc32(view[position + 8 : end], zlib.crc32(kind)) != int.from_bytes(
            view[end : end + 4]
        ):
            return False
        if kind == b"IEND":
            return True
        position = end + 4
    return False


def ink_map(image: Image.Image) -> np.ndarray:
    """Return a float32 array in [0, 1] where 1 is full ink and 0 is background.

    Transparency, when present, is the ink (a canvas draws opaque strokes on a transparent
    background, whatever their colour). Otherwise the background is taken from the border and
    ink is whatever differs from it, so dark-on-light and light-on-dark both work.
    """
    if image.mode in ("RGBA", "LA"):  # the canvas case: shrink just the alpha channel
        opacity = np.asarray(_shrink(image.getchannel("A")), dtype=np.float32) / 255.0
        alpha = _alpha_ink(opacity)
        if alpha is not None:
            return alpha
        if opacity.min() == 1.0:  # opaque (the page's white pad): the colours alone draw
            return _colour_ink(_shrink(image.convert(image.mode[:-1])))
    image = _shrink(image)
    if _has_transparency(image):
        alpha = _alpha_ink(np.asarray(image.convert("RGBA").getchannel("A")) / np.float32(255.0))
        if alpha is not None:
            return alpha
        image = image.convert("RGBA").convert("RGB")
    return _colour_ink(image)


def _colour_ink(image: Image.Image) -> np.ndarray:
    """Ink as the distance from the background, which the border gives: its median, brightening
    or darkening evenly from one side to the other as the sides' paper does (a page photographed
    under uneven light; a uniform background has none)."""
    gray = _grayscale(image)
    return np.abs(gray - _background(gray)).astype(np.float32)


def _background(gray: np.ndarray) -> np.ndarray | float:
    """The paper's shade at every pixel: the plane through the border's median whose slope
    across and down is that of the sides' paper (each side's PAPER_RANK shade from the ink's
    end, so strokes may cover most of a side; a side still further than MAX_SHADING from the
    border's median counts as the median); one shade for all when the border is even."""
    height, width = gray.shape
    sides = gray[0], gray[-1], gray[:, 0], gray[:, -1]
    edge = np.concatenate(sides)
    border = float(np.median(edge))
    if edge.min() == edge.max():  # a drawing program's blank page
        return border
    rank = PAPER_RANK if border >= 0.5 else 100 - PAPER_RANK  # dark ink on light paper, or not
    top, bottom, left, right = (float(np.percentile(pixels, rank)) for pixels in sides)

    def shading(start: float, end: float, length: int) -> float:
        if max(abs(start - border), abs(end - border)) > MAX_SHADING:
            return 0.0
        return (end - start) / max(length - 1, 1)

    across, down = shading(left, right, width), shading(top, bottom, height)
    if across == 0.0 and down == 0.0:
        return border
    columns = np.arange(width, dtype=np.float32) - (width - 1) / 2
    rows = np.arange(height, dtype=np.float32)[:, np.newaxis] - (height - 1) / 2
    return border + across * columns + down * rows


def _alpha_ink(alpha: np.ndarray) -> np.ndarray | None:
    """Opacity in [0, 1] as ink, or None when it is (nearly) uniform and says nothing."""
    alpha = alpha.astype(np.float32, copy=False)
    if alpha.max() - alpha.min() < MIN_CONTRAST:
        return None
    return alpha - alpha.min()


def ink_to_input(ink: np.ndarray, strokes: Strokes | None = None) -> np.ndarray:
    """Turn an ink map of any size into a 28x28 MNIST-style float32 image in [0, 1].

    `strokes`, when the caller has them, are `find_strokes(ink)` of this very ink, whose
    strongest pixel is 1: they are not looked for again.
    """
    ink = finite_float32(ink)
    contrast = float(ink.max()) if ink.size else 0.0
    if contrast < MIN_CONTRAST:
        raise NoDigitError()
    ink = ink / contrast
    rows, cols = _digit_bounds(strokes or find_strokes(ink))
    digit = _fit_into_box(ink[rows, cols])
    return _place_by_centre_of_mass(digit)


def finite_float32(ink: np.ndarray) -> np.ndarray:
    """`ink` as float32, NaN as 0 and infinities as the largest floats (`np.nan_to_num`), which
    copies it only when some value is not finite."""
    ink = np.asarray(ink, dtype=np.float32)
    return ink if np.isfinite(ink).all() else np.nan_to_num(ink)


def image_to_input(image: Image.Image) -> np.ndarray:
    """The whole contract: any decoded image to the model's 28x28 input."""
    return ink_to_input(ink_map(image))


def bytes_to_input(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode image bytes and preprocess them; raises ImageError for anything unusable."""
    return image_to_input(decode_image(data, max_pixels=max_pixels))


def as_batch(images: np.ndarray) -> np.ndarray:
    """Shape (N, 28, 28) images in [0, 1] as the model's (N, 28, 28, 1) float32 input."""
    return np.asarray(images, dtype=np.float32).reshape((-1, *INPUT_SHAPE))


def refused(probabilities: np.ndarray) -> np.ndarray:
    """Whether the model's answer (..., CLASSES) is no single digit: not a digit, or several."""
    return np.argmax(probabilities, axis=-1) >= NOT_A_DIGIT


def not_one_digit(probabilities: np.ndarray) -> np.ndarray:
    """The probability that an input is no single digit: the score that decides a refusal."""
    return np.asarray(probabilities)[..., NOT_A_DIGIT:].sum(axis=-1)


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _grayscale(image: Image.Image) -> np.ndarray:
    """Grayscale in [0, 1] for any mode, including 16- and 32-bit ones Pillow cannot map to L."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if values.max(initial=0) <= 65535 else float(values.max())
        return np.clip(values / full_scale, 0.0, 1.0).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def shrink_factor(size: tuple[int, int]) -> int:
    """How many sent pixels one pixel of the ink map stands for (see _shrink)."""
    return max(1, -(-max(size) // MAX_WORKING_SIDE))


def _shrink(image: Image.Image) -> Image.Image:
    """Box-average big images down by an integer factor so the working side is at most 256."""
    factor = shrink_factor(image.size)
    if factor <= 1:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow's own conversion clips 16-bit values above 255 to white; scale them instead.
        image = Image.fromarray(np.round(_grayscale(image) * 255).astype(np.uint8), mode="L")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if _has_transparency(image) else "RGB")
    return image.reduce(factor)


@dataclass(frozen=True)
class Strokes:
    """An ink map's strokes: its groups of touching ink pixels (diagonals touch), numbered 1, 2,
    ... in raster order, 0 being the background, with how much ink and how many pixels each
    holds (index 0 unused)."""

    labels: np.ndarray
    count: int
    masses: np.ndarray
    pixels: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        """Which numbers are strokes rather than specks (blobs holding under SPECK_FRACTION of
        all ink)."""
        return self.masses >= SPECK_FRACTION * self.masses.sum()


def find_strokes(ink: np.ndarray) -> Strokes:
    """The strokes of an ink map in [0, 1]; raises NoDigitError when it has no ink."""
    labels, count = label_strokes(ink >= INK_THRESHOLD)
    if count == 0:
        raise NoDigitError()
    masses = np.bincount(labels.ravel(), weights=ink.ravel(), minlength=count + 1)
    masses[0] = 0.0  # the background
    return Strokes(labels, count, masses, np.bincount(labels.ravel(), minlength=count + 1))


def _digit_bounds(strokes: Strokes) -> tuple[slice, slice]:
    """Bounding box of the strokes, ignoring the specks."""
    kept = strokes.kept
    if strokes.pixels[kept].sum() < MIN_INK_PIXELS:
        raise NoDigitError()
    inked = kept[strokes.labels]
    row_hits = np.flatnonzero(inked.any(axis=1))
    col_hits = np.flatnonzero(inked.any(axis=0))
    return slice(row_hits[0], row_hits[-1] + 1), slice(col_hits[0], col_hits[-1] + 1)


def label_strokes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Number the groups of touching pixels (diagonals touch) of a boolean mask 1, 2, ... in the
    order a raster scan meets them, 0 being the background: `scipy.ndimage.label` with a 3x3
    structure, label for label, written here so the server's image needs no SciPy.

    It works on runs (a row's consecutive pixels) rather than pixels: runs in neighbouring rows
    touch when their columns overlap or meet at a corner, and linked runs are merged by pointing
    each at the smallest run of its group, so a group's number follows its first run."""
    height, width = mask.shape
    stride = width + 1  # each row behind one empty column, so no run crosses into the next row
    padded = np.zeros((height, stride), dtype=bool)
    padded[:, 1:] = mask
    flat = padded.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = changes[0::2], changes[1::2]  # flat positions; `ends` one past each run
    if len(ends) < len(starts):  # the last run reaches the end of the last row
        ends = np.append(ends, flat.size)
    labels = np.zeros((height, stride), dtype=np.int32)
    if len(starts) == 0:
        return labels[:, 1:].copy(), 0
    upper, lower = _touching_runs(starts, ends, stride)
    group = _smallest_linked(len(starts), upper, lower)
    firsts, numbers = np.unique(group, return_inverse=True)
    labels.ravel()[flat] = np.repeat(numbers + 1, ends - starts)
    return labels[:, 1:].copy(), len(firsts)


def _touching_runs(
    starts: np.ndarray, ends: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (run above, run below) of runs in neighbouring rows that touch, diagonals included,
    from the runs' flat positions in rows `stride` long. Runs are disjoint and in raster order,
    so the runs touching one in the row below are consecutive."""
    first = np.searchsorted(ends, starts - stride, side="left")  # ends at or after our start
    last = np.searchsorted(starts, ends - stride, side="right")  # starts at or before our end
    counts = np.clip(last - first, 0, None)
    lower = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first, counts) + offsets, lower


def _smallest_linked(count: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """For each of `count` nodes, the smallest node it is linked to through the pairs
    (left[i], right[i]): hook every group onto its smallest member, halve the paths, repeat."""
    parent = np.arange(count)
    while True:
        ours, theirs = parent[left], parent[right]
        if np.array_equal(ours, theirs):
            return parent
        lower = np.minimum(ours, theirs)
        np.minimum.at(parent, ours, lower)
        np.minimum.at(parent, theirs, lower)
        while not np.array_equal(parent[parent], parent):
            parent = parent[parent]


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, column) of the ink's centre of mass, as `scipy.ndimage.center_of_mass` gives it."""
    rows = np.arange(image.shape[0], dtype=np.float64)[:, np.newaxis]
    columns = np.arange(image.shape[1], dtype=np.float64)[np.newaxis, :]
    total = image.sum()
    return float((image * rows).sum() / total), float((image * columns).sum() / total)


def _fit_into_box(digit: np.ndarray) -> np.ndarray:
    """Scale so the longer side is 20 pixels, aspect ratio kept, anti-aliased; max ink is 1."""
    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(digit.astype(np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS, reducing_gap=None if scale > 0.5 else 2.0
    )
    boxed = np.clip(np.asarray(resized, dtype=np.float32), 0.0, None)
    peak = float(boxed.max())
    return boxed / peak if peak > 0 else boxed


def _place_by_centre_of_mass(digit: np.ndarray) -> np.ndarray:
    """Put the digit in a 28x28 frame with its centre of mass at the frame's centre."""
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    height, width = digit.shape
    centre_row, centre_col = _centre_of_mass(digit)
    top = int(np.clip(round(IMAGE_SIZE / 2 - centre_row), 0, IMAGE_SIZE - height))
    left = int(np.clip(round(IMAGE_SIZE / 2 - centre_col), 0, IMAGE_SIZE - width))
    frame[top : top + height, left : left + width] = digit
    return np.clip(frame, 0.0, 1.0)
