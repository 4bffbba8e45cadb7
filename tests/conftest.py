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
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from starlette.testclient import TestClient

from pipelines.drawing import glyphs_in_slots
from tests.helpers import REPO as REPO_ROOT
from tests.helpers import SHARED_MNIST, SHARED_OMNIGLOT, FastProject, make_fast_project

BENTOML = REPO_ROOT / ".venv" / "bin" / "bentoml"
CANVAS_SIDE = 280  # the drawing page's canvas, in pixels
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
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
    os.environ["DIGITS_FEEDBACK_DIR"] = str(root / "feedback")  # never the project's feedback/
    os.environ.pop("DIGITS_FEEDBACK_URL", None)  # nor a team's database


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_TEMP_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


_TEMP_ROOT = pytest.StashKey[Path]()


# ---- The model -------------------------------------------------------------------------------


TEST_MODEL_NOT_DIGIT_SHARE = 0.1  # share of the training images that are not digits
TEST_MODEL_SCRIBBLES = 1000  # synthetic scribbles among them (the train stage's own)
TEST_MODEL_CANVAS_DIGITS = 2000  # training digits drawn on the pad, as the train stage adds
TEST_MODEL_MAX_DIGIT_REFUSAL = 0.005  # validation digits the fitted threshold may refuse
TEST_LINE_READER = {  # the train_lines settings of the test model's line reader: ~1 min
    "seed": 0,
    "lines": 8000,
    "validation_lines": 0,
    "max_digits": 4,
    "touching": [0.0, 0.5],
    "overlapping": [0.0, 0.2],
    "not_digit_lines": 0.3,
    "redrawn_lines": 0.5,
    "redrawn_stroke_width": [1.2, 5.0],
    "epochs": 4,
    "batch_size": 32,
    "learning_rate": 0.002,
    "precision": "auto",
}


