"""Every way a user deploys the project, proven from nothing: the README's main command on a
fresh clone, a second machine fed through a DVC remote, and team mode on a real PostgreSQL
behind a real `mlflow server`. (The container is tests/test_container.py.)

Each starts from the fast preset's project (`fast_project`), committed as a user's main would
be: its `dvc.lock` and reports in git, the model and data only in its DVC cache and stores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from pipelines.download import file_md5
from pipelines.preprocessing import CLASSES, bytes_to_input
from pipelines.segmentation import digit_probabilities
from service.runtime import SERVING_MODEL_FILE, LiteRTModel
from tests.conftest import data_url, free_port, render_canvas, running_server, serve
from tests.helpers import (
    REPO,
    SHARED_MNIST,
    SHARED_OMNIGLOT,
    FastProject,
    make_fast_project,
    run_in,
)

pytestmark = pytest.mark.slow

MAIN_JOB_TIMEOUT = 1200.0  # seconds for scripts/run to serve the fast preset from scratch


def commit_all(project: FastProject, message: str) -> None:
    run_in(project, "git", "add", "-A")
    run_in(
        project,
        *("git", "-c", "user.name=test", "-c", "user.email=test@localhost"),
        *("commit", "-qm", message),
    )


def git_status(project: FastProject) -> str:
    return run_in(project, "git", "status", "--porcelain").stdout


@pytest.fixture(scope="module")
def published(fast_project: FastProject) -> FastProject:
    """The fast project with the results of its `dvc repro` committed, like main."""
    if git_status(fast_project):
        commit_all(fast_project, "dvc repro")
    return fast_project


def clone(origin: FastProject, base: Path) -> FastProject:
    """`git clone` of a project on a new machine: empty DVC cache, MLflow and BentoML stores.

    The clone shares this checkout's virtual environment (a symlink: `scripts/setup` finds it
    installed and up to date), so the test spends its time on the project, not on pip."""
    base.mkdir(parents=True, exist_ok=True)
    project = FastProject(base / "clone", base / "bentoml")
    subprocess.run(
        ["git", "clone", "-q", str(origin.root), str(project.root)], check=True, timeout=120
    )
    (project.root / ".venv").symlink_to(REPO / ".venv")
    assert not (project.root / "mlflow.db").exists()
    assert not (project.root / ".dvc" / "cache").exists()
    assert not project.bentoml_home.exists()
    return project


def drawn_digits(count: int) -> tuple[list[bytes], list[int]]:
    """MNIST test digits drawn the way the page sends them (PNG of a 280x280 canvas)."""
    from pipelines.download import read_split

    images, labels = read_split(SHARED_MNIST, "t10k")
    return [render_canvas(image) for image in images[:count]], labels[:count].tolist()


def predict(base_url: str, png: bytes) -> dict:
    response = httpx.post(f"{base_url}/predict", json={"image": data_url(png)}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@contextlib.contextmanager
def main_job(project: FastProject, log_path: Path) -> Iterator[str]:
    """`scripts/run` exactly as the README gives it, on a free port; yields the base URL."""
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "PROMETHEUS_", "VIRTUAL_ENV"))
    }
    env.update(
        MNIST_MIRROR=str(SHARED_MNIST),
        OMNIGLOT_MIRROR=str(SHARED_OMNIGLOT),
        BENTOML_HOME=str(project.bentoml_home),
        HOST="127.0.0.1",
        PORT=str(port),
    )
    with running_server(
        ["scripts/run"], project.root, env, port, log_path, MAIN_JOB_TIMEOUT
    ) as base_url:
        yield base_url


def test_the_readme_main_command_serves_on_a_fresh_clone_and_leaves_it_clean(published, tmp_path):
    project = clone(published, tmp_path)
    pngs, labels = drawn_digits(5)
    with main_job(project, tmp_path / "main-job.log") as base_url:
        answers = [predict(base_url, png)["digit"] for png in pngs]
        info = httpx.get(f"{base_url}/info", timeout=10).json()
    assert answers == labels
    assert info["model_tag"].startswith("digits-cnn:v1-")
    # The clone trained again from the same code, data and params: dvc.lock (with the model's
    # MD5) and every report came out byte-identical, and the rest went to stores or ignored files.
    assert git_status(project) == ""
    assert (project.root / "mlflow.db").is_file()


def litert_probabilities(bentoml_home: Path, tag: str, pngs: list[bytes]) -> np.ndarray:
    name, version = tag.split(":")
    model_file = bentoml_home / "models" / name / version / SERVING_MODEL_FILE
    inputs = np.stack([bytes_to_input(png) for png in pngs])
    return LiteRTModel(str(model_file), threads=1)(inputs)


def test_a_second_machine_serves_the_champion_from_a_dvc_remote_without_training(
    published, tmp_path
):
    remote = tmp_path / "remote"
    run_in(published, "dvc", "remote", "add", "--local", "-d", "team", str(remote))
    run_in(published, "dvc", "push")

    project = clone(published, tmp_path / "machine-b")
    run_in(project, "dvc", "remote", "add", "--local", "-d", "team", str(remote))
    run_in(project, "dvc", "pull")
    result = run_in(project, "dvc", "repro")
    assert "Running stage 'train'" not in result.stdout
    assert "Running stage 'train_lines'" not in result.stdout
    assert "Stage 'train' didn't change, skipping" in result.stdout
    assert git_status(project) == ""

    mlflow.set_tracking_uri(project.tracking_uri)
    champion = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    run = MlflowClient().get_run(champion.run_id)
    assert run.info.run_name == "imported"
    assert run.data.metrics["test_accuracy"] >= 0.97

    # Machine A's answers: its own champion in its own BentoML store.
    mlflow.set_tracking_uri(published.tracking_uri)
    champion_a = MlflowClient().get_model_version_by_alias("digits-cnn", "champion")
    line_reader = file_md5(published.root / "models" / "line_reader.keras")[:8]
    tag_a = f"digits-cnn:v{champion_a.version}-{champion_a.run_id[:8]}-{line_reader}"
    pngs, labels = drawn_digits(8)
    expected = digit_probabilities(litert_probabilities(published.bentoml_home, tag_a, pngs))

    with serve(project.bentoml_home, tmp_path) as base_url:
        answers = [predict(base_url, png) for png in pngs]
    assert [answer["digit"] for answer in answers] == labels
    served = np.array([answer["probabilities"] for answer in answers])
    np.testing.assert_allclose(served, expected, atol=2e-6)
    assert answers[0]["model_version"] == f"digits-cnn:v1-{champion.run_id[:8]}-{line_reader}"


# ---- Team mode: PostgreSQL and a tracking server -----------------------------------------------


@pytest.fixture
def mlflow_server(postgres: str, tmp_path: Path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 whose backend store is the PostgreSQL above."""
    port = free_port()
    with open(tmp_path / "mlflow-server.log", "wb") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                *("server", "--backend-store-uri", postgres),
                *("--artifacts-destination", str(tmp_path / "artifacts")),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            ],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown stops all its workers
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write((tmp_path / "mlflow-server.log").read_text(errors="replace"))
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_team_mode_runs_the_pipeline_through_mlflow_on_postgresql(
    tmp_path, postgres, mlflow_server
):
    project = make_fast_project(tmp_path, tracking_server=mlflow_server)
    assert not (project.root / "mlflow.db").exists()

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    champion = client.get_model_version_by_alias("digits-cnn", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.metrics["test_accuracy"] >= 0.97
    model = mlflow.keras.load_model("models:/digits-cnn@champion")
    assert np.asarray(model(np.zeros((1, 28, 28, 1), dtype=np.float32))).shape == (1, CLASSES)

    # The server kept all of it in PostgreSQL, not in a file of its own.
    engine = sqlalchemy.create_engine(postgres)
    with engine.connect() as connection:
        runs = connection.execute(sqlalchemy.text("SELECT run_uuid FROM runs")).scalars().all()
        aliases = connection.execute(
            sqlalchemy.text("SELECT alias, version FROM registered_model_aliases")
        ).all()
    engine.dispose()
    assert champion.run_id in runs
    assert [(alias, str(version)) for alias, version in aliases] == [("champion", champion.version)]

    with serve(project.bentoml_home, tmp_path) as base_url:
        info = httpx.get(f"{base_url}/info", timeout=10).json()
        answer = predict(base_url, drawn_digits(1)[0][0])
    assert info["mlflow_run_id"] == champion.run_id
    assert answer["model_version"] == info["model_tag"]
