"""Does the feedback loop make the model better on what users actually draw? Measured end to end.

    python benchmarks/feedback_loop.py [--preset default|fast] [--corrections 200]

In a throw-away clone of this repository (its own MLflow, BentoML and corrections stores):

1. `dvc repro`: the baseline champion, served by a real `bentoml serve`;
2. every drawing style below is drawn fresh (a seed the corrections never use) and sent to
   `/predict`; the style the champion reads worst is the one users would correct;
3. N drawings of that style go to `POST /feedback` with their true label, as users correcting
   the page would send them, and are accepted with `python -m pipelines.feedback accept`;
4. `dvc repro` again: the feedback stage exports them, training mixes them in, the gate judges;
5. the new champion is served and measured on the same fresh drawings of every style.

It prints, before and after: each style's share read right and refused, MNIST test accuracy,
held-out non-digits refused, and the users' test accuracy. Styles are drawn with strokes
(jittered points, slant, size, position and pen width), like a mouse or finger on the page.
The default preset trains as `dvc repro` does here (about 30 minutes on 2 cores per run);
`--preset fast` uses the tests' preset (tests/fast_params.yaml) to check the loop in minutes;
`--dvc-cache .dvc/cache` starts from the committed model instead of training a baseline.
Data comes from MNIST_MIRROR / OMNIGLOT_MIRROR when set (as for `dvc repro`).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from common import BENTOML, REPO_ROOT, SERVICE, free_port, start_server, stop_server, wait_ready
from PIL import Image, ImageDraw

log = logging.getLogger("feedback_loop")

CANVAS = 280
FAST_TOLERANCE = 0.005  # the fast preset's gate: its small model's test accuracy is noisier
Point = tuple[float, float]


def ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 28) -> list[Point]:
    return [
        (cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, points)
    ]


@dataclass(frozen=True)
class Style:
    """A way of writing one digit: its strokes in a unit box (x right, y down)."""

    digit: int
    strokes: tuple[tuple[Point, ...], ...]


STYLES = {
    # Seven-segment ("calculator") digits, drawn in one stroke each.
    "boxy 6": Style(6, (((0.85, 0.08), (0.15, 0.08), (0.15, 0.92), (0.85, 0.92), (0.85, 0.5),
                         (0.15, 0.5)),)),
    "boxy 2": Style(2, (((0.15, 0.08), (0.85, 0.08), (0.85, 0.5), (0.15, 0.5), (0.15, 0.92),
                         (0.85, 0.92)),)),
    "boxy 9": Style(9, (((0.85, 0.5), (0.15, 0.5), (0.15, 0.08), (0.85, 0.08), (0.85, 0.92),
                         (0.15, 0.92)),)),
    "crossed 7": Style(7, (((0.15, 0.10), (0.85, 0.10), (0.40, 0.92)),
                           ((0.35, 0.50), (0.80, 0.50)))),
    "1 with a flag and a base": Style(1, (((0.30, 0.28), (0.55, 0.08), (0.55, 0.92)),
                                          ((0.30, 0.92), (0.80, 0.92)))),
    "open 4": Style(4, (((0.50, 0.05), (0.15, 0.62), (0.85, 0.62)),
                        ((0.65, 0.30), (0.65, 0.95)))),
    "9 with a straight tail": Style(9, (tuple(ellipse(0.5, 0.3, 0.3, 0.24)),
                                        ((0.80, 0.30), (0.80, 0.95)))),
    "slashed 0": Style(0, (tuple(ellipse(0.5, 0.5, 0.38, 0.45)), ((0.78, 0.12), (0.22, 0.88)))),
}  # fmt: skip


def draw(style: Style, rng: np.random.Generator) -> bytes:
    """One drawing of `style` as the page sends it: dark strokes on a transparent 280 px pad,
    with its own size, position, slant, pen width and a wobble on every point."""
    height = rng.uniform(0.55, 0.85) * CANVAS
    width = 0.75 * height
    slant = math.tan(math.radians(rng.uniform(-12, 12)))
    left = rng.uniform(0.05 * CANVAS, 0.95 * CANVAS - width)
    top = rng.uniform(0.05 * CANVAS, 0.95 * CANVAS - height)
    pen = int(rng.integers(12, 28))
    pad = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ink = ImageDraw.Draw(pad)
    for stroke in style.strokes:
        points = []
        for x, y in stroke:
            x, y = x + rng.normal(0, 0.03), y + rng.normal(0, 0.03)
            points.append((left + (x - (y - 0.5) * slant) * width, top + y * height))
        ink.line(points, fill=(20, 20, 20, 255), width=pen, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            ink.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=(20, 20, 20))
    buffer = io.BytesIO()
    pad.save(buffer, format="PNG")
    return buffer.getvalue()


def drawings(style: Style, count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [draw(style, rng) for _ in range(count)]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def served_model(port: int) -> str:
    """What /info says is served: the registry version and the corrections it learnt from."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/info")
        info = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return f"v{info['registry_version']} (corrections {info.get('corrections_version')})"


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST", path, json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@dataclass(frozen=True)
class StyleScore:
    right: float  # share answered with the style's digit
    refused: float  # share refused (not a digit, several digits)


