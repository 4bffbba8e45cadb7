"""The `package` stage: promote the best compatible model to `champion` and hand it to BentoML.

Run with `python -m pipelines.package` (the last stage of `dvc repro`). It

1. makes sure MLflow knows the pipeline's model (`models/model.keras`): on a machine that got
   the model from git and DVC (a fresh clone, `dvc pull`) rather than by training, the run is
   recorded from the model file and its reports (see `tracking.ensure_model_run`);
2. picks the best finished run of experiment `digits` by validation accuracy (never by test
   accuracy), among runs trained on the current data (MNIST, the non-digit drawings and the
   users' accepted corrections) and the current preprocessing contract, so an old
   incompatible run, or one that never saw the corrections, can never win;
3. registers that run's model as a version of `digits-cnn` unless it is registered already;
4. moves the alias `champion` to it only through a quality gate: test accuracy at least
   `package.min_test_accuracy`, and no worse than the current champion beyond
   `package.tolerance`; once there are at least `package.min_user_drawings` of the users'
   reviewed drawings held out for testing (the feedback stage), also no worse than the champion
   on them beyond `package.user_tolerance`, both models judged on the same drawings. Each
   version is judged once (the verdict is its `gate` tag), so a rollback holds until a new
   model is trained;
5. imports the champion into the local BentoML store as
   `digits-cnn:v<version>-<run>-<line reader>`, which `bentoml serve` then loads as
   `digits-cnn:latest`: the Keras file plus its LiteRT conversion (`model.tflite`, what the
   service runs), and the pipeline's line reader (`models/line_reader.keras`, the
   `train_lines` stage's) as `line_reader.tflite`, each checked to give the same outputs.
   The registry versions the CNN; DVC versions the line reader (its md5 names the entry), so a
   rollback serves the earlier CNN with the current line reader.

The stores it writes are this machine's, not files DVC can see, so dvc.yaml marks the stage
`always_changed`: every `dvc repro` runs it, and when the stores already hold the champion it
changes nothing and takes seconds. What it decided goes to the log, not to a tracked file.

Roll back by promoting an earlier registry version (no gate, it is a human decision):

    python -m pipelines.package --version 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import bentoml
import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.download import file_md5, load_prepared
from pipelines.lines import line_input
from pipelines.preprocessing import INPUT_SHAPE, PREPROCESSING_VERSION, as_batch
from service.runtime import LINE_READER_FILE, SERVING_MODEL_FILE, LiteRTModel

log = logging.getLogger("package")

CHAMPION = "champion"
GATE_TAG = "gate"  # on a registry version: "passed", or why the gate refused it
BENTO_MODEL = tracking.REGISTERED_MODEL
BENTO_MODEL_FILE = "model.keras"
MAX_SERVING_DIFFERENCE = 1e-4  # LiteRT against Keras, in probability; float32 round-off is ~1e-6
PROBE_IMAGES = 256  # validation images on which the two must agree


class PackageError(Exception):
    """The stage cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class PackageSettings:
    min_test_accuracy: float
    tolerance: float
    min_user_drawings: int  # users' test drawings needed before the gate compares on them
    user_tolerance: float


def find_best_run(
    client: MlflowClient, data_hash: str, corrections: str, not_digits: str | None = None
) -> Run:
    """The finished, evaluated run with the best validation accuracy on this data (MNIST's hash,
    the corrections' hash and, when given, the non-digit drawings' hash) and contract."""
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        raise PackageError(f"no MLflow experiment '{tracking.EXPERIMENT}': run the train stage")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.data_hash = '{data_hash}' "
            f"and tags.{tracking.CORRECTIONS_TAG} = '{corrections}' "
            f"and tags.preprocessing_version = '{PREPROCESSING_VERSION}' "
            "and attributes.status = 'FINISHED' and metrics.test_accuracy >= 0"
            + (f" and tags.{tracking.NOT_DIGITS_TAG} = '{not_digits}'" if not_digits else "")
        ),
        order_by=["metrics.val_accuracy DESC", "attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise PackageError(
            f"no evaluated run for data {data_hash}, corrections {corrections} and "
            f"preprocessing {PREPROCESSING_VERSION}"
        )
    return runs[0]


