"""The shared contract: any drawing becomes an MNIST-like 28x28 input, or a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from pipelines.download import read_idx
from pipelines.preprocessing import (
    CLASSES,
    NOT_A_DIGIT,
    ImageError,
    NoDigitError,
    NotADigitError,
    SeveralDigitsError,
    bytes_to_input,
    decode_image,
    image_to_input,
    ink_map,
    ink_to_input,
    plan_reading,
    plan_single,
    read_marks,
    read_single,
    working_scale,
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


# ---- Reading a drawing mark by mark -----------------------------------------------------------


def pad_with(*strokes: list[tuple[int, int]], size: tuple[int, int] = (840, 280)) -> Image.Image:
    """A transparent canvas like the page's, with each stroke drawn as a thick polyline."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=(20, 20, 20, 255), width=16, joint="curve")
    return image


FOUR = ([(100, 60), (70, 170), (160, 170)], [(140, 90), (140, 240)])  # two strokes
FIVE = ([(140, 60), (90, 60)], [(95, 65), (90, 130), (150, 150), (140, 220), (80, 225)])
SEVEN = ([(80, 60), (170, 60), (110, 230)], [(90, 150), (150, 150)])  # crossed
ONE = ([(400, 60), (400, 230)],)


def probabilities_for(plan_inputs: np.ndarray, answers: list[int], sure: float = 0.97):
    """Model answers, one class per input: `sure` on it, the rest spread evenly."""
    rows = np.full((len(plan_inputs), CLASSES), (1 - sure) / (CLASSES - 1))
    rows[np.arange(len(answers)), answers] = sure
    return rows


@pytest.mark.parametrize("digit", [FOUR, FIVE, SEVEN], ids=["four", "five", "crossed-seven"])
def test_a_digit_written_in_several_strokes_is_one_mark(digit):
    image = pad_with(*digit)
    single = plan_single(ink_map(image), working_scale(image), image.size)
    assert len(single.inputs) == 1  # nothing to refuse as several digits
    reading = plan_reading(ink_map(image), working_scale(image), image.size)
    assert len(reading.inputs) == 1
    np.testing.assert_array_equal(reading.inputs[0], image_to_input(image))  # same as /predict


def test_separate_digits_are_read_left_to_right_with_boxes_in_the_sent_pixels():
    one_then_four = pad_with(*ONE, *(_moved(stroke, 500) for stroke in FOUR))
    plan = plan_reading(ink_map(one_then_four), working_scale(one_then_four), (840, 280))
    marks = plan.marks(probabilities_for(plan.inputs, [1, 4]))
    assert [mark.digit for mark in marks] == [1, 4]
    first, second = (mark.box for mark in marks)
    assert 380 <= first.x <= 400 <= first.x + first.width <= 420  # the 1 at x=400, 16 px wide
    assert second.x >= 560 and second.x + second.width <= 670  # the 4 spans x=570..660
    assert 50 <= second.y <= 82 and second.y + second.height >= 230


def test_predict_refuses_several_sure_digits_but_reads_one_beside_a_doubtful_mark():
    two_marks = pad_with(*ONE, *(_moved(stroke, 500) for stroke in FOUR))
    plan = plan_single(ink_map(two_marks), working_scale(two_marks), (840, 280))
    assert len(plan.inputs) == 3  # the whole drawing, then each mark
    with pytest.raises(SeveralDigitsError) as refused:
        plan.digit(probabilities_for(plan.inputs, [4, 1, 4]))
    assert refused.value.reason == "several_digits" and "/read" in str(refused.value)
    # One sure digit and a mark the model doubts: the whole drawing's answer stands.
    answers = probabilities_for(plan.inputs, [4, 1, 4])
    answers[1] = probabilities_for(plan.inputs[:1], [1], sure=0.4)[0]
    assert plan.digit(answers).digit == 4


def test_a_drawing_the_model_calls_not_a_digit_is_refused_by_predict():
    image = pad_with(*SEVEN)
    plan = plan_single(ink_map(image), working_scale(image), image.size)
    with pytest.raises(NotADigitError) as refused:
        plan.digit(probabilities_for(plan.inputs, [NOT_A_DIGIT]))
    assert refused.value.reason == "not_a_digit"


def test_touching_digits_are_split_where_the_model_reads_sure_digits():
    bars = [[(x, 60), (x, 230)] for x in (100, 180, 260, 340)]
    touching = pad_with(*bars, [(100, 140), (340, 140)])  # four 1s joined by a stroke
    plan = plan_reading(ink_map(touching), working_scale(touching), (840, 280))
    (span,) = plan.spans
    assert len(plan.inputs) > 1  # a mark wider than tall: pieces were tried
    whole = span.intervals.index((0, len(span.cuts) - 1))
    # The model: the whole is not a digit, every narrower piece is a sure 1.
    answers = [NOT_A_DIGIT if offset == whole else 1 for offset in range(len(plan.inputs))]
    marks = plan.marks(probabilities_for(plan.inputs, answers))
    assert len(marks) >= 2 and all(mark.digit == 1 for mark in marks)
    boxes = [mark.box for mark in marks]
    assert all(a.x + a.width <= b.x for a, b in zip(boxes, boxes[1:], strict=False))
    # The same mark, which the model reads as one sure digit, stays whole.
    answers = [7 if offset == whole else 1 for offset in range(len(plan.inputs))]
    assert [mark.digit for mark in plan.marks(probabilities_for(plan.inputs, answers))] == [7]


def test_read_marks_and_read_single_run_the_classifier_once_on_the_plan():
    image = pad_with(*ONE)
    calls = []

    def classify(inputs: np.ndarray) -> np.ndarray:
        calls.append(inputs.shape)
        return probabilities_for(inputs, [1] * len(inputs))

    assert [mark.digit for mark in read_marks(image, classify)] == [1]
    assert read_single(image, classify).digit == 1
    assert calls == [(1, 28, 28), (1, 28, 28)]
    with pytest.raises(NoDigitError):
        read_marks(Image.new("RGBA", (840, 280)), classify)


def _moved(stroke: list[tuple[int, int]], dx: int) -> list[tuple[int, int]]:
    return [(x + dx, y) for x, y in stroke]
