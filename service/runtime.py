"""The model as the service runs it: the packaged LiteRT file, without TensorFlow.

The package stage converts the trained Keras model to LiteRT (`model.tflite`) and checks that
both give the same probabilities. Serving that file instead of the Keras one keeps TensorFlow out
of the server: start-up skips a multi-second import, the process needs a fraction of the memory,
and one image costs 0.33 ms on one core with the default two networks (0.94 ms with TensorFlow).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipelines.preprocessing import INPUT_SHAPE, as_batch

log = logging.getLogger("bentoml.digits")

SERVING_MODEL_FILE = "model.tflite"


class LiteRTModel:
    """(N, 28, 28) images in [0, 1] -> (N, classes) probabilities, on `threads` cores.

    Not thread-safe: the micro-batcher calls it from the event loop, one call at a time.
    """

    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=path, num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        output = self._interpreter.get_output_details()[0]
        self._output = output["index"]
        self.classes = int(output["shape"][-1])  # the model's outputs per image
        self._batch_size = 0  # the batch size the interpreter's tensors are allocated for

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = as_batch(images)
        if len(batch) != self._batch_size:
            self._interpreter.resize_tensor_input(self._input, batch.shape)
            self._interpreter.allocate_tensors()
            self._batch_size = len(batch)
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy, safe to hand on


def load_model(path: str, threads: int, warmup_batch_sizes: tuple[int, ...]) -> LiteRTModel:
    """Load the LiteRT model and run it once per warm-up batch size."""
    started = time.perf_counter()
    model = LiteRTModel(path, threads)
    for size in warmup_batch_sizes:
        model(np.zeros((size, *INPUT_SHAPE[:2]), dtype=np.float32))
    log.info("model loaded and warmed up in %.2f s", time.perf_counter() - started)
    return model