def score_style(port: int, style: Style, images: Sequence[bytes]) -> StyleScore:
    answers = [post(port, "/predict", {"image": data_url(png)}) for png in images]
    right = sum(status == 200 and body.get("digit") == style.digit for status, body in answers)
    refused = sum(status == 422 for status, _ in answers)
    return StyleScore(right / len(images), refused / len(images))


class Clone:
    """A throw-away clone with its own stores, run the way a user runs the project."""

    def __init__(self, folder: Path, preset: str, dvc_cache: Path | None) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "BENTOML_HOME": str(folder / "bentoml"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "DIGITS_FEEDBACK_DIR": str(folder / "feedback"),
            "BENTOML_DO_NOT_TRACK": "True",
            "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        }
        self.env.pop("DIGITS_FEEDBACK_URL", None)
        if folder.exists():
            shutil.rmtree(folder)
        subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(folder)], check=True)
        if preset == "fast":
            self.use_fast_params()
        if dvc_cache is not None:  # start from the committed models, as after `dvc pull`
            self.run("dvc", "cache", "dir", "--local", str(dvc_cache.resolve()))
            self.run("dvc", "checkout")

    def use_fast_params(self) -> None:
        """tests/fast_params.yaml merged into params.yaml, section by section, and a gate
        tolerance for models whose test accuracy moves by a few tenths with any new data."""
        params = yaml.safe_load((self.folder / "params.yaml").read_text())
        fast = yaml.safe_load((self.folder / "tests" / "fast_params.yaml").read_text())
        for section, values in fast.items():
            params[section] = {**params.get(section, {}), **values}
        params["package"]["tolerance"] = FAST_TOLERANCE
        (self.folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(self, *command: str) -> str:
        """The command's output (stdout, then stderr, where the stages log)."""
        result = subprocess.run(
            list(command), cwd=self.folder, env=self.env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        return result.stdout + result.stderr

    def repro(self) -> float:
        started = time.perf_counter()
        log.info("dvc repro in %s (this trains)", self.folder)
        output = self.run("dvc", "repro")
        for line in output.splitlines():
            if "package:" in line and "champion" in line:  # what the gate decided
                log.info("%s", line.split("package: ", 1)[-1])
        return time.perf_counter() - started

    def metrics(self) -> dict:
        return json.loads((self.folder / "reports" / "metrics.json").read_text())

    def serving(self, work: Callable[[int], object]) -> object:
        """`work(port)` against `bentoml serve` of this clone's champion."""
        port = free_port()
        log_file = self.folder / "serve.log"
        process = start_server(BENTOML, SERVICE, port, log_file, self.folder, self.env)
        try:
            wait_ready(process, port, timeout=180)
            return work(port)
        finally:
            stop_server(process)


def send_corrections(port: int, style: Style, images: Sequence[bytes]) -> list[str]:
    """POST /feedback for each drawing with its true label; the ids answered 201."""
    ids = []
    for png in images:
        status, body = post(port, "/feedback", {"image": data_url(png), "label": str(style.digit)})
        if status != 201:
            raise RuntimeError(f"/feedback answered {status}: {body}")
        ids.append(body["id"])
    return ids


def headline(metrics: dict) -> dict[str, float | None]:
    return {
        "MNIST test accuracy": metrics.get("test_accuracy"),
        "non-digits refused": metrics.get("test_not_digits_refused"),
        "users' test accuracy": metrics.get("users_test_accuracy"),
    }


def report(
    style_name: str,
    count: int,
    before: dict[str, StyleScore],
    after: dict[str, StyleScore],
    figures: tuple[dict, dict],
    seconds: tuple[float, float],
) -> str:
    lines = [
        f"corrected style: {style_name!r}, {count} corrections sent through POST /feedback "
        "and accepted",
        "",
        f"{'style (fresh drawings)':<28} {'right before':>13} {'right after':>12} "
        f"{'refused before':>15} {'refused after':>14}",
    ]
    for name in STYLES:
        b, a = before[name], after[name]
        mark = "  <- corrected" if name == style_name else ""
        lines.append(
            f"{name:<28} {b.right:>13.1%} {a.right:>12.1%} {b.refused:>15.1%} "
            f"{a.refused:>14.1%}{mark}"
        )
    lines.append("")
    for name in figures[0]:
        old, new = figures[0][name], figures[1][name]
        lines.append(f"{name:<28} {_figure(old):>13} {_figure(new):>12}")
    lines.append(f"{'dvc repro seconds':<28} {seconds[0]:>13.0f} {seconds[1]:>12.0f}")
    return "\n".join(lines) + "\n"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("default", "fast"), default="default")
    parser.add_argument("--corrections", type=int, default=200, help="drawings sent as corrections")
    parser.add_argument("--test-drawings", type=int, default=200, help="fresh drawings per style")
    parser.add_argument("--style", choices=sorted(STYLES), help="default: the worst read")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/digits-feedback-loop"))
    parser.add_argument(
        "--dvc-cache",
        type=Path,
        help="a DVC cache holding the committed models (e.g. .dvc/cache after `dvc repro`): the "
        "baseline is then the committed model instead of a first training (default preset)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    clone = Clone(args.workdir, args.preset, args.dvc_cache)
    clone.env["DIGITS_FEEDBACK_PER_CLIENT_PER_HOUR"] = str(args.corrections + 10)  # one sender
    fresh = {name: drawings(style, args.test_drawings, seed=1000 + i)
             for i, (name, style) in enumerate(STYLES.items())}  # fmt: skip
    served: list[str] = []
    first = clone.repro()
    before_figures = headline(clone.metrics())

    def measure(port: int) -> dict[str, StyleScore]:
        served.append(served_model(port))
        return {name: score_style(port, STYLES[name], fresh[name]) for name in STYLES}

    def measure_and_correct(port: int) -> tuple[dict[str, StyleScore], str, list[str]]:
        scores = measure(port)
        chosen = args.style or min(STYLES, key=lambda name: scores[name].right)
        sent = send_corrections(port, STYLES[chosen], drawings(STYLES[chosen], args.corrections, 7))
        return scores, chosen, sent

    before, chosen, ids = clone.serving(measure_and_correct)
    log.info("baseline reads %r right %.1f%%; accepting %d corrections", chosen,
             100 * before[chosen].right, len(ids))  # fmt: skip
    clone.run(sys.executable, "-m", "pipelines.feedback", "accept", *ids, "--reviewer", "benchmark")
    second = clone.repro()
    after_figures = headline(clone.metrics())
    after = clone.serving(measure)
    sys.stdout.write(
        report(chosen, len(ids), before, after, (before_figures, after_figures), (first, second))
        + f"served before: {served[0]}\nserved after:  {served[1]}\n"
    )


if __name__ == "__main__":
    main()
