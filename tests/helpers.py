"""Test helpers: a throw-away copy of the project that runs the real pipeline on the fast preset."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from playwright.sync_api import Browser

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
SHARED_OMNIGLOT = REPO.parent / "shared" / "omniglot"
FAST_PARAMS = REPO / "tests" / "fast_params.yaml"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: the browser tests' real Chromium
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class FastProject:
    root: Path
    bentoml_home: Path
    tracking_server: str | None = None  # an MLflow server's URL; None uses the embedded store

    @property
    def tracking_uri(self) -> str:
        return self.tracking_server or f"sqlite:///{self.root / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        """The environment a user would have: the venv first on PATH, embedded stores."""
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("DIGITS_FEEDBACK_URL", None)
        env.update(
            DIGITS_FEEDBACK_DIR=str(self.root / "feedback"),  # a user's: in the project
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            MNIST_MIRROR=str(SHARED_MNIST),
            OMNIGLOT_MIRROR=str(SHARED_OMNIGLOT),
            BENTOML_HOME=str(self.bentoml_home),
            BENTOML_DO_NOT_TRACK="True",
            MLFLOW_TRACKING_URI=self.tracking_uri,
        )
        return env


def fast_params() -> dict:
    """params.yaml with the fast preset merged in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, overrides in yaml.safe_load(FAST_PARAMS.read_text()).items():
        params[section].update(overrides)
    return params


def copy_project(target: Path) -> None:
    """Copy the files git would commit (tracked and untracked-but-not-ignored) into target."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_in(project: FastProject, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=project.root, env=project.env(), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_fast_project(
    base: Path, bentoml_home: Path | None = None, tracking_server: str | None = None
) -> FastProject:
    """A git-initialised copy of the project whose `dvc repro` has run on the fast preset."""
    project = FastProject(base / "project", bentoml_home or base / "bentoml", tracking_server)
    project.root.mkdir(parents=True)
    copy_project(project.root)
    (project.root / "params.yaml").write_text(yaml.safe_dump(fast_params(), sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"],
        ["dvc", "repro"],
    ):
        run_in(project, *command)
    return project


def letter_settings(**overrides: object):
    """Small `download.letters` settings for tests: two fonts, four characters."""
    from pipelines.letters import LetterSettings

    values = dict(
        fonts=("futural", "scripts"),
        characters="ERT+",
        drawings=16,
        rotation_degrees=12.0,
        slant=0.3,
        stretch=0.25,
        wobble=0.04,
        seed=17,
    )
    return LetterSettings(**(values | overrides))


@contextlib.contextmanager
def launched_chromium() -> Iterator[Browser]:
    """Debian's Chromium under Playwright, closed when the block ends. While it runs,
    Playwright's sync API keeps an event loop running in this thread (asyncio.run() fails):
    other modules use it only within a fixture that ends with them."""
    from playwright.sync_api import sync_playwright  # only the browser tests need it

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup --browser)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
