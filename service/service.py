"""The digit-recognition service: the drawing page at `/` and a JSON API.

    bentoml serve                                    # from the repository root, port 3000
    curl -s localhost:3000/predict -H 'Content-Type: application/json' \
        -d "{\"image\": \"data:image/png;base64,$(base64 -w0 digit.png)\"}"
    {"digit": 3, "confidence": 0.998, "probabilities": [...], "top3": [...], "model_version": ...}

Routes: POST /predict, POST /predict_batch, GET /info, the page (web/) at /, and BentoML's
/livez, /readyz and /metrics. Every refusal is JSON `{"error", "reason"}` (see errors.py and
guard.py); the limits are in settings.py. The model is the newest `digits-cnn` in the BentoML
store, run on LiteRT (runtime.py, no TensorFlow in the server) through a micro-batcher
(batcher.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from pipelines.preprocessing import PREPROCESSING_VERSION, ImageError
from service import metrics
from service.batcher import MicroBatcher
from service.errors import RequestError, error_body, error_response
from service.guard import RequestGuard
from service.images import read_image
from service.runtime import SERVING_MODEL_FILE, load_model
from service.settings import Settings

log = logging.getLogger("bentoml.digits")  # under BentoML's logger: `bentoml serve` shows it

SETTINGS = Settings.from_env()
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# An MNIST test digit (a 3, dark on white, 28x28 PNG) so the API page can be tried at once.
EXAMPLE_IMAGE = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAABOUlEQVR42sXSTysEcRgH8Ge/O2Zno7ZwoqRJSmlSDi7S"
    "hrTJC/BnU7yAeQEOHPYNOCj5cyBRkwtSclUrSSltsVGUyxYaa+wF+TpMM3ZmOMpz+T1Pn/r1fOuJUX4vyJ+g4j6v94sy3RVR"
    "kqQzC6Am+8RguTgDAEDT4U+4jLi5tFAPba4SxWGMkjxqBLJvERQUSDLfB0y8h3EQtyTJkwbA+kY3Z4eIrPZb1t2YyHU4yjp2"
    "LxPuxmjdfg5+W95wblLwqnarUo0kuT854rNRCCH5YdtXRds264Ch8yA+5L0ubwCZAO7p2o7Xv7QhdVCNmxrix95wqiDt5xSR"
    "8Zzw0xsuKIafkyTLA9CniiQ535kEzOC2jp6EoqqqCgA9j6EoXMs0uzl7cyWSjAVPs+SspM/au1sSIiIS+4e7/QJ2jldR/CtB"
    "rgAAAABJRU5ErkJggg=="
)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(
        description="An image as a data URL (data:image/png;base64,...) or bare base64",
        examples=[EXAMPLE_IMAGE],
    )


class PredictBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(
        min_length=1,
        max_length=SETTINGS.max_batch_images,
        description="Images, each like `image` of /predict",
        examples=[[EXAMPLE_IMAGE]],
    )


class Candidate(BaseModel):
    digit: int
    probability: float


class Prediction(BaseModel):
    digit: int = Field(description="The most probable digit")
    confidence: float = Field(description="Its probability")
    probabilities: list[float] = Field(description="Probability of each digit 0-9")
    top3: list[Candidate] = Field(description="The three most probable digits, best first")
    model_version: str = Field(description="The model's tag in the BentoML store")


class Refusal(BaseModel):
    error: str
    reason: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction | Refusal]


async def info(request: Request) -> JSONResponse:
    """GET /info: which model answers, and how good it is."""
    return JSONResponse(bentoml.get_current_service().model_info)


class PageFiles(StaticFiles):
    """The page's files: only files inside web/ (no listings, and paths leading outside it,
    however encoded, find nothing)."""

    def serves(self, scope: Scope) -> bool:
        """Whether the path names one of the files (or a folder holding an index.html)."""
        path = self.get_path(scope)
        for candidate in (path, os.path.join(path, "index.html")):
            try:
                _, found = self.lookup_path(candidate)  # a stat or two of a local folder
            except (OSError, ValueError):  # a name too long, a NUL byte: not one of ours
                return False
            if found is not None and stat.S_ISREG(found.st_mode):
                return True
        return False


class PageMount(Mount):
    """The page's files at "/", matching only the paths that name one of them (whatever the
    method: a POST there is their 405). Every other path falls through to the routes behind:
    BentoML's own (a POST /livez is their 405) and at last the router's 404, made JSON like
    every refusal by the guard. A plain Mount("/") would claim every path, and StaticFiles
    answers any method but GET and HEAD with 405, even where there is no file."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and not self.app.serves({**scope, **child_scope}):
            return Match.NONE, {}
        return match, child_scope


# /info and the page live in one small Starlette app mounted at "/"; API routes and BentoML's
# own routes match first.
web_app = Starlette(
    routes=[
        Route("/info", info, methods=["GET"]),
        PageMount("/", app=PageFiles(directory=WEB_DIR, html=True, check_dir=False)),
    ]
)


