"""End to end: `dvc repro` with the fast preset in a copy of the project, on real MLflow and
BentoML stores, with MNIST from the local mirror."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.download import MNIST_SHA256, file_sha256
from tests.helpers import make_fast_project, run_in

pytestmark = pytest.mark.slow


def bento_model(project, tag: str) -> dict:
    """What `bentoml models get` says about a model in the project's BentoML store."""
    return yaml.safe_load(run_in(project, "bentoml", "models", "get", tag).stdout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1, SQLite backend, local artifact store."""
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so teardown stops all its workers
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_repro_runs_every_stage_and_tracks_the_run(fast_project):
    metrics = json.loads((fast_project.root / "reports/metrics.json").read_text())
    assert 0.97 <= metrics["test_accuracy"] <= 1.0
    assert 0.0 <= metrics["expected_calibration_error"] <= 1.0
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    assert 0.5 < metrics["canvas_accuracy"] <= 1.0
    for report in ("confusion.csv", "calibration.csv", "misclassified.png", "train_history.csv"):
        assert (fast_project.root / "reports" / report).stat().st_size > 0

    mlflow.set_tracking_uri(fast_project.tracking_uri)
    client = MlflowClient()
    train = json.loads((fast_project.root / "reports/train.json").read_text())
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.metrics["test_accuracy"] == metrics["test_accuracy"]
    assert "val_accuracy" in run.data.metrics
    assert run.data.tags["data_hash"] == train["data_hash"]
    history = client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
    assert [point.step for point in history] == [1, 2]

    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    probabilities = np.asarray(model(np.zeros((2, 28, 28, 1), dtype=np.float32)))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_repro_ends_with_a_champion_in_registry_and_bentoml_store(fast_project):
    package = json.loads((fast_project.root / "reports/package.json").read_text())
    mlflow.set_tracking_uri(fast_project.tracking_uri)
    champion = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    assert int(champion.version) == package["champion_version"]

    stored = bento_model(fast_project, "digits-cnn:latest")
    assert f"{stored['name']}:{stored['version']}" == package["bentoml_tag"]
    metadata = stored["metadata"]
    assert metadata["mlflow_run_id"] == champion.run_id
    assert metadata["registry_version"] == int(champion.version)
    for key in ("val_accuracy", "test_accuracy", "data_hash", "git_commit", "trained_at"):
        assert metadata[key], key


def test_repro_on_an_unchanged_project_does_nothing(fast_project):
    started = time.perf_counter()
    result = run_in(fast_project, "dvc", "repro")
    assert "Stage 'train' didn't change, skipping" in result.stdout
    assert "Running stage" not in result.stdout
    assert time.perf_counter() - started < 60


def test_same_params_give_identical_metrics(fast_project):
    before = json.loads((fast_project.root / "reports/metrics.json").read_text())
    trained_before = json.loads((fast_project.root / "reports/train.json").read_text())
    run_in(fast_project, "dvc", "repro", "--force", "--single-item", "train")
    run_in(fast_project, "dvc", "repro", "--force", "--single-item", "evaluate")
    after = json.loads((fast_project.root / "reports/metrics.json").read_text())
    trained_after = json.loads((fast_project.root / "reports/train.json").read_text())
    assert trained_after["run_id"] != trained_before["run_id"]
    assert trained_after["val_accuracy"] == trained_before["val_accuracy"]
    assert after["test_accuracy"] == before["test_accuracy"]
    assert after["test_loss"] == before["test_loss"]


def corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_data_is_caught_by_checksum_before_training(fast_project):
    raw = fast_project.root / "data/raw/train-labels-idx1-ubyte.gz"
    # Run by hand, the stage's own SHA-256 check catches it and fetches the file again.
    corrupt(raw)
    result = run_in(fast_project, "python", "-m", "pipelines.download")
    assert "train-labels-idx1-ubyte.gz: checksum mismatch on disk" in result.stderr
    assert file_sha256(raw) == MNIST_SHA256[raw.name]
    # Through DVC, its hash check sees the change and restores the verified copy from cache.
    corrupt(raw)
    result = run_in(fast_project, "dvc", "repro")
    assert "Stage 'download' is cached - skipping run, checking out outputs" in result.stdout
    assert "Stage 'train' didn't change, skipping" in result.stdout
    assert file_sha256(raw) == MNIST_SHA256[raw.name]


def test_training_killed_part_way_changes_nothing_and_the_next_repro_completes(fast_project):
    mlflow.set_tracking_uri(fast_project.tracking_uri)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("digits-cnn", "champion")
    package_before = (fast_project.root / "reports/package.json").read_text()
    params = yaml.safe_load((fast_project.root / "params.yaml").read_text())
    params["train"]["seed"] += 1
    (fast_project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro = subprocess.Popen(
        ["dvc", "repro"],
        cwd=fast_project.root,
        env=fast_project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in repro.stdout:  # wait until training is under way
        if "epoch 1:" in line:
            break
    os.killpg(repro.pid, signal.SIGTERM)
    repro.communicate(timeout=120)
    assert repro.returncode != 0

    assert client.get_model_version_by_alias("digits-cnn", "champion").version == champion.version
    assert (fast_project.root / "reports/package.json").read_text() == package_before
    latest = bento_model(fast_project, "digits-cnn:latest")
    assert latest["metadata"]["mlflow_run_id"] == champion.run_id
    killed = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        filter_string="attributes.status != 'FINISHED'",
    )
    assert killed and all(run.info.status in ("KILLED", "FAILED") for run in killed)

    run_in(fast_project, "dvc", "repro")
    assert "Stage 'train' didn't change" in run_in(fast_project, "dvc", "repro").stdout


def test_team_mode_runs_the_pipeline_through_a_tracking_server(tmp_path, mlflow_server):
    project = make_fast_project(tmp_path, tracking_server=mlflow_server)
    assert not (project.root / "mlflow.db").exists()
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("digits-cnn", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.metrics["test_accuracy"] >= 0.97
    package = json.loads((project.root / "reports/package.json").read_text())
    assert package["run_id"] == champion.run_id
    model = mlflow.keras.load_model("models:/digits-cnn@champion")
    assert np.asarray(model(np.zeros((1, 28, 28, 1), dtype=np.float32))).shape == (1, 10)