def save_test_model(
    not_digits: dict[str, np.ndarray], epochs: int = 2, train_images: int = 20_000
) -> str:
    """Train a small real CNN and save it to the BentoML store as `digits-cnn`.

    A stand-in for the `package` stage: same files (with a line reader, trained as the
    train_lines stage trains it but smaller), same metadata keys, the same twelve classes
    (digits, not a digit, several digits: this one never learnt) learnt the way the train stage
    learns them: MNIST digits, the download stage's non-digit drawings of the training
    alphabets, the train stage's scribbles and digits drawn on the pad, with the "not a digit"
    threshold fitted on validation (MNIST digits and the validation alphabets) and folded into
    the model. Good enough (~97% of test digits) to read rendered MNIST digits. `not_digits` is
    the download stage's not_digits.npz. Returns the tag.
    """
    import bentoml
    import keras

    from pipelines.download import read_split
    from pipelines.model import build_model, raise_logit
    from pipelines.package import export_for_serving, probe_strips
    from pipelines.preprocessing import NOT_A_DIGIT, PREPROCESSING_VERSION, as_batch
    from pipelines.train import canvas_digits, fit_refusal_shift, scribbles
    from pipelines.train_lines import LineSettings, draw_lines_in_parallel, fit_line_reader

    keras.utils.set_random_seed(0)
    images, labels = read_split(SHARED_MNIST, "train")
    split = not_digits["split"]
    others = np.concatenate(
        [not_digits["images"][split == "train"] / 255.0, scribbles(TEST_MODEL_SCRIBBLES, 0)]
    )
    wanted = TEST_MODEL_NOT_DIGIT_SHARE / (1 - TEST_MODEL_NOT_DIGIT_SHARE) * train_images
    others = np.concatenate([others] * max(1, round(wanted / len(others))))
    held_out = not_digits["images"][split == "validation"] / 255.0
    x_val = as_batch(np.concatenate([images[-2000:] / 255.0, held_out]))
    y_val = np.concatenate([labels[-2000:], np.full(len(held_out), NOT_A_DIGIT)])
    drawn, drawn_labels = canvas_digits(
        images[:train_images], labels[:train_images], TEST_MODEL_CANVAS_DIGITS, 0
    )
    model = build_model((8, 16, 32), 0.2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(
        as_batch(np.concatenate([images[:train_images] / 255.0, drawn, others])),
        np.concatenate([labels[:train_images], drawn_labels, np.full(len(others), NOT_A_DIGIT)]),
        batch_size=64,
        epochs=epochs,
        verbose=0,
    )
    probabilities = np.asarray(model.predict(x_val, batch_size=1000, verbose=0))
    shift = fit_refusal_shift([probabilities], y_val, TEST_MODEL_MAX_DIGIT_REFUSAL)
    raise_logit(model, shift)
    probabilities = np.asarray(model.predict(x_val, batch_size=1000, verbose=0))
    is_digit = y_val != NOT_A_DIGIT
    val_accuracy = float((probabilities[is_digit].argmax(axis=1) == y_val[is_digit]).mean())
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
    line_settings = LineSettings.from_params(TEST_LINE_READER)
    strips, targets = draw_lines_in_parallel(
        images[:train_images],
        labels[:train_images],
        line_settings.lines,
        line_settings,
        line_settings.seed,
        not_digits["images"][split == "train"],
    )
    line_reader = fit_line_reader(strips, targets, line_settings)
    with bentoml.models.create(
        name="digits-cnn", labels={"stage": "test"}, metadata=metadata
    ) as ref:
        model.save(ref.path_of("model.keras"))
        export_for_serving(
            Path(ref.path_of("model.keras")), Path(ref.path_of("model.tflite")), images[:64] / 255
        )
        line_reader.save(ref.path_of("line_reader.keras"))
        export_for_serving(
            Path(ref.path_of("line_reader.keras")),
            Path(ref.path_of("line_reader.tflite")),
            probe_strips(images[-4:] / 255),
        )
    refused = probabilities.argmax(axis=1) == NOT_A_DIGIT
    log.info(
        "saved %s (val accuracy %.4f; refuses %.2f%% of digits, %.1f%% of held-out drawings)",
        ref.tag,
        val_accuracy,
        100 * refused[is_digit].mean(),
        100 * refused[~is_digit].mean(),
    )
    return str(ref.tag)


@pytest.fixture(scope="session")
def not_digit_drawings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The download stage's not_digits.npz (Omniglot drawings of letters and symbols, split by
    alphabet), prepared from the shared copy of the zips."""
    from pipelines.download import OmniglotSettings, load_prepared, prepare_not_digits

    out = tmp_path_factory.mktemp("not_digits") / "not_digits.npz"
    prepare_not_digits(
        SHARED_OMNIGLOT, out, OmniglotSettings.from_params(REPO_ROOT / "params.yaml")
    )
    return load_prepared(out)


@pytest.fixture(scope="session")
def bentoml_home(request: pytest.FixtureRequest) -> Path:
    """The session's BENTOML_HOME, holding one trained `digits-cnn` model."""
    import bentoml

    try:
        bentoml.models.get("digits-cnn:latest")
    except bentoml.exceptions.NotFound:
        save_test_model(request.getfixturevalue("not_digit_drawings"))
    return Path(os.environ["BENTOML_HOME"])


# ---- The service in process ------------------------------------------------------------------


@pytest.fixture(scope="session")
def service_client(bentoml_home: Path) -> Iterator[TestClient]:
    """The service in process (`Digits.to_asgi()`, a real model, no server), shared by every
    module of the session: BentoML registers its request metrics once per process, so a second
    `to_asgi()` would fail."""
    from starlette.testclient import TestClient

    from service.service import Digits

    with TestClient(Digits.to_asgi(), raise_server_exceptions=False) as client:
        yield client


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
    """SIGTERM the server (its own process group: it stops its workers), then SIGKILL it and
    all it started."""
    if process.poll() is not None:
        return
    started = descendants(process)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_tree(process, started)


def descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen, started: list[psutil.Process] | None = None) -> None:
    """SIGKILL a server, its process group and everything it started, at once, and wait until
    all are gone. The group alone is not enough: BentoML's arbiter starts each worker in a
    session of its own, and orphaned workers go on serving from the shared socket."""
    tree = [*(started or []), *descendants(process)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    if alive:
        raise RuntimeError(f"processes {[member.pid for member in alive]} survived SIGKILL")


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
OVERLOAD_BATCH_WAIT_MS = 20  # and its DIGITS_BATCH_WAIT_MS


@pytest.fixture(scope="session")
def limited_service(live_service, bentoml_home, tmp_path_factory) -> Iterator[str]:
    """A second `bentoml serve` of the same model with one worker that admits only
    OVERLOAD_LIMIT requests at a time (the limit is per worker; depending on `live_service`
    makes sure the store holds the pipeline's model). Each model call first waits
    OVERLOAD_BATCH_WAIT_MS for company, as on a busy server: unhindered, the worker answers a
    canvas in a few milliseconds, and a burst of clients on this machine may never hold more
    than OVERLOAD_LIMIT requests at once.

    It gets a copy of the store: `bentoml serve` empties the Prometheus directory of its
    BENTOML_HOME at start, which would wipe the live server's metrics."""
    folder = tmp_path_factory.mktemp("limited_service")
    with serve(
        copied_bentoml_home(bentoml_home, folder),
        folder,
        DIGITS_WORKERS="1",
        DIGITS_MAX_CONCURRENCY=str(OVERLOAD_LIMIT),
        DIGITS_BATCH_WAIT_MS=str(OVERLOAD_BATCH_WAIT_MS),
    ) as base_url:
        yield base_url


def copied_bentoml_home(bentoml_home: Path, folder: Path) -> Path:
    """A BentoML home in `folder` holding a copy of the models: a server of its own, whose
    start (which empties its home's Prometheus directory) leaves other servers' metrics be."""
    shutil.copytree(bentoml_home / "models", folder / "bentoml" / "models")
    return folder / "bentoml"


@contextlib.contextmanager
def serve(bentoml_home: Path, log_dir: Path, **env_overrides: str) -> Iterator[str]:
    """A real `bentoml serve` of the service on a free port of 127.0.0.1, stopped on exit.

    `env_overrides` set environment variables for it, e.g. DIGITS_MAX_CONCURRENCY="4"."""
    with serving(bentoml_home, log_dir, **env_overrides) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def serving(
    bentoml_home: Path, log_dir: Path, **env_overrides: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """As `serve`, also yielding the server process, which leads its own process group (its
    workers are in it), for tests that kill it."""
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "DIGITS_FEEDBACK_DIR": str(log_dir / "feedback"),  # its own corrections store
        **env_overrides,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve sets up its own
    command = [str(BENTOML), "serve", "service.service:Digits", "--host", "127.0.0.1"]
    with server_process(
        [*command, "--port", str(port)], REPO_ROOT, env, port, log_dir / "server.log"
    ) as process:
        yield f"http://127.0.0.1:{port}", process


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
    with server_process(command, cwd, env, port, log_path, timeout):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def server_process(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    port: int,
    log_path: Path,
    timeout: float = SERVER_START_TIMEOUT,
) -> Iterator[subprocess.Popen]:
    """As `running_server`, yielding the process."""
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
        yield process
    finally:
        stop_process(process)


# ---- A small disk ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int = 1024, read_only: bool = False) -> Iterator[Path]:
    """A real filesystem of `size_kb` at `path` (a tmpfs), for a disk that fills up or turns
    read-only (`remount`); unmounted on exit. Mounting needs root: elsewhere the test skips."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k,mode=0755" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "digits-test", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small disk here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def remount(path: Path, read_only: bool) -> None:
    """Make a `small_disk` read-only or writable again. Files open for writing on it make a
    read-only remount fail (EBUSY): close them first."""
    option = "remount,ro" if read_only else "remount,rw"
    subprocess.run(["mount", "-o", option, str(path)], check=True, capture_output=True)


# ---- A real PostgreSQL ----------------------------------------------------------------------


def as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root, so drop to the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a free port of 127.0.0.1 holding an empty database
    `digits`; yields its SQLAlchemy URL (team mode's MLflow store, the corrections store)."""
    if not (POSTGRES_BIN / "initdb").is_file():
        pytest.fail("PostgreSQL 15 is not installed: run scripts/setup --postgres")
    folder = Path(tempfile.mkdtemp(prefix="digits-postgres-"))  # /tmp: reachable by `postgres`
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run(
        as_postgres_user([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust"])
        + ["-U", "digits", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [str(POSTGRES_BIN / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        as_postgres_user([*pg_ctl, "-o", options, "-l", str(folder / "server.log"), "-w"])
        + ["start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        subprocess.run(
            [str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "digits"]
            + ["digits"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql+psycopg://digits@127.0.0.1:{port}/digits"
    finally:
        subprocess.run(
            as_postgres_user([*pg_ctl, "-m", "fast", "-w", "stop"]), capture_output=True, timeout=60
        )
        shutil.rmtree(folder, ignore_errors=True)


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


NUMBER_CANVAS = (840, 280)  # width, height: a canvas wide enough for a four-digit number


def render_line(
    glyphs: Sequence[np.ndarray], size: tuple[int, int] = NUMBER_CANVAS, transparent: bool = True
) -> bytes:
    """Draw 28x28 glyphs (MNIST digits: light ink on black) left to right on one line, as the
    page sends a number: dark strokes on a transparent background (or on white), each glyph
    scaled up smoothly in its own equal slot, at most 3/4 of the canvas height, so that
    neighbours do not touch. Encoded as PNG."""
    ink = glyphs_in_slots(list(glyphs), size)
    if transparent:
        canvas = Image.new("RGBA", size, (20, 20, 20, 0))
        canvas.putalpha(Image.fromarray(ink))
    else:
        canvas = Image.fromarray(255 - ink)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def mnist_glyphs(text: str, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """MNIST test digits spelling `text`: the first drawing of each digit, the second for its
    second occurrence, and so on (a number's repeated digits differ, as written by hand)."""
    seen: dict[int, int] = {}
    glyphs = []
    for character in text:
        digit = int(character)
        glyphs.append(images[np.flatnonzero(labels == digit)[seen.get(digit, 0)]])
        seen[digit] = seen.get(digit, 0) + 1
    return glyphs


@pytest.fixture(scope="session")
def number_png(mnist_test) -> Callable[..., bytes]:
    """`number_png("2026", size=NUMBER_CANVAS)`: a number drawn with MNIST test digits on a
    wide canvas, as the page's canvas PNG."""

    def draw(text: str, size: tuple[int, int] = NUMBER_CANVAS, transparent: bool = True) -> bytes:
        return render_line(mnist_glyphs(text, *mnist_test), size, transparent)

    return draw


SCRIBBLE_POINTS = 30  # the test model refused 100 of 100 such scribbles (14 points: 90)


def scribble(seed: int, side: int = CANVAS_SIDE) -> Image.Image:
    """A dense tangle of strokes, dark on white: ink that no one would read as a digit."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (side, side), 255)
    points = rng.uniform(0.1 * side, 0.9 * side, size=(SCRIBBLE_POINTS, 2))
    ImageDraw.Draw(image).line([tuple(point) for point in points], fill=0, width=side // 18)
    return image


def scribble_glyph(seed: int) -> np.ndarray:
    """A scribble as a 28x28 glyph like MNIST's digits (light on black), for render_line."""
    return 255 - np.asarray(scribble(seed).resize((28, 28), Image.Resampling.BOX))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@pytest.fixture(scope="session")
def canvas_png() -> Callable[..., bytes]:
    """`canvas_png(digit, transparent=True)`: an MNIST digit drawn as the page's canvas PNG."""
    return render_canvas
