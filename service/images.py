"""From the `image` string of a request to a plan: the 28x28 inputs the model must classify.

The string is a data URL (`data:image/png;base64,...`, what a canvas's `toDataURL` gives) or
bare base64. Decoding, preprocessing and splitting a drawing into marks are the shared contract
in `pipelines.preprocessing`: known formats only (PNG, JPEG, GIF, BMP, WebP), the size checked
from the header before any pixel is decoded, and animated images (GIF, APNG, animated WebP)
read from their first frame. /predict plans with `plan_single`, /read with `plan_reading`; the
service runs the model on the plan's inputs and hands the probabilities back to the plan.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from http import HTTPStatus
from typing import TypeVar

import numpy as np

from pipelines.preprocessing import decode_image, ink_map
from pipelines.segmentation import working_scale
from service.errors import RequestError

Plan = TypeVar("Plan")
# plan_single or plan_reading: (ink map, ink-map pixels to sent pixels, sent size) -> a plan
Planner = Callable[[np.ndarray, int, tuple[int, int]], Plan]

DATA_URL_PREFIX = "data:"


def image_bytes(value: str) -> bytes:
    """The bytes of an image sent as a base64 data URL or as bare base64.

    Whitespace inside the base64 (line breaks of MIME-style encoders) is ignored; anything else
    outside the base64 alphabet is an error. A data URL must be base64-encoded and name an
    image media type.
    """
    payload = value
    if value[: len(DATA_URL_PREFIX)].lower() == DATA_URL_PREFIX:
        header, comma, payload = value.partition(",")
        if not comma:
            raise RequestError("the data URL has no ',' before its data", "invalid_data_url")
        media_type, *parameters = header[len(DATA_URL_PREFIX) :].split(";")
        media_type = media_type.strip().lower()
        if not media_type.startswith("image/"):
            shown = media_type[:40] or "none"
            raise RequestError(
                f"the data URL's media type must be image/*, got {shown}",
                "unsupported_media_type",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        if "base64" not in (parameter.strip().lower() for parameter in parameters):
            raise RequestError(
                "the data URL must be base64-encoded (data:image/png;base64,...)",
                "invalid_data_url",
            )
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError("the image is not valid base64", "invalid_base64") from error
    if not data:
        raise RequestError("the image is empty", "empty_image")
    return data


def plan_image(value: str, max_pixels: int, planner: Planner[Plan]) -> Plan:
    """Decode one request image and plan its reading with `planner`.

    Raises RequestError for a bad encoding and ImageError (NoDigitError for a blank image) for
    anything the preprocessing contract refuses.
    """
    image = decode_image(image_bytes(value), max_pixels=max_pixels)
    return planner(ink_map(image), working_scale(image), image.size)
