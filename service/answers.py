"""What the service answers: the JSON shapes of /predict and /read, built from the marks that
`pipelines.preprocessing` reads.

Kept apart from service.py so that the routes stay a short walk (decode, plan, model, answer)
and the shapes a client relies on sit in one place. Probabilities are rounded to six decimals:
more digits are float32 noise, and the answers stay small.

    /predict   {"digit", "confidence", "probabilities", "top3", "not_a_digit", "model_version"}
    /read      {"text", "confidence", "digits": [{"digit", "confidence", "probabilities",
               "box", "input"}, ...], "model_version"}

A /read drawing with marks that are not digits is refused with every mark, each flagged
`is_digit` (and `"digit": null` where it is not one), so a page can show which mark failed.
"""

from __future__ import annotations

import base64
import io
import math
from http import HTTPStatus
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from pipelines.preprocessing import NOT_A_DIGIT
from pipelines.segmentation import Mark

DECIMALS = 6


class Candidate(BaseModel):
    digit: int
    probability: float


class Prediction(BaseModel):
    digit: int = Field(description="The most probable digit")
    confidence: float = Field(description="Its probability")
    probabilities: list[float] = Field(
        description="Probability of each digit 0-9, given that the drawing is a digit"
    )
    top3: list[Candidate] = Field(description="The three most probable digits, best first")
    not_a_digit: float = Field(
        description="Probability that the drawing is not a digit (a letter, a symbol, a scribble)"
    )
    model_version: str = Field(description="The model's tag in the BentoML store")


class Refusal(BaseModel):
    error: str
    reason: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction | Refusal]


class BoxAnswer(BaseModel):
    x: int = Field(description="Left edge, in pixels of the image as sent")
    y: int = Field(description="Top edge, in pixels of the image as sent")
    width: int
    height: int


class DigitReading(BaseModel):
    digit: int = Field(description="The digit read")
    confidence: float = Field(description="Its probability")
    probabilities: list[float] = Field(description="Probability of each digit 0-9")
    box: BoxAnswer = Field(description="Where it was written")
    input: str = Field(
        description="The 28x28 image the model saw, as a PNG data URL (dark ink on white)"
    )


class Reading(BaseModel):
    text: str = Field(description="The number read, left to right, e.g. '2026'")
    confidence: float = Field(description="The product of the digits' confidences")
    digits: list[DigitReading] = Field(description="Each digit, left to right")
    model_version: str = Field(description="The model's tag in the BentoML store")


def prediction(mark: Mark, model_version: str) -> Prediction:
    """/predict's answer for the one digit of a drawing."""
    probabilities = mark.digit_probabilities
    ranked = np.argsort(probabilities)[::-1]
    return Prediction(
        digit=mark.digit,
        confidence=_rounded(probabilities[mark.digit]),
        probabilities=[_rounded(p) for p in probabilities],
        top3=[Candidate(digit=int(d), probability=_rounded(probabilities[d])) for d in ranked[:3]],
        not_a_digit=_rounded(mark.probabilities[NOT_A_DIGIT]),
        model_version=model_version,
    )


def reading(marks: list[Mark], model_version: str) -> Reading:
    """/read's answer for a drawing whose marks are all digits."""
    return Reading(
        text="".join(str(mark.digit) for mark in marks),
        confidence=_rounded(math.prod(mark.confidence for mark in marks)),
        digits=[digit_reading(mark) for mark in marks],
        model_version=model_version,
    )


def digit_reading(mark: Mark) -> DigitReading:
    box = mark.box
    return DigitReading(
        digit=mark.digit,
        confidence=_rounded(mark.confidence),
        probabilities=[_rounded(p) for p in mark.digit_probabilities],
        box=BoxAnswer(x=box.x, y=box.y, width=box.width, height=box.height),
        input=input_data_url(mark.input),
    )


def not_a_digit_refusal(marks: list[Mark]) -> JSONResponse:
    """422 for a /read drawing with marks that are not digits: which ones, and every mark."""
    entries = []
    for mark in marks:
        entry: dict[str, Any] = digit_reading(mark).model_dump()
        entry["is_digit"] = mark.is_digit
        entry["several_digits"] = mark.is_several_digits  # touching digits it could not split
        if not mark.is_digit:
            entry["digit"] = None  # `confidence` is then how sure the model is it is no digit
        entries.append(entry)
    body = {"error": not_a_digit_message(marks), "reason": "not_a_digit", "marks": entries}
    return JSONResponse(body, status_code=HTTPStatus.UNPROCESSABLE_ENTITY)


def not_a_digit_message(marks: list[Mark]) -> str:
    """'mark 2 of 3 is not a digit', 'marks 1 and 3 of 4 are not digits', or, for a drawing of
    one mark, 'the drawing is not a digit'; with a hint when some are touching digits."""
    hint = ""
    if any(mark.is_several_digits for mark in marks):
        hint = " (digits that touch could not be told apart: leave a gap between them)"
    if len(marks) == 1:
        return "the drawing is not a digit" + hint
    positions = [str(number) for number, mark in enumerate(marks, start=1) if not mark.is_digit]
    if len(positions) == 1:
        return f"mark {positions[0]} of {len(marks)} is not a digit{hint}"
    listed = f"{', '.join(positions[:-1])} and {positions[-1]}"
    return f"marks {listed} of {len(marks)} are not digits{hint}"


def input_data_url(pixels: np.ndarray) -> str:
    """A (28, 28) model input in [0, 1] (1 is ink) as a grayscale PNG data URL, dark on white."""
    gray = np.round((1.0 - np.clip(pixels, 0.0, 1.0)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    # uint8 (28, 28): mode L; the lightest compression, as 784 pixels hardly shrink anyway
    Image.fromarray(gray).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _rounded(value: float) -> float:
    return round(float(value), DECIMALS)