def register(client: MlflowClient, run: Run) -> ModelVersion:
    """The registry version holding this run's model, created only if there is none yet."""
    existing = client.search_model_versions(
        f"name = '{tracking.REGISTERED_MODEL}' and run_id = '{run.info.run_id}'"
    )
    if existing:
        version = min(existing, key=lambda version: int(version.version))
    else:
        registered = mlflow.register_model(tracking.model_uri(run), tracking.REGISTERED_MODEL)
        version = client.get_model_version(tracking.REGISTERED_MODEL, registered.version)
    tracking.describe_version(client, version, run)
    return client.get_model_version(tracking.REGISTERED_MODEL, version.version)


def current_champion(client: MlflowClient) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(tracking.REGISTERED_MODEL, CHAMPION)
    except MlflowException:
        return None


def gate(candidate: Run, champion: Run | None, settings: PackageSettings) -> str | None:
    """Why the candidate may not become champion, or None when it passes."""
    accuracy = candidate.data.metrics["test_accuracy"]
    if accuracy < settings.min_test_accuracy:
        return f"test accuracy {accuracy:.4f} is below the floor {settings.min_test_accuracy:.4f}"
    if champion is not None and is_compatible(champion, champion.data.tags.get("data_hash", "")):
        best = champion.data.metrics.get("test_accuracy", 0.0)
        if accuracy < best - settings.tolerance:
            return (
                f"test accuracy {accuracy:.4f} is worse than the champion's {best:.4f} "
                f"beyond the tolerance {settings.tolerance}"
            )
    return None


def users_gate(
    candidate: ModelVersion,
    champion: ModelVersion | None,
    users: dict[str, np.ndarray],
    settings: PackageSettings,
) -> str | None:
    """Why the candidate may not replace the champion on the users' own drawings, or None.

    Only judged with enough test drawings to tell; both models are scored on the same ones,
    whatever corrections the champion was trained with.
    """
    count = len(users["y_test"])
    if champion is None or count < settings.min_user_drawings:
        return None
    new, old = (users_accuracy(version, users) for version in (candidate, champion))
    log.info("users' %d test images: candidate %.4f, champion %.4f", count, new, old)
    if new < old - settings.user_tolerance:
        return (
            f"accuracy on {count} users' test images {new:.4f} is worse than the champion's "
            f"{old:.4f} beyond the tolerance {settings.user_tolerance}"
        )
    return None


def users_accuracy(version: ModelVersion, users: dict[str, np.ndarray]) -> float:
    """The share of the users' test images a registry version answers with their label."""
    import keras

    with tempfile.TemporaryDirectory() as folder:
        model = keras.saving.load_model(download_model_file(version, Path(folder)), compile=False)
        outputs = model(as_batch(users["x_test"] / 255.0), training=False)
    return float((np.asarray(outputs).argmax(axis=1) == users["y_test"]).mean())


def load_users(corrections: Path | None) -> dict[str, np.ndarray]:
    """The feedback stage's dataset, or an empty one."""
    if corrections is not None:
        return load_prepared(corrections)
    return {"x_test": np.zeros((0, *INPUT_SHAPE[:2]), np.uint8), "y_test": np.zeros(0, np.int64)}


def is_compatible(run: Run, data_hash: str) -> bool:
    tags = run.data.tags
    return (
        tags.get("data_hash") == data_hash
        and tags.get("preprocessing_version") == PREPROCESSING_VERSION
    )


def bento_tag(version: ModelVersion, line_reader: Path) -> str:
    return f"{BENTO_MODEL}:v{version.version}-{version.run_id[:8]}-{file_md5(line_reader)[:8]}"


def download_model_file(version: ModelVersion, folder: Path) -> Path:
    """The registry version's `.keras` file, fetched from wherever the artifact store is."""
    source = MlflowClient().get_model_version_download_uri(
        tracking.REGISTERED_MODEL, version.version
    )
    uri = f"{source.rstrip('/')}/{tracking.KERAS_FILE_IN_ARTIFACT}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))


