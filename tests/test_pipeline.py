"""End to end: `dvc repro` with the fast preset in a copy of the project, on real MLflow and
BentoML stores, with MNIST from the local mirror."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.download import MNIST_SHA256, file_md5, file_sha256
from pipelines.preprocessing import CLASSES
from tests.helpers import run_in

pytestmark = pytest.mark.slow


def model_runs(project) -> list:
    """The MLflow runs of the project's current `models/model.keras`, newest first."""
    mlflow.set_tracking_uri(project.tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digits")
    md5 = file_md5(project.root / "models/model.keras")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.model_md5 = '{md5}'",
        order_by=["attributes.start_time DESC"],
    )


def bento_model(project, tag: str) -> dict:
    """What `bentoml models get` says about a model in the project's BentoML store."""
    return yaml.safe_load(run_in(project, "bentoml", "models", "get", tag).stdout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_repro_runs_every_stage_and_tracks_the_run(fast_project):
    metrics = json.loads((fast_project.root / "reports/metrics.json").read_text())
    assert 0.97 <= metrics["test_accuracy"] <= 1.0
    assert 0.0 <= metrics["expected_calibration_error"] <= 1.0
    detail = json.loads((fast_project.root / "reports/metrics_detail.json").read_text())
    assert set(detail["per_class"]) == {str(d) for d in range(10)}
    pens = yaml.safe_load((fast_project.root / "params.yaml").read_text())["evaluate"]
    assert set(detail["pens"]) == {f"{width:g}" for width in pens["pen_widths"]}
    assert all(0.0 <= score <= 1.0 for pen in detail["pens"].values() for score in pen.values())
    assert 0.5 < metrics["canvas_accuracy"] <= 1.0
    for report in ("confusion.csv", "calibration.csv", "misclassified.png", "train_history.csv"):
        assert (fast_project.root / "reports" / report).stat().st_size > 0

    train = json.loads((fast_project.root / "reports/train.json").read_text())
    [run] = model_runs(fast_project)
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.metrics["test_accuracy"] == metrics["test_accuracy"]
    assert "val_accuracy" in run.data.metrics
    assert run.data.tags["data_hash"] == train["data_hash"]
    history = client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
    assert [point.step for point in history] == [1, 2]

    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    probabilities = np.asarray(model(np.zeros((2, 28, 28, 1), dtype=np.float32)))
    assert probabilities.shape == (2, CLASSES)  # the ten digits, then "not a digit"
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_repro_ends_with_a_champion_in_registry_and_bentoml_store(fast_project):
    [run] = model_runs(fast_project)
    champion = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["gate"] == "passed"

    stored = bento_model(fast_project, "digits-cnn:latest")
    line_reader = file_md5(fast_project.root / "models" / "line_reader.keras")[:8]
    assert stored["version"] == f"v{champion.version}-{champion.run_id[:8]}-{line_reader}"
    assert stored["metadata"]["line_reader_md5"].startswith(line_reader)
    metadata = stored["metadata"]
    assert metadata["mlflow_run_id"] == champion.run_id
    assert metadata["registry_version"] == int(champion.version)
    for key in ("val_accuracy", "test_accuracy", "data_hash", "git_commit", "trained_at"):
        assert metadata[key], key


def tracked_files(project) -> dict[str, bytes]:
    """dvc.lock and every file under reports/, as bytes."""
    paths = [project.root / "dvc.lock", *sorted((project.root / "reports").iterdir())]
    return {path.name: path.read_bytes() for path in paths}


def test_repro_on_an_unchanged_project_only_checks_the_stores(fast_project):
    before = tracked_files(fast_project)
    started = time.perf_counter()
    result = run_in(fast_project, "dvc", "repro")
    assert time.perf_counter() - started < 60
    for stage in ("download", "train", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout
    # feedback and package read and write stores that DVC cannot see: they always run, and
    # the feedback stage's unchanged output leaves training be.
    assert result.stdout.count("Running stage") == 2
    assert "Running stage 'feedback'" in result.stdout
    assert "Running stage 'package'" in result.stdout
    assert "version 1 is already the champion" in result.stderr
    assert tracked_files(fast_project) == before
    assert len(model_runs(fast_project)) == 1


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
    params = yaml.safe_load((fast_project.root / "params.yaml").read_text())
    params["train"]["seed"] += 1
    params["train"]["max_train_images"] = 3000  # a model is not the point here: a quick one
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
    latest = bento_model(fast_project, "digits-cnn:latest")
    assert latest["metadata"]["mlflow_run_id"] == champion.run_id
    killed = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        filter_string="attributes.status != 'FINISHED'",
    )
    assert killed and all(run.info.status in ("KILLED", "FAILED") for run in killed)

    run_in(fast_project, "dvc", "repro")
    assert "Stage 'train' didn't change" in run_in(fast_project, "dvc", "repro").stdout