@bentoml.service(
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_seconds, "max_concurrency": SETTINGS.max_concurrency},
)
@bentoml.asgi_app(web_app, path="/")
class Digits:
    model_ref = bentoml.models.BentoModel("digits-cnn:latest")

    def __init__(self) -> None:
        try:
            stored = self.model_ref  # the class attribute resolves to the stored model here
        except bentoml.exceptions.BentoMLException as error:
            raise RuntimeError(
                f"no {type(self).model_ref.tag} model in the BentoML store; "
                "run the pipeline's package stage (dvc repro) first"
            ) from error
        metadata = stored.info.metadata
        if metadata.get("preprocessing_version") != PREPROCESSING_VERSION:
            raise RuntimeError(
                f"model {stored.tag} was trained with preprocessing "
                f"{metadata.get('preprocessing_version')!r}, but this code preprocesses with "
                f"{PREPROCESSING_VERSION!r}; package a model trained with the current code"
            )
        self.model_version = str(stored.tag)
        self.model_info = {
            "model_tag": self.model_version,
            "registry_version": metadata.get("registry_version"),
            "mlflow_run_id": metadata.get("mlflow_run_id"),
            "val_accuracy": metadata.get("val_accuracy"),
            "test_accuracy": metadata.get("test_accuracy"),
            "trained_at": metadata.get("trained_at"),
            "preprocessing_version": metadata.get("preprocessing_version"),
        }
        self.infer = load_model(
            stored.path_of(SERVING_MODEL_FILE), SETTINGS.model_threads, SETTINGS.warmup_batch_sizes
        )
        self.batcher = MicroBatcher(
            self.infer,
            max_batch=SETTINGS.max_model_batch,
            max_wait=SETTINGS.batch_wait_ms / 1000,
            on_batch=metrics.observe_model_batch,
        )
        self.decoders = ThreadPoolExecutor(
            SETTINGS.preprocess_threads, thread_name_prefix="digits-decode"
        )
        log.info("serving %s", self.model_version)

    @bentoml.api(input_spec=PredictRequest)
    async def predict(self, image: str) -> Prediction:
        """The digit in one image. A blank image answers 422 with reason `no_digit`."""
        try:
            pixels = await self.preprocess(image)
        except (RequestError, ImageError) as error:
            return error_response(error)  # BentoML sends a returned Response as it is
        probabilities = await self.batcher.predict(pixels[np.newaxis])
        return self.answer(probabilities[0])

    @bentoml.api(input_spec=PredictBatchRequest)
    async def predict_batch(self, images: list[str]) -> BatchPrediction:
        """Several images in one model call; each answer is a prediction or a refusal."""
        decoded = await asyncio.gather(
            *(self.preprocess(image, inline=False) for image in images), return_exceptions=True
        )
        good = [index for index, item in enumerate(decoded) if isinstance(item, np.ndarray)]
        answers: list[Any] = [None] * len(images)
        for index, item in enumerate(decoded):
            if isinstance(item, (RequestError, ImageError)):
                metrics.count_rejection(item.reason)
                answers[index] = error_body(item)
            elif isinstance(item, BaseException):
                raise item
        if good:
            probabilities = await self.batcher.predict(np.stack([decoded[i] for i in good]))
            for index, row in zip(good, probabilities, strict=True):
                answers[index] = self.answer(row)
        return BatchPrediction(predictions=answers)

    async def preprocess(self, image: str, inline: bool = True) -> np.ndarray:
        """Decode and preprocess one image to (28, 28) float32 in [0, 1].

        A canvas-sized image (~13 kB of base64, ~1.7 ms of work) is done right here on the event
        loop: on 2 cores that costs less than handing it to a thread and back (measured: ~20%
        less CPU per request, and more requests per second). Larger images, and the images of
        a batch, go to a thread pool so that the loop keeps serving meanwhile. The pixel limit
        bounds the worst inline case (a 2048x2048 PNG can fit in 12 kB) to ~15 ms.
        """
        if inline and len(image) <= SETTINGS.inline_image_chars:
            return read_image(image, SETTINGS.max_image_pixels)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.decoders, read_image, image, SETTINGS.max_image_pixels
        )

    def answer(self, probabilities: np.ndarray) -> Prediction:
        ranked = np.argsort(probabilities)[::-1]
        digit = int(ranked[0])
        confidence = float(probabilities[digit])
        metrics.count_prediction(digit, confidence)
        return Prediction(
            digit=digit,
            confidence=round(confidence, 6),
            probabilities=[round(float(p), 6) for p in probabilities],
            top3=[
                Candidate(digit=int(d), probability=round(float(probabilities[d]), 6))
                for d in ranked[:3]
            ],
            model_version=self.model_version,
        )

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.batcher.close()
        self.decoders.shutdown(wait=False)


Digits.add_asgi_middleware(
    RequestGuard,
    api_inputs={api.route: api.input_spec for api in Digits.apis.values()},
    max_body_bytes=SETTINGS.max_body_bytes,
    max_drain_bytes=SETTINGS.max_drain_bytes,
    max_drain_seconds=SETTINGS.max_drain_seconds,
    on_reject=metrics.count_rejection,
)
