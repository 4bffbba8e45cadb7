"""What `pipelines/tracking.py` puts into MLflow and DVC, and what a person then sees.

The fast tests log to a throw-away SQLite store. The slow ones (`-m slow`) read the fast
pipeline's project: `dvc exp show` must fit a 200-column terminal, and MLflow's own UI, served
by a real `mlflow server` and read in Debian's Chromium, must show the run by name, a metric,
the logged model, the MNIST dataset and, on the model's page, the `champion` alias.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from tests.conftest import free_port, stop_process
from tests.helpers import REPO, FastProject, launched_chromium, run_in

MLFLOW = REPO / ".venv" / "bin" / "mlflow"
TERMINAL_COLUMNS = 200  # the widest terminal `dvc exp show` may need
# README's compact view: the headline figures and the network's shape
COMPACT_EXP_SHOW = (
    "--drop",
    ".*",
    "--keep",
    r"^(Experiment|Created|[a-z_]+_(accuracy|refused|error)|train\.(epochs|filters|members))$",
)
SERVER_START_TIMEOUT = 90.0  # seconds; `mlflow server` starts in ~5 s, more on busy cores
UI_TIMEOUT_MS = 30_000  # the UI loads its scripts and asks the server for each panel


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A fresh SQLite tracking store with the experiment `digits` set, artifacts in tmp_path."""
    monkeypatch.chdir(tmp_path)  # the store keeps artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.DVC_EXP_NAME, raising=False)
    tracking.connect()
    yield MlflowClient()
    mlflow.set_tracking_uri(None)


def write_corrections(path: Path, train: int) -> None:
    """A users' corrections dataset in the feedback stage's layout, `train` training images."""
    arrays = {}
    for split, count in (("train", train), ("val", 0), ("test", 0)):
        arrays[f"{split}_images"] = np.zeros((count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.zeros((count,), dtype=np.int64)
    np.savez(path, **arrays)


# ---- Fast: names, metrics files, datasets, the LoggedModel ---------------------------------------


def test_run_name_says_members_epochs_filters_and_seed(monkeypatch):
    monkeypatch.delenv(tracking.DVC_EXP_NAME, raising=False)
    train = {"members": 2, "epochs": 6, "filters": [16, 32, 64], "seed": 7}
    assert tracking.run_name(train) == "cnn-2x6ep-f16.32.64-s7"


def test_run_name_is_the_dvc_experiment_name_under_dvc_exp_run(monkeypatch):
    monkeypatch.setenv(tracking.DVC_EXP_NAME, "chewy-lads")
    train = {"members": 2, "epochs": 6, "filters": [16, 32, 64], "seed": 7}
    assert tracking.run_name(train) == "chewy-lads"


def test_metrics_split_into_headline_figures_and_detail(tmp_path):
    metrics = {"test_accuracy": 0.99, "test_errors": 3, "canvas": {"thin": 0.98}}
    tracking.write_metrics(metrics, tmp_path / "metrics.json", tmp_path / "detail.json")
    headline, detail = tracking.split_metrics(metrics)
    assert headline == {"test_accuracy": 0.99}
    assert detail == {"test_errors": 3, "canvas": {"thin": 0.98}}
    assert (tmp_path / "metrics.json").read_text().count("\n") == 3  # braces and one figure


def test_datasets_are_logged_per_split_with_role_and_digest_even_when_empty(store, tmp_path):
    mnist, corrections = tmp_path / "mnist.npz", tmp_path / "corrections.npz"
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    np.savez(mnist, **{f"{x}_{s}": images for s in ("train", "val", "test") for x in "xy"})
    write_corrections(corrections, train=0)

    with tracking.start_run(run_name="datasets") as run:
        logged = tracking.log_datasets({"mnist": mnist, "corrections": corrections})
    assert set(logged) == {
        f"{name}-{split}" for name in ("mnist", "corrections") for split in tracking.SPLITS
    }

    inputs = store.get_run(run.info.run_id).inputs.dataset_inputs
    roles = {entry.dataset.name: entry.tags[0].value for entry in inputs}
    assert roles["mnist-validation"] == "validation" and roles["corrections-test"] == "test"
    digests = {entry.dataset.name: entry.dataset.digest for entry in inputs}
    assert len(digests["mnist-train"]) == 8
    assert digests["corrections-train"] == tracking.array_digest(
        np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.int64)
    )


def test_the_model_is_a_logged_model_of_the_run_with_signature_example_and_metrics(store):
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(11, "softmax")]
    )
    with tracking.start_run(run_name="model") as run:
        mlflow.log_metric("val_accuracy", 0.5)
        model_id = tracking.log_keras_model(model, np.zeros((2, 28, 28), np.uint8))

    finished = store.get_run(run.info.run_id)
    assert tracking.model_id_of(finished) == model_id
    assert tracking.model_uri(finished) == f"models:/{model_id}"
    logged = store.get_logged_model(model_id)
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    assert {metric.key for metric in logged.metrics} == {"val_accuracy"}
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 28, 28, 1)
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"
    loaded = mlflow.keras.load_model(f"runs:/{run.info.run_id}/{tracking.MODEL_ARTIFACT}")
    assert loaded(np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 11)


