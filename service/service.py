"""The digit-recognition service: the drawing page at `/` and a JSON API.

    bentoml serve                                    # from the repository root, port 3000
    curl -s localhost:3000/predict -H 'Content-Type: application/json' \
        -d "{\"image\": \"data:image/png;base64,$(base64 -w0 digit.png)\"}"
    {"digit": 3, "confidence": 0.998, "probabilities": [...], "top3": [...], ...}
    curl -s localhost:3000/read ... (the same body, a number written on one line)
    {"text": "2026", "confidence": 0.97, "digits": [...], "model_version": ...}

Routes: POST /predict, POST /predict_batch, POST /read, POST /feedback (a correction, stored for
review: feedback.py), GET /info, the page (web/) at /, and BentoML's /livez, /readyz and /metrics.
Every refusal is JSON `{"error", "reason"}` (see errors.py and guard.py); the limits are in
settings.py. The model is the newest `digits-cnn` in the BentoML store, run on LiteRT
(runtime.py, no TensorFlow in the server): the CNN through a micro-batcher (batcher.py), and
the line reader, called directly, that /read asks when digits touch. A request's walk: decode
and plan (images.py, the contract in pipelines/preprocessing.py and segmentation.py), one model
call for all the plan's inputs (and, for /read of touching digits, one line reader call), the
answer (answers.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
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

from pipelines.corrections import CorrectionStore, LimitReached, StoreError
from pipelines.lines import LINE_BUCKET, LINE_HEIGHT, LINE_WIDTH
from pipelines.preprocessing import CLASSES, INPUT_SHAPE, PREPROCESSING_VERSION, ImageError
from pipelines.segmentation import (
    Mark,
    ReadingPlan,
    SingleDigitPlan,
    plan_reading,
    plan_single,
)
from service import metrics
from service.answers import (
    BatchPrediction,
    Prediction,
    Reading,
    not_a_digit_refusal,
    prediction,
    reading,
)
from service.batcher import MicroBatcher
from service.errors import RequestError, error_body, error_response
from service.feedback import (
    PENDING,
    FeedbackAnswer,
    FeedbackInbox,
    as_png,
    checked_answer,
    checked_label,
    client_address,
    disabled,
    label_probability,
    model_answer,
)
from service.guard import RequestGuard
from service.images import Plan, Planner, image_bytes, plan_image
from service.runtime import LINE_READER_FILE, SERVING_MODEL_FILE, load_model
from service.settings import Settings

log = logging.getLogger("bentoml.digits")  # under BentoML's logger: `bentoml serve` shows it

SETTINGS = Settings.from_env()
LINE_WARMUP = [(1, LINE_HEIGHT, width) for width in range(LINE_BUCKET, LINE_WIDTH + 1, LINE_BUCKET)]
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


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(
        description="The drawing, as sent to /predict or /read", examples=[EXAMPLE_IMAGE]
    )
    label: str = Field(
        description="What the drawing really is: its digits ('7', '2026') or 'not_a_digit'",
        examples=["3"],
    )
    # Absent or an object, never null: BentoML's OpenAPI document cannot say "or null".
    answer: dict[str, Any] = Field(
        default_factory=dict,
        description="Optional: what the model answered, as the page showed it (digit or text, "
        "confidence, model_version); kept for review, never trusted",
        examples=[{"digit": 8, "confidence": 0.61, "model_version": "digits-cnn:abc"}],
    )


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


# The container image (`bentoml containerize`) is BentoML's Dockerfile on python:3.11-slim, with
# bentofile.yaml's packages. Named by its image alone, with no distro BentoML knows, the base is
# used as it is: on "debian", BentoML would first install build-essential, git and gnupg2
# (306 MB) to build packages from source, and every package here is a wheel.
CONTAINER_IMAGE = bentoml.images.Image(base_image="python:3.11-slim", distro="as-is")


@bentoml.service(
    image=CONTAINER_IMAGE,
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
            "corrections_version": metadata.get("corrections_version"),
            "line_reader_md5": metadata.get("line_reader_md5"),
        }
        self.infer = load_model(
            stored.path_of(SERVING_MODEL_FILE),
            SETTINGS.model_threads,
            [(size, *INPUT_SHAPE[:2]) for size in SETTINGS.warmup_batch_sizes],
        )
        if self.infer.classes != CLASSES:
            raise RuntimeError(
                f"model {stored.tag} answers {self.infer.classes} classes, but this code reads "
                f"{CLASSES} (the digits 0-9, not a digit, several digits); package a model trained "
                "with the current code"
            )
        line_reader = Path(stored.path_of(LINE_READER_FILE))
        if not line_reader.is_file():
            raise RuntimeError(
                f"model {stored.tag} has no line reader ({LINE_READER_FILE}); package a model "
                "with the current code (dvc repro)"
            )
        self.read_lines = load_model(str(line_reader), SETTINGS.model_threads, LINE_WARMUP)
        self.batcher = MicroBatcher(
            self.infer,
            max_batch=SETTINGS.max_model_batch,
            max_wait=SETTINGS.batch_wait_ms / 1000,
            on_batch=metrics.observe_model_batch,
        )
        self.decoders = ThreadPoolExecutor(
            SETTINGS.preprocess_threads, thread_name_prefix="digits-decode"
        )
        self.inbox = FeedbackInbox(
            CorrectionStore.from_env(),  # opened on first use: a bad disk never stops serving
            max_pending=SETTINGS.max_pending_corrections,
            per_client_per_hour=SETTINGS.feedback_per_client_per_hour,
            on_error=_log_store_error,
        )
        metrics.metrics()  # now, so that /metrics lists every refusal reason from the start
        log.info("serving %s", self.model_version)

    @bentoml.api(input_spec=PredictRequest)
    async def predict(self, image: str) -> Prediction:
        """The digit in one image. Refused with 422: a blank image (`no_digit`), a drawing that
        is not a digit (`not_a_digit`), several digits (`several_digits`: use /read)."""
        try:
            plan = await self.plan(image, plan_single)
            mark = plan.digit(await self.batcher.predict(plan.inputs))
        except (RequestError, ImageError) as error:
            return error_response(error)  # BentoML sends a returned Response as it is
        return self.prediction(mark)

    @bentoml.api(input_spec=PredictBatchRequest)
    async def predict_batch(self, images: list[str]) -> BatchPrediction:
        """Several images in one model call; each answer is a prediction or a refusal."""
        plans = await asyncio.gather(
            *(self.plan(image, plan_single, inline=False) for image in images),
            return_exceptions=True,
        )
        answers: list[Any] = [None] * len(images)
        good = []
        for index, item in enumerate(plans):
            if isinstance(item, SingleDigitPlan):
                good.append(index)
            elif isinstance(item, (RequestError, ImageError)):
                answers[index] = self.refusal(item)
            else:
                raise item
        if good:
            probabilities = await self.batcher.predict(
                np.concatenate([plans[i].inputs for i in good])
            )
            start = 0
            for index in good:
                plan = plans[index]
                rows = probabilities[start : start + len(plan.inputs)]
                start += len(plan.inputs)
                try:
                    answers[index] = self.prediction(plan.digit(rows))
                except ImageError as error:
                    answers[index] = self.refusal(error)
        return BatchPrediction(predictions=answers)

    @bentoml.api(input_spec=PredictRequest)
    async def read(self, image: str) -> Reading:
        """The number written on one line, left to right, any length. Refused with 422: a blank
        image (`no_digit`), or marks that are not digits (`not_a_digit`, with every mark)."""
        try:
            plan = await self.plan(image, plan_reading)
        except (RequestError, ImageError) as error:
            return error_response(error)
        marks = await self.read_marks(plan)
        if not all(mark.is_digit for mark in marks):
            return not_a_digit_refusal(marks)
        for mark in marks:
            metrics.count_prediction(mark.digit, mark.confidence)
        return reading(marks, self.model_version)

    @bentoml.api(input_spec=FeedbackRequest)
    async def feedback(
        self, image: str, label: str, answer: dict[str, Any], ctx: bentoml.Context
    ) -> FeedbackAnswer:
        """Store a correction, what the drawing really is, for review: 201 with its id.
        Refused with 422 (`invalid_label`; a blank image: `no_digit`), 429
        (`too_many_corrections` from one client within an hour), 503 (`feedback_full`: too many
        wait for review; `storage_unavailable`) or 507 (`storage_full`)."""
        try:
            stored = await self.correction(image, label, answer, client_address(ctx.request))
        except (RequestError, ImageError) as error:
            metrics.count_feedback(error.reason)
            response = error_response(error)
        else:
            metrics.count_feedback("stored")
            response = JSONResponse(stored.model_dump(), status_code=HTTPStatus.CREATED)
        ctx.response.status_code = response.status_code  # BentoML sets it on what is returned
        return response

    async def correction(
        self, image: str, label: str, answer: dict[str, Any], client: str
    ) -> FeedbackAnswer:
        """Check, read with the model (as /read does), store; the stored correction."""
        if not SETTINGS.feedback_enabled:
            raise disabled()
        label = checked_label(label)
        client_answer = checked_answer(answer or None, SETTINGS.max_feedback_answer_chars)
        plan = await self.plan(image, plan_reading)
        marks = await self.read_marks(plan)
        correction_id = await self.inbox.add(
            client,
            image_png=as_png(image_bytes(image), SETTINGS.max_image_pixels),
            label=label,
            model_version=self.model_version,
            model_answer=model_answer(marks),
            label_probability=label_probability(marks, label),
            client_answer=client_answer,
        )
        return FeedbackAnswer(id=correction_id, status=PENDING)

    async def read_marks(self, plan: ReadingPlan) -> list[Mark]:
        """The marks of a /read plan: the CNN reads each mark whole; when some may hold
        touching digits, the line reader reads the whole drawing (a second, unbatched call on
        the event loop: /read of a touching 2026 measured p50 14.5 ms against 9.7 ms apart)."""
        answers = await self.batcher.predict(plan.inputs)
        if not plan.needs_line(answers):
            return plan.marks(answers)
        line = plan.line_plan(answers)
        return line.marks(self.read_lines(line.input))

    async def plan(self, image: str, planner: Planner[Plan], inline: bool = True) -> Plan:
        """Decode one image and plan its reading (the model inputs it needs).

        A canvas-sized image (~13 kB of base64, ~1.7 ms of work for /predict) is done right
        here on the event loop: on 2 cores that costs less than handing it to a thread and back
        (measured: ~20% less CPU per request, and more requests per second). Larger images, and
        the images of a batch, go to a thread pool so that the loop keeps serving meanwhile.
        The pixel limit bounds the worst inline case (a 2048x2048 PNG can fit in 12 kB).
        """
        if inline and len(image) <= SETTINGS.inline_image_chars:
            return plan_image(image, SETTINGS.max_image_pixels, planner)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.decoders, plan_image, image, SETTINGS.max_image_pixels, planner
        )

    def prediction(self, mark: Mark) -> Prediction:
        answer = prediction(mark, self.model_version)
        metrics.count_prediction(answer.digit, answer.confidence)
        return answer

    def refusal(self, error: RequestError | ImageError) -> dict[str, str]:
        """A batch item's refusal, counted like a refused request."""
        metrics.count_rejection(error.reason)
        return error_body(error)

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.batcher.close()
        self.decoders.shutdown(wait=False)
        self.inbox.close()


def _log_store_error(error: StoreError) -> None:
    """A disk or database problem is the operator's to fix: say so in the log (a limit is not)."""
    if not isinstance(error, LimitReached):
        log.warning("a correction was not stored: %s", error)


Digits.add_asgi_middleware(
    RequestGuard,
    api_inputs={api.route: api.input_spec for api in Digits.apis.values()},
    max_body_bytes=SETTINGS.max_body_bytes,
    max_drain_bytes=SETTINGS.max_drain_bytes,
    max_drain_seconds=SETTINGS.max_drain_seconds,
    on_reject=metrics.count_rejection,
)