def export_for_serving(
    keras_file: Path, litert_file: Path, probes: np.ndarray | list[np.ndarray]
) -> float:
    """Convert a Keras model to the LiteRT file the service runs; check both agree.

    `probes` are inputs without their channel axis, or a list of such batches: (N, 28, 28)
    images for the CNN, strips (N, LINE_HEIGHT, W) of several widths for the line reader, which
    is exported for any width. Returns the largest difference in output; raises PackageError
    when it exceeds MAX_SERVING_DIFFERENCE.
    """
    import keras

    model = keras.saving.load_model(keras_file, compile=False)
    shape = model.input_shape[1:]  # (28, 28, 1), or (LINE_HEIGHT, None, 1)
    signature = [keras.InputSpec(shape=(None, *shape), dtype="float32")]
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the path it saved to
        model.export(str(litert_file), format="litert", input_signature=signature)
    served = LiteRTModel(str(litert_file), threads=1)
    difference = 0.0
    for batch in probes if isinstance(probes, list) else [probes]:
        expected = np.asarray(model(np.asarray(batch, np.float32)[..., np.newaxis]))
        difference = max(difference, float(np.abs(served(batch) - expected).max()))
    if not difference <= MAX_SERVING_DIFFERENCE:
        raise PackageError(
            f"the LiteRT conversion of {keras_file.name} differs from it by {difference:.2e}"
        )
    return difference


def probe_strips(images: np.ndarray) -> list[np.ndarray]:
    """Strips of 1 to 4 of `images` side by side, each (1, LINE_HEIGHT, its width)."""
    strips = []
    for count in range(1, 5):
        line = line_input(np.hstack(list(images[:count])))
        strips.append(line.pixels[np.newaxis, :, : line.width])
    return strips


def is_servable(model: bentoml.Model) -> bool:
    files = (SERVING_MODEL_FILE, LINE_READER_FILE)
    return all(Path(model.path_of(name)).is_file() for name in files)


def import_to_bentoml(
    version: ModelVersion, run: Run, line_reader: Path, probe_images: np.ndarray
) -> str:
    """Put the registry version and the line reader into the BentoML store as the latest
    `digits-cnn`; idempotent.

    The entry holds the Keras file, its LiteRT conversion and the line reader's, which the
    service runs.
    """
    tag = bento_tag(version, line_reader)
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        latest = str(bentoml.models.get(f"{BENTO_MODEL}:latest").tag) == tag
        if latest and is_servable(existing):
            log.info("BentoML store already serves %s", tag)
            return tag
    metrics, tags = run.data.metrics, run.data.tags
    metadata = {
        "mlflow_run_id": run.info.run_id,
        "registry_version": int(version.version),
        "val_accuracy": metrics.get("val_accuracy"),
        "test_accuracy": metrics.get("test_accuracy"),
        "canvas_accuracy": metrics.get("canvas_accuracy"),
        "data_hash": tags.get("data_hash"),
        "corrections_version": tags.get(tracking.CORRECTIONS_TAG),
        "git_commit": tags.get("git_commit"),
        "preprocessing_version": tags.get("preprocessing_version"),
        "trained_at": datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(),
        "line_reader_md5": file_md5(line_reader),
    }
    metadata = {key: value for key, value in metadata.items() if value is not None}
    labels = {"registry_version": str(version.version), "stage": CHAMPION}
    with tempfile.TemporaryDirectory() as folder:
        keras_file = download_model_file(version, Path(folder))
        litert_file = Path(folder) / SERVING_MODEL_FILE
        difference = export_for_serving(keras_file, litert_file, probe_images)
        line_file = Path(folder) / LINE_READER_FILE
        strips = probe_strips(probe_images)
        difference = max(difference, export_for_serving(line_reader, line_file, strips))
        if existing is not None:
            # Re-created so that it becomes `latest` again, or gains the LiteRT file that
            # entries packaged by older code lack; only once the new files are ready.
            bentoml.models.delete(tag)
        with bentoml.models.create(tag, labels=labels, metadata=metadata) as ref:
            shutil.copyfile(keras_file, ref.path_of(BENTO_MODEL_FILE))
            shutil.copyfile(litert_file, ref.path_of(SERVING_MODEL_FILE))
            shutil.copyfile(line_file, ref.path_of(LINE_READER_FILE))
    log.info(
        "imported registry version %s into the BentoML store as %s (LiteRT within %.1e)",
        version.version,
        tag,
        difference,
    )
    return tag


