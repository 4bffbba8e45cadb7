"""An in-process micro-batcher: requests that arrive while the model is busy share its next call.

Why not BentoML's adaptive batching? Its documented pattern for single-image clients is a
front service calling a batchable inner service through `bentoml.depends`, which on one
machine means a second process and an HTTP hop per request, plus a dispatcher that waits to
fill batches. On 2 cores that costs more than a whole model call (0.38 ms for one image with
the default two networks on LiteRT and one thread). Here batching costs nothing when the service is
idle: the first request runs at once, alone; requests that come in while it runs queue up and
all go together in the next call. So the batch size follows the load by itself, and latency
never includes a deliberate wait unless `max_wait` asks for one.

The model runs on the event loop itself, not on a thread: a call is a fraction of a
millisecond to a few (`max_batch` bounds it), and handing each call to a thread and back cost
more than that. Measured with `benchmarks/serve.py` (two workers on 2 cores, the networks of
16, 32 and 64 filters): /predict p50 4.23 -> 3.50 ms, 436 -> 555 requests/s with 8 clients,
/read p50 11.1 -> 8.4 ms.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger("bentoml.digits.batcher")

Infer = Callable[[np.ndarray], np.ndarray]  # (N, 28, 28) float32 -> (N, 10) probabilities


class MicroBatcher:
    """Collects concurrent `predict` calls into single calls of `infer`, one at a time."""

    def __init__(
        self,
        infer: Infer,
        max_batch: int = 64,
        max_wait: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._infer = infer
        self._max_batch = max_batch
        self._max_wait = max_wait  # seconds to wait for more requests before a call
        self._on_batch = on_batch
        self._pending: collections.deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = (
            collections.deque()
        )
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 10) for images (N, 28, 28); the N images stay in one model call."""
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._run(), name="digits-batcher")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((images, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._max_wait > 0:
                await asyncio.sleep(self._max_wait)
            while self._pending:
                batch = self._take_batch()
                images = np.concatenate([images for images, _ in batch])
                if self._on_batch is not None:
                    self._on_batch(len(images))
                try:
                    probabilities = self._infer(images)  # on the loop: see the module's docstring
                except Exception as error:  # fail these requests, keep serving the next ones
                    log.exception("model call failed for a batch of %d images", len(images))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                start = 0
                for request_images, future in batch:
                    stop = start + len(request_images)
                    if not future.done():  # the client may have gone away
                        future.set_result(probabilities[start:stop])
                    start = stop
                await asyncio.sleep(0)  # let these answers go out before the next call

    def _take_batch(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """Pending requests, oldest first, up to max_batch images (at least one request)."""
        batch = [self._pending.popleft()]
        size = len(batch[0][0])
        while self._pending and size + len(self._pending[0][0]) <= self._max_batch:
            images, future = self._pending.popleft()
            batch.append((images, future))
            size += len(images)
        return batch
