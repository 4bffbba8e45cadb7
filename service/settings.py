"""Every limit and tuning knob of the service, in one frozen object.

Each value can be overridden by an environment variable named `DIGITS_<FIELD>` in capitals,
e.g. `DIGITS_MAX_BODY_BYTES=1000000 bentoml serve`. Values are read once, when the service
module is imported (BentoML needs some of them, like the concurrency limit, at that moment).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_PREFIX = "DIGITS_"


@dataclass(frozen=True)
class Settings:
    # Requests. A canvas PNG is ~10-30 kB; 2 MB leaves room for photos and batches.
    max_body_bytes: int = 2 * 1024 * 1024  # larger bodies get 413 before they are read
    # A body still arriving when the answer is a refusal (413, 404...) is read to its end and
    # dropped, so that clients that send it all before reading (urllib) get the answer and not
    # a connection reset; beyond either bound the connection is just closed.
    max_drain_bytes: int = 32 * 1024 * 1024
    max_drain_seconds: float = 5.0
    max_batch_images: int = 64  # images per /predict_batch request
    # Decoding: checked from the image header before any pixel is decoded. 2048x2048 is far
    # above any canvas and keeps the worst decode at ~15 ms (the contract allows 4096x4096).
    max_image_pixels: int = 2048 * 2048
    # Serving.
    workers: int = 2  # server processes (one per core here), each with its own model copy
    max_concurrency: int = 64  # requests in flight per worker; more get 429 at once
    timeout_seconds: float = 10.0  # a request still unanswered after this gets 504
    preprocess_threads: int = 2  # threads decoding large images and the images of batches
    inline_image_chars: int = 64 * 1024  # smaller images are decoded on the event loop
    # Batching: requests that arrive while the model is busy join its next call.
    max_model_batch: int = 64  # images per model call
    batch_wait_ms: float = 0.0  # extra wait for company before a call; 0 = never wait
    model_threads: int = 1  # cores the model uses; 1 leaves a core for HTTP and decoding
    warmup_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # Corrections (POST /feedback). Where they are stored is DIGITS_FEEDBACK_DIR or
    # DIGITS_FEEDBACK_URL (pipelines/corrections.py). A person correcting drawings by hand
    # sends a few a minute; 60 an hour per client stops a script, not a person.
    feedback_enabled: bool = True
    feedback_per_client_per_hour: int = 60  # more from one client address within an hour: 429
    max_pending_corrections: int = 10_000  # once this many wait for review, refuse more: 503
    max_feedback_answer_chars: int = 2048  # the client's `answer`, as JSON

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(v < 0 for v in values):
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()} must not be negative")
        if min(self.max_body_bytes, self.max_batch_images, self.max_image_pixels) < 1:
            raise ValueError("limits must be at least 1")
        if (
            min(
                self.workers,
                self.max_concurrency,
                self.preprocess_threads,
                self.max_model_batch,
                self.model_threads,
            )
            < 1
        ):
            raise ValueError("workers, concurrency, threads and batch size must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Defaults, overridden by DIGITS_* environment variables."""
        overrides: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"{ENV_PREFIX}{field.name.upper()}")
            if raw is None:
                continue
            kind = type(field.default)
            try:
                if kind is bool:
                    overrides[field.name] = _boolean(raw)
                elif kind is tuple:
                    overrides[field.name] = tuple(int(part) for part in raw.split(","))
                else:
                    overrides[field.name] = kind(raw)
            except ValueError as error:
                raise ValueError(
                    f"{ENV_PREFIX}{field.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from error
        return cls(**overrides)


def _boolean(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off, in any case."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
