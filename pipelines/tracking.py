"""What every stage needs to read params.yaml, write reports and talk to MLflow, written once.

By default runs go to an embedded SQLite store, `mlflow.db` in the project root (open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`). Setting
`MLFLOW_TRACKING_URI` sends the same runs to a team's tracking server instead, with no code change.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from pipelines.preprocessing import INPUT_SHAPE, PREPROCESSING_VERSION, as_batch

EXPERIMENT = "digits"
REGISTERED_MODEL = "digits-cnn"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT = "model"
KERAS_FILE_IN_ARTIFACT = "data/model.keras"  # where the mlflow.keras flavor keeps the file


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


def lineage_tags(data_hash: str) -> dict[str, str]:
    """Tags that say which data and which input contract a run was trained on."""
    return {
        "git_commit": git_commit(),
        "data_hash": data_hash,
        "preprocessing_version": PREPROCESSING_VERSION,
        "input_shape": "x".join(map(str, INPUT_SHAPE)),
    }


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
