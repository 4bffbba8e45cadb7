"""The model as the service runs it: the packaged LiteRT file, without TensorFlow.

The package stage converts the trained Keras model to LiteRT (`model.tflite`) and checks that
both give the same probabilities. Serving that file instead of the Keras one keeps TensorFlow out
of the server: start-up skips a multi-second import, the process needs a fraction of the memory,
and one image costs 0.33 ms on one core with the default two networks (0.94 ms with TensorFlow).
The line reader (`line_reader.tflite`, packaged beside it) runs the same way.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger("bentoml.digits")

SERVING_MODEL_FILE = "model.tflite"
LINE_READER_FILE = "line_reader.tflite"


class LiteRTModel:
    """(N, H, W) images in [0, 1] -> the model's output, on `threads` cores: (N, 28, 28) ->
    (N, classes) for the CNN, (N, LINE_HEIGHT, W) -> (N, W / 4, line classes) for the line
    reader.

    Not thread-safe: the service calls it from the event loop, one call at a time.
    """

    def __init__(self, path: str, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=path, num_threads=threads)
        self._input = self._interpreter.get_input_details()[0]["index"]
        output = self._interpreter.get_output_details()[0]
        self._output = output["index"]
        self.classes = int(output["shape"][-1])  # the model's outputs per image
        self._shape: tuple[int, ...] = ()  # the input shape the tensors are allocated for

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)[..., np.newaxis]
        if batch.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, batch.shape)
            self._interpreter.allocate_tensors()
            self._shape = batch.shape
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)  # a copy, safe to hand on


def load_model(path: str, threads: int, warmup_shapes: list[tuple[int, ...]]) -> LiteRTModel:
    """Load a LiteRT model and run it once per warm-up input shape."""
    started = time.perf_counter()
    model = LiteRTModel(path, threads)
    for shape in warmup_shapes:
        model(np.zeros(shape, dtype=np.float32))
    log.info("%s loaded and warmed up in %.2f s", path, time.perf_counter() - started)
    return model
