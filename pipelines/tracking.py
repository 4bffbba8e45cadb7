"""What every stage needs to read params.yaml, write reports and talk to MLflow, written once.

By default runs go to an embedded SQLite store, `mlflow.db` in the project root (open it with
`mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`). Setting
`MLFLOW_TRACKING_URI` sends the same runs to a team's tracking server instead, with no code change.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import subprocess
import types
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from matplotlib.figure import Figure
from mlflow.data.dataset import Dataset
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipelines.download import file_md5, load_prepared
from pipelines.preprocessing import INPUT_SHAPE, PREPROCESSING_VERSION, as_batch

EXPERIMENT = "digits"
REGISTERED_MODEL = "digits-cnn"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT = "model"
KERAS_FILE_IN_ARTIFACT = "data/model.keras"  # where the mlflow.keras flavor keeps the file
CORRECTIONS_TAG = "corrections_hash"  # which users' corrections (feedback stage) a model saw
NOT_DIGITS_TAG = "not_digits_hash"  # which "not a digit" drawings (download stage) it learnt
MODEL_MD5_TAG = "model_md5"  # ties a run to the exact model file that DVC versions
# MLflow 3's UI opens an experiment on the view its kind names; without this tag it guesses the
# GenAI traces view, empty here. The value is the UI's name for "model training".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows for a run or an experiment
DVC_EXP_NAME = "DVC_EXP_NAME"  # set by `dvc exp run` to the experiment's name
SPLITS = ("train", "validation", "test")
SHORT_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # as in the .npz keys
# The evaluation's figures that `dvc exp show` prints, one column each: with the experiment's
# name and date they fill about 190 of a 200-column terminal, so each must earn its place.
HEADLINE_METRICS = (
    "val_accuracy",  # what the package stage chooses by
    "test_accuracy",  # MNIST's score
    "test_loss",
    "expected_calibration_error",
    "canvas_accuracy",  # digits drawn as the page draws them
    "number_accuracy",  # whole numbers read exactly
    "test_not_digits_refused",  # drawings of other alphabets refused as "not a digit"
    "users_test_accuracy",  # users' corrected drawings held out for testing, once there are some
)
EVALUATION_ARTIFACTS = "evaluation"  # the run's folder for the evaluate stage's reports
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
    """Point MLflow at the configured store and experiment, marked as model training."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client = MlflowClient()
        client.set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
        )
        client.set_experiment_tag(
            experiment.experiment_id,
            NOTE_TAG,
            "The MNIST CNN of the digits project: one run per trained model (`dvc repro`, "
            "`dvc exp run`), with its params, datasets, validation and test metrics, "
            "evaluation images and the model itself. The package stage registers the best "
            f"as `{REGISTERED_MODEL}` and gives it the alias `champion`.",
        )


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


def lineage_tags(
    data_hash: str, corrections: str = "none", not_digits: str = "none"
) -> dict[str, str]:
    """Tags that say which data (MNIST's hash, the corrections' hash, the non-digit drawings'
    hash) and which input contract a run was trained on."""
    return {
        "git_commit": git_commit(),
        "data_hash": data_hash,
        CORRECTIONS_TAG: corrections,
        NOT_DIGITS_TAG: not_digits,
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
    not_digits_path: Path | None = None,
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
                    **lineage_tags(
                        file_md5(data_path),
                        corrections_hash(corrections_path),
                        file_md5(not_digits_path) if not_digits_path else "none",
                    ),
                    MODEL_MD5_TAG: file_md5(model_path),
                    "source": "model file versioned by DVC",
                }
            )
            mlflow.log_params(flatten(params))
            datasets = {"mnist": data_path}
            if corrections_path is not None:
                datasets["corrections"] = corrections_path
            log_datasets(datasets, ("train", "validation"))
            log_keras_model(model, load_prepared(data_path)["x_val"][:2])
        run = MlflowClient().get_run(started.info.run_id)
    missing = {name: value for name, value in metrics.items() if name not in run.data.metrics}
    if missing:
        with start_run(run_id=run.info.run_id):
            mlflow.log_metrics(missing, model_id=model_id_of(run))
        run = MlflowClient().get_run(run.info.run_id)
    return run


