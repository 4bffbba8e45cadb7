"""The package stage on a real MLflow store and a real BentoML store: who becomes champion, and
what reaches BentoML. The stage runs as a user runs it, `python -m pipelines.package`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.download import file_md5, read_split
from pipelines.lines import LINE_CLASSES
from pipelines.package import probe_strips
from pipelines.preprocessing import INPUT_SHAPE, as_batch
from pipelines.train_lines import build_line_reader
from service.runtime import LiteRTModel
from tests.helpers import REPO, SHARED_MNIST

pytestmark = pytest.mark.slow


class Store:
    """A throw-away MLflow store, BentoML store and data file, plus ways to fill and query them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "mnist.npz"  # like the download stage's; the stage reads x_val
        np.savez(self.data, x_val=read_split(SHARED_MNIST, "t10k")[0][:300])
        self.params = root / "params.yaml"
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["package"] = {
            "min_test_accuracy": 0.9,
            "tolerance": 0.001,
            "min_user_drawings": 30,
            "user_tolerance": 0.02,
        }
        self.params.write_text(yaml.safe_dump(params))
        self.model = root / "model.keras"
        self.line_reader = root / "line_reader.keras"  # a small untrained one: only its file
        build_line_reader(filters=(4, 4, 4, 4)).save(self.line_reader)  # matters here
        self.trained = root / "train.json"
        self.evaluated = root / "metrics.json"
        self.env = {
            **os.environ,
            "BENTOML_HOME": str(root / "bentoml"),
        }
        self.use_tracking_store(f"sqlite:///{root / 'mlflow.db'}")

    def use_tracking_store(self, uri: str) -> None:
        """Point this test and the stage at the MLflow store `uri`."""
        self.env["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(tracking.EXPERIMENT)
        self.client = MlflowClient()

    def log_run(
        self,
        val: float,
        test: float,
        data_hash: str | None = None,
        corrections: str = "none",
        answer: int | None = None,
        not_digits: str = "none",
    ) -> str:
        """A finished, evaluated run holding a small real Keras model, which becomes the
        pipeline's model (`model.keras` and its reports), as after train and evaluate. With
        `answer`, the model answers that class whatever it is shown."""
        model = keras.Sequential(
            [keras.Input(INPUT_SHAPE), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
        )
        if answer is not None:
            weights, _ = model.layers[-1].get_weights()
            model.layers[-1].set_weights([weights * 0, np.eye(10)[answer] * 10])
        tracking.save_keras_reproducibly(model, self.model)
        with mlflow.start_run() as run:
            mlflow.set_tags(
                tracking.lineage_tags(data_hash or file_md5(self.data), corrections, not_digits)
            )
            mlflow.set_tag(tracking.MODEL_MD5_TAG, file_md5(self.model))
            mlflow.log_metrics({"val_accuracy": val, "test_accuracy": test})
            tracking.log_keras_model(model, np.zeros((1, 28, 28), dtype=np.uint8))
        tracking.write_json({"val_accuracy": val, "val_loss": 0.1, "temperature": 1}, self.trained)
        tracking.write_json({"test_accuracy": test}, self.evaluated)
        return run.info.run_id

    def package(self, *extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "pipelines.package", "--params", str(self.params)]
        command += ["--data", str(self.data), "--model", str(self.model)]
        command += ["--line-reader", str(self.line_reader)]
        command += ["--train-metrics", str(self.trained), "--metrics", str(self.evaluated)]
        return subprocess.run(
            [*command, *extra],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def champion_tag(self) -> str:
        """The BentoML tag that the package stage gives the champion."""
        champion = self.client.get_model_version_by_alias("digits-cnn", "champion")
        line_reader = file_md5(self.line_reader)[:8]
        return f"digits-cnn:v{champion.version}-{champion.run_id[:8]}-{line_reader}"

    def champion_run(self) -> str:
        return self.client.get_model_version_by_alias("digits-cnn", "champion").run_id

    def bentoml(self, *arguments: str) -> str:
        """What the `bentoml` command prints for this store."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "bentoml"), *arguments],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def bento_models(self) -> list[dict]:
        return json.loads(self.bentoml("models", "list", "-o", "json"))

    def bento_model_folder(self, tag: str) -> Path:
        name, version = tag.split(":")
        return self.root / "bentoml" / "models" / name / version


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return Store(tmp_path)


def test_best_validation_run_becomes_champion_once_and_reaches_bentoml(store):
    store.log_run(val=0.990, test=0.995)
    best = store.log_run(val=0.993, test=0.994)
    for _ in range(2):  # the second run must change nothing
        result = store.package()
        assert result.returncode == 0, result.stderr
    assert store.champion_run() == best
    assert len(store.client.search_model_versions("name = 'digits-cnn'")) == 1
    [model] = store.bento_models()
    assert model["tag"] == store.champion_tag()
    assert best in store.bentoml("models", "get", "digits-cnn:latest")


def test_the_service_gets_a_litert_model_that_answers_like_the_keras_one(store):
    store.log_run(val=0.990, test=0.995)
    result = store.package()
    assert result.returncode == 0, result.stderr
    folder = store.bento_model_folder(store.champion_tag())
    images = read_split(SHARED_MNIST, "t10k")[0][:64] / 255.0
    expected = keras.saving.load_model(folder / "model.keras")(as_batch(images)).numpy()
    served = LiteRTModel(str(folder / "model.tflite"), threads=1)(images)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert served.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()
    # The line reader too, at any strip width.
    reader = keras.saving.load_model(store.line_reader)
    for strip in probe_strips(images[:4]):
        expected = np.asarray(reader(strip[..., np.newaxis]))
        served = LiteRTModel(str(folder / "line_reader.tflite"), threads=1)(strip)
        assert served.shape == expected.shape == (1, strip.shape[2] // 4, LINE_CLASSES)
        np.testing.assert_allclose(served, expected, atol=1e-5)

    # An entry packaged before the service ran LiteRT (or read lines) gets its files next run.
    (folder / "model.tflite").unlink()
    (folder / "line_reader.tflite").unlink()
    result = store.package()
    assert result.returncode == 0, result.stderr
    assert (folder / "model.tflite").is_file() and (folder / "line_reader.tflite").is_file()
    assert len(store.bento_models()) == 1

    # A new line reader (the train_lines stage ran) is a new entry, served as the latest.
    build_line_reader(filters=(4, 4, 4, 8)).save(store.line_reader)
    result = store.package()
    assert result.returncode == 0, result.stderr
    assert len(store.bento_models()) == 2
    assert store.bento_model_folder(store.champion_tag()).is_dir()


def users_corrections(folder: Path, label: int, count: int) -> Path:
    """A feedback-stage dataset whose `count` test images are all labelled `label`."""
    path = folder / "corrections.npz"
    images = read_split(SHARED_MNIST, "t10k")[0][:count]
    empty = np.zeros((0, 28, 28), np.uint8)
    np.savez(
        path,
        x_train=empty,
        y_train=np.zeros(0, np.int64),
        x_val=empty,
        y_val=np.zeros(0, np.int64),
        x_test=images,
        y_test=np.full(count, label),
    )
    return path


def test_gate_refuses_a_model_worse_on_users_drawings_once_there_are_enough(store):
    few = users_corrections(store.root, label=7, count=29)
    first = store.log_run(val=0.990, test=0.995, corrections=file_md5(few), answer=7)
    assert store.package("--corrections", str(few)).returncode == 0
    # Better on MNIST's figures, but it never answers 7: with 29 drawings the gate cannot tell.
    second = store.log_run(val=0.993, test=0.996, corrections=file_md5(few), answer=3)
    assert store.package("--corrections", str(few)).returncode == 0
    assert store.champion_run() == second

    store.package("--version", "1")
    enough = users_corrections(store.root, label=7, count=30)
    store.log_run(val=0.995, test=0.997, corrections=file_md5(enough), answer=3)
    result = store.package("--corrections", str(enough))
    assert result.returncode == 0, result.stderr
    assert "accuracy on 30 users' test images 0.0000 is worse than the champion's 1.0000" in (
        result.stderr
    )
    assert store.champion_run() == first
    assert first in store.bentoml("models", "get", "digits-cnn:latest")


def test_gate_moves_champion_only_for_a_model_that_is_not_worse_and_rollback_undoes_it(store):
    first = store.log_run(val=0.990, test=0.995)
    assert store.package().returncode == 0
    store.log_run(val=0.999, test=0.980)  # best on validation, clearly worse on test
    result = store.package()
    assert result.returncode == 0, result.stderr
    assert store.champion_run() == first
    assert "version 2 not promoted, champion stays at version 1" in result.stderr

    better = store.log_run(val=0.9995, test=0.996)
    assert store.package().returncode == 0
    assert store.champion_run() == better
    assert better in store.bentoml("models", "get", "digits-cnn:latest")

    result = store.package("--version", "1")
    assert result.returncode == 0, result.stderr
    assert store.champion_run() == first
    assert first in store.bentoml("models", "get", "digits-cnn:latest")

    # The next `dvc repro` runs the stage again: a rollback holds until a new model is trained.
    result = store.package()
    assert result.returncode == 0, result.stderr
    assert "version 3 was judged before (passed); champion stays at version 1" in result.stderr
    assert store.champion_run() == first
    assert first in store.bentoml("models", "get", "digits-cnn:latest")


def test_a_model_that_mlflow_does_not_know_is_recorded_then_promoted(store):
    """After `dvc pull` on a new machine, the model and its reports exist but no run does."""
    store.log_run(val=0.990, test=0.995)
    store.use_tracking_store("sqlite:///" + str(store.root / "empty.db"))

    result = store.package()
    assert result.returncode == 0, result.stderr
    champion = store.client.get_run(store.champion_run())
    assert champion.info.run_name == "imported"
    assert champion.data.metrics["test_accuracy"] == 0.995
    assert champion.data.tags[tracking.MODEL_MD5_TAG] == file_md5(store.model)
    assert champion.data.tags["data_hash"] == file_md5(store.data)
    assert champion.info.run_id in store.bentoml("models", "get", "digits-cnn:latest")

    result = store.package()  # and the next run finds it: nothing new is recorded
    assert result.returncode == 0, result.stderr
    assert "version 1 is already the champion" in result.stderr
    assert len(store.client.search_runs([champion.info.experiment_id])) == 1


def test_run_on_other_data_is_never_picked(store):
    current = store.log_run(val=0.990, test=0.990)
    store.log_run(val=0.999, test=0.999, data_hash="0" * 32)
    assert store.package().returncode == 0
    assert store.champion_run() == current


def test_run_trained_on_other_non_digit_drawings_is_never_picked(store):
    """New "not a digit" drawings make a new dataset: the model trained on them is served,
    even when one trained on the old drawings scored better on validation."""
    drawings = store.root / "not_digits.npz"
    np.savez(drawings, images=np.zeros((2, 28, 28), dtype=np.uint8))
    store.log_run(val=0.999, test=0.999, not_digits="0" * 32)
    current = store.log_run(val=0.990, test=0.990, not_digits=file_md5(drawings))
    assert store.package("--not-digits", str(drawings)).returncode == 0
    assert store.champion_run() == current


def test_below_the_floor_there_is_no_champion_and_a_clear_error(store):
    store.log_run(val=0.5, test=0.5)
    result = store.package()
    assert result.returncode != 0
    assert "below the floor" in result.stderr.strip().splitlines()[-1]
