"""POST /feedback: a person says what a drawing really is, and the correction is stored.

    {"image": "data:image/png;base64,...", "label": "7" | "2026" | "not_a_digit",
     "answer": {optional: what the page says the model answered}}
    -> 201 {"id": "<hex>", "status": "pending"}

A correction is a candidate, not a fact: it is stored as pending (pipelines/corrections.py) and
reaches training only once a reviewer accepts it. So nothing the client says is trusted: the
server reads the drawing again with its own model (the /read path) and stores what it read and
the probability it gave to the label; the client's `answer` is kept only as sent, for review.

Kept apart from service.py so the route stays a short walk (check, read, store, answer); the
store's calls block (a disk, a database), so they run on this module's own threads, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request

from pipelines.corrections import (
    NOT_A_DIGIT_LABEL,
    ClientLimitReached,
    CorrectionStore,
    PendingLimitReached,
    StorageFull,
    StorageUnavailable,
    StoreError,
    validate_label,
)
from pipelines.preprocessing import NOT_A_DIGIT, decode_image
from pipelines.segmentation import Mark
from service.errors import RequestError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNKNOWN_CLIENT = "unknown"
PENDING = "pending"


class FeedbackAnswer(BaseModel):
    id: str = Field(description="The correction's id (hex), for deleting it later")
    status: str = Field(description="Always 'pending': a reviewer accepts or rejects it")


def checked_label(label: str) -> str:
    """The label, or 422 `invalid_label` saying what a label is."""
    try:
        return validate_label(label)
    except ValueError as error:
        raise RequestError(str(error), "invalid_label", HTTPStatus.UNPROCESSABLE_ENTITY) from error


def checked_answer(answer: dict[str, Any] | None, max_chars: int) -> dict[str, Any] | None:
    """The client's account of the model's answer, if small plain JSON; else 422."""
    if answer is None:
        return None
    try:
        size = len(json.dumps(answer, allow_nan=False))
    except ValueError as error:
        raise RequestError(
            "the answer must be plain JSON (no NaN or Infinity)",
            "invalid_answer",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        ) from error
    if size > max_chars:
        raise RequestError(
            f"the answer must be at most {max_chars} characters of JSON, got {size}",
            "invalid_answer",
            HTTPStatus.UNPROCESSABLE_ENTITY,
        )
    return answer


def model_answer(marks: list[Mark]) -> str:
    """What the model read, as a label: the number, or "not_a_digit" if any mark is none."""
    if not all(mark.is_digit for mark in marks):
        return NOT_A_DIGIT_LABEL
    return "".join(str(mark.digit) for mark in marks)


def label_probability(marks: list[Mark], label: str) -> float | None:
    """The probability the model gave to `label` (of its eleven outputs, not renormalised).

    For a number: the product of each mark's probability for its digit, when there are as many
    marks as digits (else None: the marks and the label cannot be matched). For not_a_digit: the
    largest not-a-digit probability among the marks (one scribble makes the drawing none).
    """
    if label == NOT_A_DIGIT_LABEL:
        return float(max(mark.probabilities[NOT_A_DIGIT] for mark in marks))
    if len(marks) != len(label):
        return None
    return float(
        math.prod(float(mark.probabilities[int(d)]) for mark, d in zip(marks, label, strict=True))
    )


def as_png(data: bytes, max_pixels: int) -> bytes:
    """The image as PNG: a PNG as sent, byte for byte; any other format (already accepted by
    the reading) re-encoded from its first frame, so the store holds PNGs only."""
    if data.startswith(PNG_SIGNATURE):
        return data
    buffer = io.BytesIO()
    decode_image(data, max_pixels=max_pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def client_address(request: Request) -> str:
    """The connection's peer address. Behind a proxy this is the proxy's, so every client
    shares one rate limit there (the service does not trust X-Forwarded-For)."""
    return request.client.host if request.client and request.client.host else UNKNOWN_CLIENT


def refusal(error: StoreError) -> RequestError:
    """The HTTP refusal for a store error: every one a clear sentence and a stable reason."""
    if isinstance(error, ClientLimitReached):
        return RequestError(str(error), "too_many_corrections", HTTPStatus.TOO_MANY_REQUESTS)
    if isinstance(error, PendingLimitReached):
        return RequestError(str(error), "feedback_full", HTTPStatus.SERVICE_UNAVAILABLE)
    if isinstance(error, StorageFull):
        return RequestError(
            "corrections cannot be stored now: the server's disk is full",
            "storage_full",
            HTTPStatus.INSUFFICIENT_STORAGE,
        )
    if isinstance(error, StorageUnavailable):
        return RequestError(
            "corrections cannot be stored now: the corrections database is unavailable",
            "storage_unavailable",
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
    return RequestError(
        "corrections cannot be stored now", "storage_unavailable", HTTPStatus.SERVICE_UNAVAILABLE
    )


def disabled() -> RequestError:
    return RequestError(
        "this server does not take corrections (DIGITS_FEEDBACK_ENABLED is off)",
        "feedback_disabled",
        HTTPStatus.SERVICE_UNAVAILABLE,
    )


class FeedbackInbox:
    """Stores corrections through a CorrectionStore on its own threads, within the limits."""

    def __init__(
        self,
        store: CorrectionStore,
        max_pending: int,
        per_client_per_hour: int,
        threads: int = 1,
        on_error: Callable[[StoreError], None] | None = None,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.per_client_per_hour = per_client_per_hour
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="digits-feedback")
        self.on_error = on_error

    async def add(self, client: str, **fields: Any) -> str:
        """Store one correction; its id. Raises RequestError when the store refuses."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.threads, lambda: self._add(client, fields))
        except StoreError as error:
            if self.on_error is not None:
                self.on_error(error)
            raise refusal(error) from error

    def _add(self, client: str, fields: dict[str, Any]) -> str:
        return self.store.add(
            client_hash=self.store.client_hash(client),
            max_pending=self.max_pending,
            max_per_client=self.per_client_per_hour,
            **fields,
        )

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.store.close()