def model_requirements() -> list[str]:
    """The packages, pinned to what is installed, that loading the logged model needs."""
    return [
        f"{name}=={importlib.metadata.version(name)}"
        for name in ("tensorflow-cpu", "keras", "numpy")
    ]


def _save_keras_flavor(path: str, **kwargs: Any) -> None:
    """`mlflow.keras.save_model` into a folder created first (see `log_keras_model`)."""
    kwargs.pop("validate_serving_input", None)  # read by Model.log, not by the flavor
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **kwargs)


# The mlflow.keras flavor with its save step fixed for mlflow issue #16183; `Model.log` needs
# only a module-like object with a name (the LoggedModel's flavor) and `save_model`.
KERAS_FLAVOR = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_flavor)


def log_keras_model(model: Any, example_images: np.ndarray) -> str:
    """Log the model as the run's LoggedModel `model` (mlflow.keras flavor), with a signature
    and an input example; returns its model id.

    `mlflow.keras.log_model` fails when given an input example (mlflow issue #16183: its
    `save_model` writes the example before creating the folder that `Model.log` passes it). So
    this calls `Model.log`, what `mlflow.keras.log_model` itself calls, with the same flavor
    whose save step creates the folder first. Everything else is MLflow's own: the LoggedModel
    linked to the run (and to the metrics the run has so far), its params, the serving example
    checked by loading the model back, `runs:/<id>/model` and `models:/<model id>` both work.
    """
    example = as_batch(example_images.astype(np.float32) / 255.0)
    signature = mlflow.models.infer_signature(example, np.asarray(model(example)))
    active = mlflow.active_run()
    tags = MlflowClient().get_run(active.info.run_id).data.tags if active else {}
    md5 = tags.get(MODEL_MD5_TAG)
    info = Model.log(
        artifact_path=None,
        name=MODEL_ARTIFACT,
        flavor=KERAS_FLAVOR,
        model=model,
        signature=signature,
        input_example=example,
        pip_requirements=model_requirements(),  # inferring them would reload the model
        tags={MODEL_MD5_TAG: md5} if md5 else None,
    )
    return info.model_id


def model_id_of(run: Run) -> str | None:
    """The LoggedModel a run produced, or None for a run logged before models were LoggedModels
    (its model is only the artifact folder `model`)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    if outputs:
        return outputs[-1].model_id
    models = MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        max_results=1,
    )
    return models[0].model_id if models else None


def model_uri(run: Run) -> str:
    """Where the registry takes a run's model from: its LoggedModel (MLflow 3's way, so the
    version links to the model, its metrics and its datasets) or, for older runs, the folder."""
    model_id = model_id_of(run)
    return f"models:/{model_id}" if model_id else f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}"


# ---- Names and descriptions the UI shows --------------------------------------------------------


def run_name(train: Mapping[str, Any]) -> str:
    """What a training run is, as its name: `cnn-2x6ep-f16.32.64-s7` is two networks of 16, 32
    and 64 filters, 6 epochs, seeds from 7. Under `dvc exp run` it is the DVC experiment's name,
    so `dvc exp show` and MLflow name the same run alike."""
    experiment = os.environ.get(DVC_EXP_NAME)
    if experiment:
        return experiment
    filters = ".".join(str(width) for width in train["filters"])
    return f"cnn-{train['members']}x{train['epochs']}ep-f{filters}-s{train['seed']}"


def run_description(train: Mapping[str, Any], precision: str) -> str:
    """The run's description (Markdown): what was trained, on what, in a sentence."""
    members = train["members"]
    networks = (
        "One CNN" if members == 1 else f"{members} CNNs (averaged, seeds from {train['seed']})"
    )
    images = train["max_train_images"] or "all"
    return (
        f"{networks} with filters {'/'.join(map(str, train['filters']))}, "
        f"dropout {train['dropout']}, trained {train['epochs']} epochs in {precision} on {images} "
        "MNIST training digits plus drawings that are not digits; temperature and the "
        "not-a-digit threshold fitted on the validation split; tested by the evaluate stage."
    )


