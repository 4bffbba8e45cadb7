"""What every stage needs to read params.yaml, write reports and talk to MLflow, written once.

By default runs go to an embedded SQLite store, `mlflow.db` in the project root (open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`). Setting
`MLFLOW_TRACKING_URI` sends the same runs to a team's tracking server instead, with no code change.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipelines.download import file_md5, load_prepared
from pipelines.preprocessing import INPUT_SHAPE, PREPROCESSING_VERSION, as_batch

EXPERIMENT = "digits"
REGISTERED_MODEL = "digits-cnn"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT = "model"
KERAS_FILE_IN_ARTIFACT = "data/model.keras"  # where the mlflow.keras flavor keeps the file
CORRECTIONS_TAG = "corrections_hash"  # which users' corrections (feedback stage) a model saw
MODEL_MD5_TAG = "model_md5"  # ties a run to the exact model file that DVC versions
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def load_params(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        return yaml.safe_load(handle)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows with the same keys as a CSV file (for `dvc plots`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_keras_reproducibly(model: Any, path: Path) -> None:
    """Save a Keras model so that the same weights always give the same bytes.

    Keras stamps the save time into the archive (`metadata.json` and the weights entry's zip
    date). DVC versions this file, so those stamps would change `dvc.lock` on every run and a
    fresh clone would end with modified tracked files; they are dropped here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            stamped = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            stamped.compress_type = info.compress_type
            stamped.external_attr = info.external_attr
            archive.writestr(stamped, data)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}, the same keys `dvc exp run -S` uses."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect() -> None:
    """Point MLflow at the configured store and experiment."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)


@contextmanager
def start_run(run_name: str | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start a new run in experiment `digits`, or continue `run_id`."""
    connect()
    with mlflow.start_run(run_name=run_name, run_id=run_id) as run:
        yield run


def git_commit() -> str:
    """The commit the code came from, with '-dirty' when the work tree has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def corrections_hash(path: Path | None) -> str:
    """The version of the users' corrections a model learnt from: the MD5 of the dataset the
    feedback stage wrote, or "none" when training saw none."""
    return file_md5(path) if path is not None else "none"


def lineage_tags(data_hash: str, corrections: str = "none") -> dict[str, str]:
    """Tags that say which data (MNIST's hash, the corrections' hash) and which input contract
    a run was trained on."""
    return {
        "git_commit": git_commit(),
        "data_hash": data_hash,
        CORRECTIONS_TAG: corrections,
        "preprocessing_version": PREPROCESSING_VERSION,
        "input_shape": "x".join(map(str, INPUT_SHAPE)),
    }


def train_scores(train_report: dict[str, Any]) -> dict[str, float]:
    """The validation figures of `reports/train.json` that the train stage logs as metrics."""
    return {name: train_report[name] for name in ("val_accuracy", "val_loss", "temperature")}


def evaluation_scores(metrics_report: dict[str, Any]) -> dict[str, float]:
    """`reports/metrics.json` as MLflow metric names: nested keys joined by dots, no slashes."""
    flat = flatten({k: v for k, v in metrics_report.items() if k != "val_accuracy"})
    return {name.replace("/", "_"): value for name, value in flat.items()}


def find_model_run(model_path: Path) -> Run | None:
    """The newest finished run of experiment `digits` that produced this exact model file."""
    connect()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.{MODEL_MD5_TAG} = '{file_md5(model_path)}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def ensure_model_run(
    model_path: Path,
    data_path: Path,
    params: dict[str, Any],
    metrics: dict[str, float],
    corrections_path: Path | None = None,
) -> Run:
    """The MLflow run of this model, holding at least `metrics`; recorded anew when missing.

    The model DVC versions is the source of truth and MLflow is this machine's (or team's)
    record of it. After `dvc pull` on another machine, or with a wiped `mlflow.db`, no run knows
    the model: one named `imported` is logged with its params, lineage, metrics and the model
    itself, so the registry and the champion gate work as if it had been trained here.
    """
    run = find_model_run(model_path)
    if run is None:
        import keras

        model = keras.saving.load_model(model_path, compile=False)
        with start_run(run_name="imported") as started:
            mlflow.set_tags(
                {
                    **lineage_tags(file_md5(data_path), corrections_hash(corrections_path)),
                    MODEL_MD5_TAG: file_md5(model_path),
                    "source": "model file versioned by DVC",
                }
            )
            mlflow.log_params(flatten(params))
            log_keras_model(model, load_prepared(data_path)["x_val"][:2])
        run = MlflowClient().get_run(started.info.run_id)
    missing = {name: value for name, value in metrics.items() if name not in run.data.metrics}
    if missing:
        with start_run(run_id=run.info.run_id):
            mlflow.log_metrics(missing)
        run = MlflowClient().get_run(run.info.run_id)
    return run


def model_requirements() -> list[str]:
    """The packages, pinned to what is installed, that loading the logged model needs."""
    return [
        f"{name}=={importlib.metadata.version(name)}"
        for name in ("tensorflow-cpu", "keras", "numpy")
    ]


def log_keras_model(model: Any, example_images: np.ndarray) -> None:
    """Log the model with the mlflow.keras flavor, a signature and an input example.

    `mlflow.keras.log_model` fails when given an input example (mlflow issue #16183: it writes
    the example before creating its folder), so the flavor is saved into a folder that exists
    and logged as the run's `model` artifact, which the registry accepts as `runs:/<id>/model`.
    """
    example = as_batch(example_images.astype(np.float32) / 255.0)
    signature = mlflow.models.infer_signature(example, np.asarray(model(example)))
    with tempfile.TemporaryDirectory() as folder:
        mlflow.keras.save_model(
            model,
            folder,
            signature=signature,
            input_example=example,
            pip_requirements=model_requirements(),  # inferring them would reload the model
        )
        mlflow.log_artifacts(folder, artifact_path=MODEL_ARTIFACT)
