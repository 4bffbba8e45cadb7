"""The shared contract: any drawing becomes an MNIST-like 28x28 input, or a clear error."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from pipelines import preprocessing
from pipelines.download import read_idx
from pipelines.preprocessing import (
    ImageError,
    NoDigitError,
    bytes_to_input,
    decode_image,
    image_to_input,
    ink_map,
    ink_to_input,
    label_strokes,
)
from tests.helpers import SHARED_MNIST


@pytest.fixture(scope="module")
def mnist_test_images() -> np.ndarray:
    return read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")


def draw_seven(
    size: int = 280,
    box: tuple[int, int, int, int] = (80, 60, 200, 220),
    width: int = 18,
    ink: int | tuple = 0,
    background: int | tuple = 255,
    mode: str = "L",
) -> Image.Image:
    """A '7' drawn with two strokes inside box (left, top, right, bottom)."""
    image = Image.new(mode, (size, size), background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    draw.line(
        [(left, top), (right, top), (left + (right - left) // 3, bottom)], fill=ink, width=width
    )
    return image


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def assert_mnist_like(result: np.ndarray) -> None:
    assert result.shape == (28, 28)
    assert result.dtype == np.float32
    assert np.isfinite(result).all()
    assert result.min() >= 0.0 and result.max() <= 1.0
    assert result.max() == pytest.approx(1.0, abs=0.05)
    rows, cols = np.nonzero(result > 0.05)
    assert rows.max() - rows.min() + 1 <= 21 and cols.max() - cols.min() + 1 <= 21
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 18
    centre = ndimage.center_of_mass(result)
    assert centre == pytest.approx((14, 14), abs=1.0)


def test_a_drawing_becomes_an_mnist_like_digit():
    assert_mnist_like(image_to_input(draw_seven()))


@pytest.mark.parametrize(
    "box",
    [(10, 10, 55, 70), (210, 190, 270, 270), (35, 0, 245, 279), (130, 130, 145, 150)],
    ids=["top-left", "bottom-right", "huge", "tiny"],
)
def test_position_and_size_do_not_matter(box):
    width = max(2, round(18 * (box[3] - box[1]) / 160))  # the same stroke at a different scale
    reference = image_to_input(draw_seven())
    result = image_to_input(draw_seven(box=box, width=width))
    assert_mnist_like(result)
    assert np.abs(result - reference).mean() < 0.1


@pytest.mark.parametrize("width", [3, 40], ids=["thin", "thick"])
def test_stroke_width_keeps_the_digit_readable(width):
    assert_mnist_like(image_to_input(draw_seven(width=width)))


def test_transparent_canvas_reads_strokes_from_alpha():
    transparent = draw_seven(ink=(0, 0, 0, 255), background=(0, 0, 0, 0), mode="RGBA")
    white = draw_seven()
    np.testing.assert_allclose(image_to_input(transparent), image_to_input(white), atol=0.02)


def test_light_strokes_on_transparent_canvas_read_the_same():
    light = draw_seven(ink=(255, 255, 255, 255), background=(0, 0, 0, 0), mode="RGBA")
    np.testing.assert_allclose(image_to_input(light), image_to_input(draw_seven()), atol=0.02)


def test_dark_background_with_light_ink_reads_the_same():
    dark = draw_seven(ink=255, background=0)
    np.testing.assert_allclose(image_to_input(dark), image_to_input(draw_seven()), atol=0.02)


def shaded(image: Image.Image, across: float, down: float) -> Image.Image:
    """The drawing on paper that brightens by `across` grey levels from its left edge to its
    right one and `down` from its top to its bottom (a page photographed under uneven light)."""
    pixels = np.asarray(image, dtype=np.float64)
    height, width = pixels.shape
    light = (
        np.linspace(-across / 2, across / 2, width)
        + np.linspace(-down / 2, down / 2, height)[:, np.newaxis]
    )
    return Image.fromarray(np.clip(pixels + light, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("paper", [200, 255], ids=["grey", "white"])
def test_a_page_shaded_unevenly_reads_like_evenly_lit_paper(paper):
    even = draw_seven(ink=40, background=paper - 50)  # lit up to `paper`, never past white
    uneven = shaded(even, across=60.0, down=-40.0)
    np.testing.assert_allclose(image_to_input(uneven), image_to_input(even), atol=0.03)
    photo = Image.open(io.BytesIO(png_bytes(uneven.convert("RGB"), format="JPEG", quality=85)))
    np.testing.assert_allclose(image_to_input(photo), image_to_input(even), atol=0.08)


def test_a_stroke_along_a_tightly_cropped_edge_is_ink_not_shading():
    """A 7 cropped to its ink: its bar fills the top row, which is no lighting."""
    tight = draw_seven(box=(9, 12, 120, 160)).crop((0, 6, 130, 170))
    padded = Image.new("L", (200, 240), 255)  # under 256 pixels, as the crop: no shrinking
    padded.paste(tight, (40, 40))
    assert np.asarray(tight)[0].mean() < 128  # the top row is mostly ink
    np.testing.assert_allclose(image_to_input(tight), image_to_input(padded), atol=0.02)


def test_specks_do_not_move_the_crop():
    clean = draw_seven()
    speckled = clean.copy()
    draw = ImageDraw.Draw(speckled)
    for x, y in [(5, 5), (270, 8), (10, 265), (268, 270)]:
        draw.rectangle([x, y, x + 2, y + 2], fill=0)
    np.testing.assert_allclose(image_to_input(speckled), image_to_input(clean), atol=0.02)


@pytest.mark.parametrize("colour", [0, 255, 128], ids=["black", "white", "grey"])
def test_blank_images_have_no_digit(colour):
    with pytest.raises(NoDigitError):
        image_to_input(Image.new("L", (280, 280), colour))


def test_only_specks_is_no_digit():
    image = Image.new("L", (280, 280), 255)
    image.putpixel((100, 100), 0)
    with pytest.raises(NoDigitError):
        image_to_input(image)


def test_fully_transparent_canvas_has_no_digit():
    with pytest.raises(NoDigitError):
        image_to_input(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))


def test_mnist_digits_pass_through_almost_unchanged(mnist_test_images):
    images = mnist_test_images[:200].astype(np.float32) / 255.0
    differences = [np.abs(ink_to_input(image) - image).mean() for image in images]
    assert np.median(differences) < 0.01


@pytest.mark.parametrize(
    "mode, fmt", [("RGB", "JPEG"), ("P", "PNG"), ("1", "BMP"), ("CMYK", "JPEG"), ("LA", "WEBP")]
)
def test_other_modes_and_formats_decode_to_the_same_digit(mode, fmt):
    reference = image_to_input(draw_seven())
    result = bytes_to_input(png_bytes(draw_seven().convert(mode), format=fmt))
    assert np.abs(result - reference).mean() < 0.03


def test_sixteen_bit_png_reads_like_eight_bit():
    eight = np.asarray(draw_seven(), dtype=np.uint16) * 257
    sixteen = Image.fromarray(eight.astype(np.uint16))
    result = bytes_to_input(png_bytes(sixteen))
    np.testing.assert_allclose(result, image_to_input(draw_seven()), atol=0.02)


def test_large_sixteen_bit_png_keeps_its_grey_levels():
    big = draw_seven(size=600, box=(170, 130, 430, 470), width=30).filter(
        ImageFilter.GaussianBlur(8)  # soft, anti-aliased edges: grey levels that must survive
    )
    sixteen = Image.fromarray((np.asarray(big, dtype=np.uint16) * 257).astype(np.uint16))
    result = bytes_to_input(png_bytes(sixteen))
    np.testing.assert_allclose(result, image_to_input(big), atol=0.02)


def test_animated_gif_uses_its_first_frame():
    frames = [draw_seven(), Image.new("L", (280, 280), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    np.testing.assert_allclose(
        bytes_to_input(buffer.getvalue()), image_to_input(draw_seven()), atol=0.02
    )


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not_an_image"),
        (b"hello, this is text", "not_an_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not_an_image"),
    ],
    ids=["empty", "text", "svg"],
)
def test_non_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def test_unsupported_formats_are_rejected():
    with pytest.raises(ImageError) as caught:
        decode_image(png_bytes(draw_seven(), format="TIFF"))
    assert caught.value.reason == "unsupported_format"


def test_truncated_png_is_rejected():
    data = png_bytes(draw_seven())
    with pytest.raises(ImageError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.reason == "corrupt_image"


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = png_bytes(Image.new("1", (20000, 20000), 1), optimize=True)
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as caught:
        decode_image(bomb)
    assert caught.value.reason == "too_large"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "1", "I;16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_decodable_image_gives_valid_input_or_a_clear_error(width, height, mode, seed):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "1": 1, "I;16": 1}[mode]
    if mode == "I;16":
        pixels = rng.integers(0, 65536, size=(height, width), dtype=np.uint16)
        image = Image.fromarray(pixels)
    else:
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        base = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
        image = base.convert(mode)
    try:
        result = bytes_to_input(png_bytes(image))
    except ImageError as error:
        assert str(error)
        return
    assert result.shape == (28, 28)
    assert np.isfinite(result).all()
    assert result.min() >= 0.0 and result.max() <= 1.0


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_strokes_are_numbered_as_scipy_numbers_them(height, width, density, seed):
    """The server's image has no SciPy: its labelling must give SciPy's labels, number for
    number (8-connected, in raster order), on any mask."""
    mask = np.random.default_rng(seed).random((height, width)) < density
    expected, expected_count = ndimage.label(mask, structure=np.ones((3, 3)))
    labels, count = label_strokes(mask)
    assert count == expected_count
    assert np.array_equal(labels, expected)


def test_strokes_touching_only_at_a_corner_or_winding_back_are_one():
    mask = np.zeros((9, 9), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # a diagonal step
    mask[3:8, 2] = mask[3:8, 6] = mask[7, 2:7] = True  # a U: its arms meet only at the bottom
    mask[3, 8] = True  # alone
    labels, count = label_strokes(mask)
    assert count == 3
    assert labels[0, 0] == labels[1, 1] == 1
    assert labels[3, 2] == labels[3, 6] == 2 and labels[3, 8] == 3


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 28), width=st.integers(1, 28), seed=st.integers(0, 2**32 - 1))
def test_the_centre_of_mass_is_scipys_to_the_last_bit(height, width, seed):
    """Digits are placed by their centre of mass; a rounding apart from SciPy's would move some
    by a pixel and change the model's input from the one it was trained on."""
    digit = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    assert preprocessing._centre_of_mass(digit) == tuple(ndimage.center_of_mass(digit))