@contextmanager
def start_training_run(
    params: dict[str, Any],
    precision: str,
    lineage: Mapping[str, str],
    datasets: Mapping[str, Path],
) -> Iterator[Any]:
    """Start the train stage's run: named and described, with every param, the lineage tags
    (`lineage_tags`) and the training and validation datasets (`datasets`: name -> prepared
    .npz file)."""
    with start_run(run_name=run_name(params["train"])) as run:
        mlflow.set_tags(
            {
                **lineage,
                "precision": precision,  # what `auto` chose on this machine
                NOTE_TAG: run_description(params["train"], precision),
            }
        )
        if os.environ.get(DVC_EXP_NAME):
            mlflow.set_tag("dvc_exp_name", os.environ[DVC_EXP_NAME])
        mlflow.log_params(flatten(params))
        log_datasets(datasets, ("train", "validation"))
        yield run


def describe_version(client: MlflowClient, version: ModelVersion, run: Run) -> None:
    """Give a registry version the figures and lineage that say why it may serve: tags for the
    Models page's columns and a one-paragraph description."""
    metrics, tags = run.data.metrics, run.data.tags
    figures = {
        name: f"{metrics[name]:.4f}"
        for name in ("val_accuracy", "test_accuracy")
        if name in metrics
    }
    lineage = {
        name: tags[name]
        for name in ("data_hash", "preprocessing_version", "git_commit")
        if name in tags
    }
    for key, value in {**figures, **lineage}.items():
        if version.tags.get(key) != value:
            client.set_model_version_tag(REGISTERED_MODEL, version.version, key, value)
    scores = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in figures.items())
    description = (
        f"The model of run {run.info.run_name} ({run.info.run_id}): {scores}. Trained on data "
        f"{lineage.get('data_hash', '?')} with preprocessing "
        f"{lineage.get('preprocessing_version', '?')}, code {lineage.get('git_commit', '?')}."
    )
    if version.description != description:
        client.update_model_version(REGISTERED_MODEL, version.version, description=description)


# ---- Datasets -----------------------------------------------------------------------------------