# ---- Slow: the fast pipeline's project in a terminal and in MLflow's UI -------------------------


@pytest.mark.slow
def test_dvc_exp_show_puts_every_headline_figure_in_the_first_200_columns(
    fast_project: FastProject,
):
    """What a 200-column terminal shows of `dvc exp show` (its pager, `less -S`, cuts the
    lines there): every figure of reports/metrics.json, with its value. DVC 3 adds a column for
    every param of params.yaml and every stage dependency's hash after them, so the whole table
    is wider (about 1,000 columns); those are what `less` scrolls to."""
    result = run_in(fast_project, "dvc", "exp", "show", "--no-fetch")  # the table `less` gets
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "Experiment" in line)[:TERMINAL_COLUMNS]
    workspace = next(line for line in lines if "workspace" in line)[:TERMINAL_COLUMNS]
    metrics = json.loads((fast_project.root / "reports/metrics.json").read_text())
    assert set(metrics) <= set(tracking.HEADLINE_METRICS)
    for name, value in metrics.items():
        assert f" {name} " in f"{header} ", f"{name} is not in view:\n{result.stdout[:4000]}"
        assert f" {value} " in f"{workspace} ", f"{name}'s value is not in view"

    compact = run_in(fast_project, "dvc", "exp", "show", "--no-fetch", *COMPACT_EXP_SHOW).stdout
    assert max(len(line.rstrip()) for line in compact.splitlines()) <= TERMINAL_COLUMNS
    assert " test_accuracy " in compact and " train.epochs " in compact


@contextlib.contextmanager
def mlflow_server(project: FastProject, log_path: Path) -> Iterator[str]:
    """A real `mlflow server` on the project's store, on a free port of 127.0.0.1; stopped
    with its whole process group on exit."""
    port = free_port()
    command = [str(MLFLOW), "server", "--backend-store-uri", project.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No job runner: it starts a dozen worker processes that these pages do not need.
    env = {**project.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as server_log:
        process = subprocess.Popen(
            command,
            cwd=project.root,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, which stop_process ends
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, process, log_path)
        yield base_url
    finally:
        stop_process(process)


def wait_for_health(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log_path.read_text()[-4000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server was not ready within {SERVER_START_TIMEOUT:.0f} s")


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_its_model_its_datasets_and_the_champion(
    fast_project: FastProject, tmp_path: Path
):
    from playwright.sync_api import expect

    mlflow.set_tracking_uri(fast_project.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    champion = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, "champion")
    run = client.get_run(champion.run_id)
    accuracy = str(run.data.metrics["test_accuracy"])
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND

    with (
        mlflow_server(fast_project, tmp_path / "server.log") as base_url,
        launched_chromium() as browser,
    ):
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)
        experiment_page = f"{base_url}/#/experiments/{experiment.experiment_id}"

        page.goto(f"{experiment_page}/runs")  # the runs table: the experiment is model training
        expect(page.get_by_text(run.info.run_name).first).to_be_visible()
        expect(page.get_by_text("mnist-train").first).to_be_visible()  # the dataset column

        page.goto(f"{experiment_page}/runs/{run.info.run_id}")
        expect(page.get_by_text(run.info.run_name).first).to_be_visible()
        expect(page.get_by_text(accuracy, exact=True).first).to_be_visible()
        expect(page.get_by_text("mnist-train").first).to_be_visible()  # "Datasets"
        # The metrics table's "Models" column links each metric to the LoggedModel `model`.
        model_link = page.get_by_role("link", name=tracking.MODEL_ARTIFACT, exact=True)
        expect(model_link.first).to_be_visible()

        page.goto(f"{base_url}/#/models/{tracking.REGISTERED_MODEL}")
        expect(page.get_by_text("champion").first).to_be_visible()