def promote_best(
    client: MlflowClient,
    data_hash: str,
    users: Path | None,
    settings: PackageSettings,
    not_digits: str | None = None,
) -> str:
    """Steps 2-4 of the module docstring; returns what happened, for the log."""
    candidate = find_best_run(client, data_hash, tracking.corrections_hash(users), not_digits)
    version = register(client, candidate)
    champion = current_champion(client)
    if champion is not None and champion.version == version.version:
        return f"version {version.version} is already the champion"
    if champion is not None and GATE_TAG in version.tags:
        return (
            f"version {version.version} was judged before ({version.tags[GATE_TAG]}); "
            f"champion stays at version {champion.version}"
        )
    champion_run = client.get_run(champion.run_id) if champion else None
    refusal = gate(candidate, champion_run, settings) or users_gate(
        version, champion, load_users(users), settings
    )
    client.set_model_version_tag(
        tracking.REGISTERED_MODEL, version.version, GATE_TAG, refusal or "passed"
    )
    if refusal is None:
        client.set_registered_model_alias(tracking.REGISTERED_MODEL, CHAMPION, version.version)
        return f"version {version.version} promoted to champion"
    if champion is None:
        raise PackageError(
            f"no champion: the best run {candidate.info.run_id} fails the gate: {refusal}"
        )
    return (
        f"version {version.version} not promoted, champion stays "
        f"at version {champion.version}: {refusal}"
    )


def roll_back(client: MlflowClient, version_number: int, data_hash: str) -> str:
    """Make an earlier registry version the champion again, if it fits the current contract."""
    try:
        version = client.get_model_version(tracking.REGISTERED_MODEL, str(version_number))
    except MlflowException as error:
        raise PackageError(f"no version {version_number} of {tracking.REGISTERED_MODEL}") from error
    if not is_compatible(client.get_run(version.run_id), data_hash):
        raise PackageError(
            f"version {version_number} was trained on other data or preprocessing; "
            "the service could not read drawings the way it expects"
        )
    client.set_registered_model_alias(tracking.REGISTERED_MODEL, CHAMPION, version.version)
    return f"rolled back: version {version.version} is the champion"


def record_pipeline_model(
    args: argparse.Namespace, params: dict, not_digits: Path | None = None
) -> None:
    """Step 1: the run of the model in `args.model`, with its validation and test figures."""
    scores = {
        **tracking.train_scores(json.loads(args.train_metrics.read_text())),
        **tracking.evaluation_scores(json.loads(args.metrics.read_text())),
    }
    run = tracking.ensure_model_run(
        args.model, args.data, params, scores, args.corrections, not_digits
    )
    log.info("the pipeline's model is run %s (%s)", run.info.run_id, run.info.run_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--not-digits", type=Path, default=Path("data/prepared/not_digits.npz"))
    parser.add_argument("--corrections", type=Path, help="users' accepted corrections (npz)")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--train-metrics", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--line-reader", type=Path, default=Path("models/line_reader.keras"))
    parser.add_argument("--version", type=int, help="promote this registry version (rollback)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    params = tracking.load_params(args.params)
    settings = PackageSettings(**params["package"])
    tracking.connect()
    client = MlflowClient()
    data_hash = file_md5(args.data)
    try:
        if args.version is None:
            # the non-digit drawings the pipeline trained on (absent: any run's will do)
            not_digits = args.not_digits if args.not_digits.exists() else None
            record_pipeline_model(args, params, not_digits)
            drawings_hash = file_md5(not_digits) if not_digits else None
            decision = promote_best(client, data_hash, args.corrections, settings, drawings_hash)
        else:
            decision = roll_back(client, args.version, data_hash)
        log.info(decision)
        champion = current_champion(client)
        probe_images = load_prepared(args.data)["x_val"][:PROBE_IMAGES] / 255.0
        bentoml_tag = import_to_bentoml(
            champion, client.get_run(champion.run_id), args.line_reader, probe_images
        )
    except PackageError as error:
        raise SystemExit(f"package: {error}") from None
    log.info("the champion is version %s, served as %s", champion.version, bentoml_tag)


if __name__ == "__main__":
    main()
