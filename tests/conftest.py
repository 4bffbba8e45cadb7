"""Shared fixtures: a throw-away BentoML store holding a real `digits-cnn` model, a real
`bentoml serve` of the service, and MNIST digits rendered the way the drawing page sends them.

The whole test session runs against a temporary BENTOML_HOME (set in `pytest_configure`, before
anything imports bentoml, and inherited by subprocesses), so tests never touch the user's store.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO as REPO_ROOT
from tests.helpers import SHARED_MNIST, FastProject, make_fast_project

BENTOML = REPO_ROOT / ".venv" / "bin" / "bentoml"
CANVAS_SIDE = 280  # the drawing page's canvas, in pixels
SERVER_START_TIMEOUT = 90.0  # seconds; a cold start takes ~10 s, more while the cores are busy

log = logging.getLogger(__name__)


def pytest_configure(config: pytest.Config) -> None:
    """Point BentoML (and Prometheus' multiprocess mode) at temporary directories.

    This runs before test modules are imported, so bentoml reads the temporary home the first
    time it configures its store. The in-process service writes its metrics to its own
    directory; `bentoml serve` creates (and empties) one inside BENTOML_HOME.
    """
    root = Path(tempfile.mkdtemp(prefix="digits-tests-"))
    config.stash[_TEMP_ROOT] = root
    (root / "prometheus").mkdir()
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(root / "prometheus")
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_TEMP_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


_TEMP_ROOT = pytest.StashKey[Path]()


# ---- The model -------------------------------------------------------------------------------


def save_test_model(epochs: int = 2, train_images: int = 20_000) -> str:
    """Train a small real CNN on MNIST and save it to the BentoML store as `digits-cnn`.

    A stand-in for the `package` stage: same files, same metadata keys, a model good enough
    (~97% on the test set) to read rendered MNIST digits correctly. Returns the model's tag.
    Swap the body for the real fast pipeline when it exists.
    """
    import bentoml
    import keras

    from pipelines.download import read_split
    from pipelines.model import build_model
    from pipelines.package import export_for_serving
    from pipelines.preprocessing import PREPROCESSING_VERSION, as_batch

    keras.utils.set_random_seed(0)
    images, labels = read_split(SHARED_MNIST, "train")
    inputs = as_batch(images[:train_images] / 255.0)
    model = build_model((8, 16, 32), 0.2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        inputs,
        labels[:train_images],
        batch_size=64,
        epochs=epochs,
        validation_data=(as_batch(images[-2000:] / 255.0), labels[-2000:]),
        verbose=0,
    )
    val_accuracy = float(history.history["val_accuracy"][-1])
    metadata = {
        "mlflow_run_id": "test-run-0000",
        "registry_version": 1,
        "val_accuracy": round(val_accuracy, 4),
        "test_accuracy": round(val_accuracy, 4),
        "data_hash": "test",
        "git_commit": "test",
        "preprocessing_version": PREPROCESSING_VERSION,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with bentoml.models.create(
        name="digits-cnn", labels={"stage": "test"}, metadata=metadata
    ) as ref:
        model.save(ref.path_of("model.keras"))
        export_for_serving(
            Path(ref.path_of("model.keras")), Path(ref.path_of("model.tflite")), images[:64] / 255
        )
    log.info("saved %s (val accuracy %.4f)", ref.tag, val_accuracy)
    return str(ref.tag)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    """The session's BENTOML_HOME, holding one trained `digits-cnn` model."""
    import bentoml

    try:
        bentoml.models.get("digits-cnn:latest")
    except bentoml.exceptions.NotFound:
        save_test_model()
    return Path(os.environ["BENTOML_HOME"])


# ---- A real server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll /readyz until it answers 200; fail early if the server process exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"bentoml serve was not ready within {timeout:.0f} s")


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server (its own process group, so its workers too), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


@pytest.fixture(scope="session")
def fast_project(tmp_path_factory: pytest.TempPathFactory) -> FastProject:
    """A copy of the project after `dvc repro` on the fast preset. Its package stage imports
    the champion into the session's BentoML store, where `live_service` finds it."""
    return make_fast_project(
        tmp_path_factory.mktemp("pipeline"), bentoml_home=Path(os.environ["BENTOML_HOME"])
    )


@pytest.fixture(scope="session")
def live_service(
    fast_project: FastProject, bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Start `bentoml serve` of the Digits service on a free port; yield its base URL.

    It serves the model the real pipeline packaged (fast preset), as a user's would."""
    with serve(bentoml_home, tmp_path_factory.mktemp("live_service")) as base_url:
        yield base_url


OVERLOAD_LIMIT = 4  # DIGITS_MAX_CONCURRENCY of `limited_service`


@pytest.fixture(scope="session")
def limited_service(live_service, bentoml_home, tmp_path_factory) -> Iterator[str]:
    """A second `bentoml serve` of the same model with one worker that admits only
    OVERLOAD_LIMIT requests at a time (the limit is per worker; depending on `live_service`
    makes sure the store holds the pipeline's model).

    It gets a copy of the store: `bentoml serve` empties the Prometheus directory of its
    BENTOML_HOME at start, which would wipe the live server's metrics."""
    folder = tmp_path_factory.mktemp("limited_service")
    shutil.copytree(bentoml_home / "models", folder / "bentoml" / "models")
    with serve(
        folder / "bentoml",
        folder,
        DIGITS_WORKERS="1",
        DIGITS_MAX_CONCURRENCY=str(OVERLOAD_LIMIT),
    ) as base_url:
        yield base_url


@contextlib.contextmanager
def serve(bentoml_home: Path, log_dir: Path, **env_overrides: str) -> Iterator[str]:
    """A real `bentoml serve` of the service on a free port of 127.0.0.1, stopped on exit.

    `env_overrides` set environment variables for it, e.g. DIGITS_MAX_CONCURRENCY="4"."""
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), **env_overrides}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve sets up its own
    command = [str(BENTOML), "serve", "service.service:Digits", "--host", "127.0.0.1"]
    with running_server(
        [*command, "--port", str(port)], REPO_ROOT, env, port, log_dir / "server.log"
    ) as base_url:
        yield base_url