def split_arrays(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """A prepared .npz file's images and labels per split ("train", "validation", "test").

    Reads the project's three layouts: MNIST's `x_train`/`y_train`/`x_val`/..., the
    corrections' `train_images`/`train_labels`/`val_images`/..., and the not-a-digit drawings'
    `images` with a `split` column (no labels: they are all class "not a digit").
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if "images" in arrays and "split" in arrays:
        return {split: (arrays["images"][arrays["split"] == split], None) for split in SPLITS}
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split, short in SHORT_SPLITS.items():
        for images, labels in (
            (f"x_{short}", f"y_{short}"),
            (f"{short}_images", f"{short}_labels"),
        ):
            if images in arrays:
                splits[split] = (arrays[images], arrays.get(labels))
    if not splits:
        raise ValueError(f"{path} holds none of the known splits: {sorted(arrays)}")
    return splits


def array_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """A short hash of every byte of a split (MLflow's own digest of NumPy data reads only
    the first 10,000 values, a dozen MNIST images)."""
    digest = hashlib.md5(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()[:8]


def log_dataset(
    images: np.ndarray, labels: np.ndarray | None, name: str, context: str, source: Path
) -> Dataset:
    """Log one split as an input of the active run: its name, role (`context`: train,
    validation or test), digest, shape and the file it came from. An empty split (no users'
    corrections yet) logs too, with shape (0, 28, 28), so every run says what it saw."""
    with warnings.catch_warnings():
        # A local path matches MLflow's local artifact source twice (it registers it twice)
        # and it warns about the ambiguity; either reading is the same.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = mlflow.data.from_numpy(
            images,
            targets=labels,
            source=str(source),
            name=name,
            digest=array_digest(images, labels),
        )
    mlflow.log_input(dataset, context=context)
    return dataset


def log_datasets(sources: Mapping[str, Path], splits: Iterable[str] = SPLITS) -> dict[str, Dataset]:
    """Log the wanted splits of each prepared file as inputs of the active run, named
    `<name>-<split>` (`mnist-train`, `not_digits-test`, `corrections-validation`)."""
    wanted = set(splits)
    logged: dict[str, Dataset] = {}
    for name, path in sources.items():
        for split, (images, labels) in split_arrays(path).items():
            if split in wanted:
                key = f"{name}-{split}"
                logged[key] = log_dataset(images, labels, key, split, path)
    return logged


# ---- Evaluation ---------------------------------------------------------------------------------


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Headline figures (HEADLINE_METRICS: what `dvc exp show` and `dvc metrics show` print)
    and the detail (every other figure: refusals, errors, per class, per canvas style, per
    number length). MLflow gets both."""
    headline = {name: value for name, value in metrics.items() if name in HEADLINE_METRICS}
    detail = {name: value for name, value in metrics.items() if name not in HEADLINE_METRICS}
    return headline, detail


def write_metrics(metrics: Mapping[str, Any], headline_path: Path, detail_path: Path) -> None:
    """Write the evaluation's figures as two files: the headline ones, a DVC metric, and the
    detail, a plain output, so `dvc exp show` stays a table one can read in a terminal."""
    headline, detail = split_metrics(metrics)
    write_json(headline, headline_path)
    write_json(detail, detail_path)


def confusion_figure(counts: np.ndarray) -> Figure:
    """The confusion matrix (counts[actual, predicted]) as a heat map with its counts."""
    figure = Figure(figsize=(6.4, 5.6), dpi=100)
    axes = figure.subplots()
    shown = np.log1p(counts)  # the diagonal's thousands would wash out the few mistakes
    axes.imshow(shown, cmap="Blues")
    for (actual, predicted), count in np.ndenumerate(counts):
        colour = "white" if shown[actual, predicted] > shown.max() / 2 else "black"
        axes.text(predicted, actual, str(count), ha="center", va="center", fontsize=7, color=colour)
    ticks = range(len(counts))
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(
        f"Confusion matrix, MNIST test ({int(np.trace(counts))} of {int(counts.sum())} right)"
    )
    figure.tight_layout()
    return figure


def reliability_figure(rows: list[dict[str, float]], ece: float) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    figure = Figure(figsize=(5.6, 5.0), dpi=100)
    axes = figure.subplots()
    confidence = [row["confidence"] for row in rows]
    accuracy = [row["accuracy"] for row in rows]
    sizes = [20 + 200 * row["count"] / max(r["count"] for r in rows) for row in rows]
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    axes.plot(confidence, accuracy, color="tab:blue")
    axes.scatter(confidence, accuracy, s=sizes, color="tab:blue", label="bins (area: images)")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Reliability, MNIST test (ECE {ece:.4f})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure


def log_evaluation(
    run: Run,
    metrics: Mapping[str, Any],
    datasets: Mapping[str, Path],
    reports: Iterable[Path],
    figures: Mapping[str, Figure],
) -> None:
    """Log the evaluate stage's results to the model's run: the test datasets, every figure
    as a metric linked to the run's LoggedModel and to MNIST's test split, the reports and the
    images (`figures`: file name -> figure) under `evaluation/` in its Artifacts tab."""
    with start_run(run_id=run.info.run_id):
        logged = log_datasets(datasets, ("test",))
        mlflow.log_metrics(
            evaluation_scores(dict(metrics)),
            model_id=model_id_of(run),
            dataset=logged.get("mnist-test"),
        )
        for path in reports:
            mlflow.log_artifact(str(path), artifact_path=EVALUATION_ARTIFACTS)
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"{EVALUATION_ARTIFACTS}/{name}")