def rgba_png(pixels: np.ndarray, **options) -> bytes:
    return png_bytes(Image.fromarray(pixels, mode="RGBA"), **options)


def decoded_by_pillow(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 120),
    seed=st.integers(0, 2**32 - 1),
    level=st.sampled_from([0, 1, 6, 9]),
)
def test_the_pages_rgba_pngs_decode_pixel_for_pixel_as_pillow_decodes_them(
    width, height, seed, level
):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    pixels[rng.random((height, width)) < 0.5] = 0  # runs of background, as drawings have
    data = rgba_png(pixels, compress_level=level)
    decoded = decode_image(data)
    assert decoded.mode == "RGBA" and decoded.size == (width, height)
    assert np.array_equal(np.asarray(decoded), decoded_by_pillow(data))


def test_a_damaged_rgba_png_is_refused_as_corrupt_not_decoded_half():
    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 80, 4), dtype=np.uint8)
    data = rgba_png(pixels)
    idat = data.index(b"IDAT")
    flipped = bytearray(data)
    flipped[idat + 40] ^= 0xFF  # pixel data no longer matches its checksum
    for damaged in (data[: len(data) // 2], bytes(flipped)):
        with pytest.raises(ImageError) as caught:
            decode_image(damaged)
        assert caught.value.reason == "corrupt_image"


def test_16_bit_rgba_pngs_still_decode_through_pillow():
    pixels = np.random.default_rng(1).integers(0, 256, size=(30, 40, 4), dtype=np.uint8)
    wide = np.zeros((30, 40, 4), dtype=">u2")
    wide[..., :] = pixels.astype(">u2") * 257
    header = b"\x89PNG\r\n\x1a\n"
    deep = header + png_chunk(
        b"IHDR", (40).to_bytes(4, "big") + (30).to_bytes(4, "big") + bytes([16, 6, 0, 0, 0])
    )
    rows = b"".join(b"\x00" + row.tobytes() for row in wide)
    deep += png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    assert np.array_equal(np.asarray(decode_image(deep)), pixels)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


@settings(max_examples=30, deadline=None)
@given(
    width=st.integers(4, 1200),
    height=st.integers(4, 600),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(["RGBA", "LA"]),
)
def test_an_opaque_drawing_reads_the_same_ink_as_without_its_alpha_channel(
    width, height, seed, mode
):
    """The page's white pad sends opaque RGBA: its colours alone hold the drawing."""
    rng = np.random.default_rng(seed)
    colours = np.full((height, width, 3), 255, dtype=np.uint8)
    colours[rng.random((height, width)) < 0.1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    opaque = np.full((height, width, 1), 255, dtype=np.uint8)
    if mode == "RGBA":
        image, without = Image.fromarray(np.dstack([colours, opaque]), "RGBA"), colours
        without = Image.fromarray(without, "RGB")
    else:
        image = Image.fromarray(np.dstack([colours[..., :1], opaque]), "LA")
        without = Image.fromarray(colours[..., 0], "L")
    assert np.array_equal(ink_map(image), ink_map(without))
