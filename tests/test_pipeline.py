"""End to end: `dvc repro` with the fast preset in a copy of the project, on real MLflow and
BentoML stores, with MNIST from the local mirror."""

from __future__ import annotations

import json
import os
import time

import bentoml
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_in

pytestmark = pytest.mark.slow


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
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
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

    os.environ["BENTOML_HOME"] = str(fast_project.bentoml_home)
    stored = bentoml.models.get("digits-cnn:latest")
    assert str(stored.tag) == package["bentoml_tag"]
    metadata = stored.info.metadata
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
