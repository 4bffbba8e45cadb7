"""From the `image` string of a request to the model's 28x28 input.

The string is a data URL (`data:image/png;base64,...`, what a canvas's `toDataURL` gives) or
bare base64. Decoding and preprocessing are the shared contract in `pipelines.preprocessing`:
known formats only (PNG, JPEG, GIF, BMP, WebP), the size checked from the header before any
pixel is decoded, and animated images (GIF, APNG, animated WebP) read from their first frame.
"""

from __future__ import annotations

import base64
import binascii
from http import HTTPStatus

import numpy as np

from pipelines.preprocessing import bytes_to_input
from service.errors import RequestError

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


def read_image(value: str, max_pixels: int) -> np.ndarray:
    """Decode and preprocess one request image to a (28, 28) float32 array in [0, 1].

    Raises RequestError for a bad encoding and ImageError (NoDigitError for a blank image) for
    anything the preprocessing contract refuses.
    """
    return bytes_to_input(image_bytes(value), max_pixels=max_pixels)
