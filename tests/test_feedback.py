"""The reviewers' commands and the feedback stage, on a real SQLite store: nothing reaches the
dataset unreviewed, the dataset's bytes change only with the accepted set, and a reviewer sees
what deserves a second look."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from playwright.sync_api import Browser, expect

from pipelines.corrections import CorrectionStore
from pipelines.download import file_md5, load_prepared, read_split
from pipelines.drawing import canvas_image
from pipelines.feedback import FeedbackSettings, examples_of, split_of
from pipelines.preprocessing import NOT_A_DIGIT, SEVERAL_DIGITS
from tests.conftest import serve
from tests.helpers import REPO, SHARED_MNIST, FastProject, launched_chromium, run_in
from tests.test_web import Feedback, Glyph, centred, page_opener

SETTINGS = FeedbackSettings.from_params(
    yaml.safe_load((REPO / "params.yaml").read_text())["feedback"]
)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_split(SHARED_MNIST, "t10k")
    return images[:200], labels[:200]


def png_of(ink: np.ndarray) -> bytes:
    """MNIST-style ink (uint8) as the page sends it: strokes on a transparent canvas, 4x."""
    big = np.kron(ink, np.ones((4, 4), dtype=np.uint8))
    buffer = io.BytesIO()
    canvas_image(big, "transparent").save(buffer, format="PNG")
    return buffer.getvalue()


class Project:
    """A folder holding the corrections store, run like a user runs the commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "DIGITS_FEEDBACK_DIR": str(root / "feedback")}
        self.env.pop("DIGITS_FEEDBACK_URL", None)
        self.out = root / "corrections.npz"
        self.report = root / "corrections.json"

    def store(self) -> CorrectionStore:
        return CorrectionStore.from_env(self.env)

    def add(self, png: bytes, label: str, client: str = "203.0.113.7", **fields) -> str:
        store = self.store()
        try:
            return store.add(
                image_png=png, label=label, client_hash=store.client_hash(client), **fields
            )
        finally:
            store.close()

    def run(self, *arguments: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "pipelines.feedback",
            "--params",
            str(REPO / "params.yaml"),
        ]
        result = subprocess.run(
            [*command, *arguments],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result

    def export(self) -> dict[str, np.ndarray]:
        self.run("export", "--out", str(self.out), "--report", str(self.report))
        return load_prepared(self.out)


@pytest.fixture
def project(tmp_path) -> Project:
    return Project(tmp_path)


def test_with_no_corrections_the_dataset_is_empty_and_no_store_appears(project):
    data = project.export()
    assert all(len(data[f"y_{split}"]) == 0 for split in ("train", "val", "test"))
    assert data["x_train"].shape == (0, 28, 28)
    assert not (project.root / "feedback").exists()
    assert '"accepted": 0' in project.report.read_text()


def test_only_accepted_corrections_reach_the_dataset(project, mnist):
    images, labels = mnist
    ids = [project.add(png_of(images[i]), str(labels[i])) for i in range(6)]
    project.run("accept", ids[0], ids[1][:8])  # a unique prefix is enough
    project.run("reject", ids[2], "--reviewer", "ana")
    data = project.export()
    examples = sum(len(data[f"y_{split}"]) for split in ("train", "val", "test"))
    assert examples == 2
    store = project.store()
    rejected = store.get(ids[2])
    assert rejected.status == "rejected" and rejected.reviewed_by == "ana"
    assert rejected.reviewed_at is not None
    assert store.get(ids[3]).status == "pending"
    store.close()


def test_the_dataset_bytes_depend_only_on_the_accepted_set(project, mnist, tmp_path):
    images, labels = mnist
    ids = [project.add(png_of(images[i]), str(labels[i])) for i in range(40)]
    project.run("accept", *ids)
    project.export()
    first = project.out.read_bytes()
    project.add(png_of(images[50]), "not_a_digit")  # pending: changes nothing
    project.export()
    assert project.out.read_bytes() == first

    other = Project(tmp_path / "other")  # the same drawings accepted in another order
    other_ids = [other.add(png_of(images[i]), str(labels[i])) for i in reversed(range(40))]
    other.run("accept", *other_ids)
    other.export()
    assert other.out.read_bytes() == first


def test_drawings_spread_over_the_splits_at_about_their_shares(mnist):
    images, labels = mnist
    keys = [examples_of(png_of(images[i]), str(labels[i])).key for i in range(200)]
    splits = [split_of(key, SETTINGS) for key in keys]
    shares = {split: splits.count(split) / len(splits) for split in ("train", "val", "test")}
    assert 0.55 <= shares["train"] <= 0.85 and shares["test"] >= 0.1 and shares["val"] >= 0.03


def test_a_number_gives_one_example_per_digit_when_its_marks_match(mnist):
    images, labels = mnist
    number = np.hstack([images[0], images[1], images[2]])
    label = "".join(str(d) for d in labels[:3])
    example = examples_of(png_of(number), label)
    assert example.classes == tuple(int(d) for d in label)
    assert example.inputs.shape == (3, 28, 28) and example.inputs.dtype == np.uint8
    assert examples_of(png_of(number), label + "7") is None  # four digits, three marks
    assert examples_of(png_of(images[0]), "not_a_digit").classes == (NOT_A_DIGIT,)
    assert examples_of(b"not an image", "7") is None


def test_a_number_drawn_as_one_mark_of_touching_digits_teaches_several_digits(mnist):
    images, labels = mnist
    joined = np.maximum(np.pad(images[0], ((0, 0), (0, 14))), np.pad(images[1], ((0, 0), (14, 0))))
    example = examples_of(png_of(joined), f"{labels[0]}{labels[1]}")
    assert example.classes == (SEVERAL_DIGITS,) and example.inputs.shape == (1, 28, 28)


def test_duplicates_count_once_and_conflicting_labels_are_dropped(project, mnist):
    images, labels = mnist
    same = png_of(images[0])
    ids = [project.add(same, str(labels[0])) for _ in range(3)]
    ids += [project.add(png_of(images[1]), "1"), project.add(png_of(images[1]), "7")]
    project.run("accept", *ids)
    data = project.export()
    assert sum(len(data[f"y_{split}"]) for split in ("train", "val", "test")) == 1
    report = yaml.safe_load(project.report.read_text())
    assert report["duplicates"] == 2 and report["conflicting"] == 2


def test_review_shows_pending_drawings_with_what_looks_suspicious(project, mnist):
    images, labels = mnist
    for i in range(SETTINGS.many_from_client):
        project.add(png_of(images[i]), str(labels[i]), client="198.51.100.9")
    unlikely = project.add(
        png_of(images[100]), "5", client="192.0.2.1", model_answer="7", label_probability=0.001
    )
    project.add(png_of(images[100]), "5", client="192.0.2.2")
    result = project.run("review")
    sheet = project.root / "feedback" / "review.png"
    assert sheet.is_file()
    lines = {
        line.split()[1]: line for line in result.stdout.splitlines() if line[:3].strip().isdigit()
    }
    assert "model gave the label p=0.001" in lines[unlikely[:8]]
    assert "same drawing sent 2 times" in lines[unlikely[:8]]
    assert sum(f"client sent {SETTINGS.many_from_client}" in line for line in lines.values()) == 20
    assert "198.51.100.9" not in result.stdout  # clients are hashes, never addresses


def test_delete_removes_one_correction_or_everything_from_one_client(project, mnist):
    images, labels = mnist
    kept = project.add(png_of(images[0]), str(labels[0]), client="192.0.2.1")
    gone = project.add(png_of(images[1]), str(labels[1]), client="192.0.2.1")
    project.add(png_of(images[2]), str(labels[2]), client="192.0.2.99")
    project.add(png_of(images[3]), str(labels[3]), client="192.0.2.99")
    project.run("delete", gone)
    store = project.store()
    client = store.client_hash("192.0.2.99")
    store.close()
    assert "2 correction(s) deleted" in project.run("delete", "--client", client[:8]).stdout
    store = project.store()
    assert [c.id for c in store.list()] == [kept]
    store.close()


# ---- The whole loop: the page, a reviewer, the pipeline, the next champion -------------------


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium for one test: closed with it, so later modules' event loops are their own."""
    with launched_chromium() as browser:
        yield browser


BOXY_SIX: Glyph = [[(0.7, 0.0), (0.0, 0.0), (0.0, 1.0), (0.7, 1.0), (0.7, 0.5), (0.0, 0.5)]]


@pytest.mark.slow
def test_a_correction_sent_from_the_page_and_accepted_trains_the_next_champion(
    fast_project: FastProject,
    browser: Browser,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # A project of its own (the fast pipeline's, after `dvc repro`), with its own stores.
    project = FastProject(tmp_path / "project", tmp_path / "bentoml")
    shutil.copytree(fast_project.root, project.root, symlinks=True)
    shutil.copytree(fast_project.bentoml_home / "models", project.bentoml_home / "models")
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["package"]["tolerance"] = 0.01  # one more drawing moves a fast model's test figure
    (project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    corrections_dir = project.root / "feedback"

    # A person draws a (calculator-style) 6, says the answer is wrong and gives the digit.
    with serve(
        project.bentoml_home, tmp_path, DIGITS_WORKERS="1", DIGITS_FEEDBACK_DIR=str(corrections_dir)
    ) as base_url:
        pages = page_opener(browser, base_url, request)
        drawing = next(pages)()
        feedback = Feedback(drawing)
        drawing.draw(centred(BOXY_SIX))
        feedback.offered_answer()
        feedback.wrong.click()
        drawing.page.keyboard.type("6")
        _, reply = feedback.sent(lambda: drawing.page.keyboard.press("Enter"))
        expect(feedback.status).to_have_text("Thanks — saved for review: it is 6.")
        next(pages, None)  # photographs and closes the page

    # A reviewer sees it pending, and accepts it.
    review = run_in(project, sys.executable, "-m", "pipelines.feedback", "review").stdout
    assert reply["id"][:8] in review and "1 pending correction(s)" in review
    run_in(project, sys.executable, "-m", "pipelines.feedback", "accept", reply["id"][:8])

    # `dvc repro` exports it, trains on it and promotes the new model.
    run_in(project, "dvc", "repro")
    exported = yaml.safe_load((project.root / "reports" / "corrections.json").read_text())
    assert exported["accepted"] == 1 and exported["drawings"] == 1
    version = file_md5(project.root / "data" / "prepared" / "corrections.npz")
    (tmp_path / "after").mkdir()
    with (
        serve(project.bentoml_home, tmp_path / "after") as base_url,
        urllib.request.urlopen(f"{base_url}/info", timeout=10) as answer,
    ):
        info = json.loads(answer.read())
    assert info["corrections_version"] == version