@contextlib.contextmanager
def running_server(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    port: int,
    log_path: Path,
    timeout: float = SERVER_START_TIMEOUT,
) -> Iterator[str]:
    """Start `command`, a server that will answer on `port` of 127.0.0.1, and wait until its
    /readyz says 200; yield its base URL, stop it (and its process group) on exit. When it does
    not come up, the end of its log (`log_path`) is shown."""
    with open(log_path, "wb") as server_log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_process ends workers too
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, process, timeout)
    except Exception:
        stop_process(process)
        sys.stderr.write(log_path.read_text(errors="replace")[-8000:])
        raise
    try:
        yield base_url
    finally:
        stop_process(process)


# ---- Test images -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test images (n, 28, 28) uint8 and their labels (n,)."""
    from pipelines.download import read_split

    return read_split(SHARED_MNIST, "t10k")


def render_canvas(digit: np.ndarray, transparent: bool = True) -> bytes:
    """Draw a 28x28 MNIST digit on a 280x280 canvas as the page does: dark strokes on a
    transparent background (or on white), scaled up smoothly, encoded as PNG."""
    ink = Image.fromarray(np.asarray(digit, dtype=np.uint8), mode="L").resize(
        (CANVAS_SIDE, CANVAS_SIDE), Image.Resampling.BILINEAR
    )
    if transparent:
        canvas = Image.new("RGBA", ink.size, (20, 20, 20, 0))
        canvas.putalpha(ink)
    else:
        canvas = Image.merge("L", [ink.point(lambda value: 255 - value)])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@pytest.fixture(scope="session")
def canvas_png() -> Callable[..., bytes]:
    """`canvas_png(digit, transparent=True)`: an MNIST digit drawn as the page's canvas PNG."""
    return render_canvas
