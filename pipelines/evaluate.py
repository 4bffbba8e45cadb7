"""The `evaluate` stage: measure the trained model on the test set, the only place it is used.

Run with `python -m pipelines.evaluate` (dvc.yaml does). Besides clean test accuracy it measures
what predicts how the product feels: accuracy on test digits rendered the way a drawing pad
produces them (thick and thin strokes, small, large and off-centre digits, dark or transparent
backgrounds) and passed through the very preprocessing function the service uses. Everything is
written as DVC metrics and plots and logged to the training run in MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pipelines import tracking
from pipelines.download import load_prepared
from pipelines.preprocessing import LABELS, as_batch, image_to_input

log = logging.getLogger("evaluate")


@dataclass(frozen=True)
class EvaluateSettings:
    batch_size: int
    calibration_bins: int
    misclassified_shown: int
    canvas_samples: int
    canvas_size: int
    canvas_seed: int


@dataclass(frozen=True)
class CanvasStyle:
    """How a test digit is drawn on the simulated pad."""

    box_fraction: float  # the digit's longer side as a fraction of the pad side
    stroke: float  # >0 thickens, <0 thins, in units of one MNIST pixel at the drawn scale
    off_centre: bool  # placed anywhere on the pad instead of near the middle
    background: str  # "white", "transparent" or "black"


CANVAS_STYLES = {
    "centred": CanvasStyle(0.6, 0.0, False, "white"),
    "thick": CanvasStyle(0.6, 1.2, False, "white"),
    "thin": CanvasStyle(0.6, -0.8, False, "white"),
    "small": CanvasStyle(0.2, 0.0, True, "white"),
    "large": CanvasStyle(0.95, 0.0, False, "white"),
    "off_centre": CanvasStyle(0.45, 0.0, True, "white"),
    "transparent": CanvasStyle(0.6, 0.0, True, "transparent"),
    "dark": CanvasStyle(0.6, 0.5, True, "black"),
}


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, 28, 28) images in [0, 1] -> (N, 10) probabilities."""
    return model.predict(as_batch(images), batch_size=batch_size, verbose=0)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """counts[actual, predicted]."""
    counts = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def per_class_scores(counts: np.ndarray) -> dict[str, dict[str, float]]:
    true_positives = np.diag(counts).astype(np.float64)
    precision = true_positives / np.maximum(counts.sum(axis=0), 1)
    recall = true_positives / np.maximum(counts.sum(axis=1), 1)
    return {
        str(digit): {"precision": round(float(p), 4), "recall": round(float(r), 4)}
        for digit, p, r in zip(LABELS, precision, recall, strict=True)
    }


def calibration_table(
    probabilities: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability table (confidence vs accuracy per bin)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, error = [], 0.0
    for index in range(bins):
        members = which == index
        if not members.any():
            continue
        mean_confidence = float(confidence[members].mean())
        accuracy = float(correct[members].mean())
        error += members.mean() * abs(accuracy - mean_confidence)
        rows.append(
            {
                "confidence": round(mean_confidence, 4),
                "accuracy": round(accuracy, 4),
                "count": int(members.sum()),
            }
        )
    return float(error), rows


def misclassified_grid(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, shown: int
) -> Image.Image:
    """The most confident mistakes as a labelled grid: 'true 4 -> 9 (0.97)' under each digit."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:shown]
    tile, caption, columns = 112, 16, 6
    rows = max(1, -(-len(worst) // columns))
    grid = Image.new("L", (columns * tile, rows * (tile + caption)), color=255)
    draw = ImageDraw.Draw(grid)
    for position, index in enumerate(worst):
        left, top = (position % columns) * tile, (position // columns) * (tile + caption)
        digit = Image.fromarray(255 - images[index]).resize((tile, tile), Image.Resampling.NEAREST)
        grid.paste(digit, (left, top))
        confidence = probabilities[index, predicted[index]]
        text = f"true {labels[index]} -> {predicted[index]} ({confidence:.2f})"
        draw.text((left + 4, top + tile + 2), text, fill=0)
    return grid


def render_on_canvas(
    digit: np.ndarray, style: CanvasStyle, size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw a 28x28 uint8 MNIST digit on a size x size pad the way a person would."""
    box = max(8, round(size * style.box_fraction))
    scale = box / 20  # MNIST digits fill a 20-pixel box inside their 28-pixel frame
    side = round(28 * scale)
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR))
    width = round(abs(style.stroke) * scale)
    if width >= 2:
        morphology = ndimage.grey_dilation if style.stroke > 0 else ndimage.grey_erosion
        ink = morphology(ink, size=(width, width))
    pad = np.zeros((size + 2 * side, size + 2 * side), dtype=np.uint8)
    slack = size - box
    if style.off_centre:
        top, left = rng.integers(0, max(slack, 0) + 1, size=2)
    else:
        top, left = rng.integers(slack // 2 - size // 20, slack // 2 + size // 20 + 1, size=2)
    # The digit's 20-pixel box starts 4 MNIST pixels into its 28-pixel frame.
    margin = round(4 * scale)
    row, col = side + top - margin, side + left - margin
    pad[row : row + side, col : col + side] = np.maximum(
        pad[row : row + side, col : col + side], ink
    )
    ink = pad[side : side + size, side : side + size]
    if style.background == "transparent":
        rgba = np.zeros((size, size, 4), dtype=np.uint8)
        rgba[..., 3] = ink
        return Image.fromarray(rgba, mode="RGBA")
    if style.background == "black":
        return Image.fromarray(ink, mode="L")
    return Image.fromarray(255 - ink, mode="L")


def canvas_robustness(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    settings: EvaluateSettings,
) -> dict[str, float]:
    """Accuracy per canvas style on a fixed sample of test digits, through the service's path."""
    rng = np.random.default_rng(settings.canvas_seed)
    sample = rng.choice(len(images), size=min(settings.canvas_samples, len(images)), replace=False)
    scores = {}
    for name, style in CANVAS_STYLES.items():
        inputs = np.stack(
            [
                image_to_input(render_on_canvas(images[i], style, settings.canvas_size, rng))
                for i in sample
            ]
        )
        scores[name] = round(float((predict(inputs).argmax(axis=1) == labels[sample]).mean()), 4)
        log.info("canvas %-12s accuracy %.4f", name, scores[name])
    scores["mean"] = round(float(np.mean(list(scores.values()))), 4)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--train-metrics", type=Path, default=Path("reports/train.json"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--confusion", type=Path, default=Path("reports/confusion.csv"))
    parser.add_argument("--calibration", type=Path, default=Path("reports/calibration.csv"))
    parser.add_argument("--misclassified", type=Path, default=Path("reports/misclassified.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    params = tracking.load_params(args.params)
    settings = EvaluateSettings(**params["evaluate"])
    data = load_prepared(args.data)
    trained = json.loads(args.train_metrics.read_text())
    model = keras.saving.load_model(args.model)

    def predict(images: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, images, settings.batch_size)

    images, labels = data["x_test"], data["y_test"].astype(np.int64)
    probabilities = predict(images.astype(np.float32) / 255.0)
    predicted = probabilities.argmax(axis=1)
    counts = confusion_matrix(labels, predicted)
    ece, reliability = calibration_table(probabilities, labels, settings.calibration_bins)
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1))))
    canvas = canvas_robustness(predict, images, labels, settings)
    metrics = {
        "test_accuracy": round(float((predicted == labels).mean()), 4),
        "test_loss": round(loss, 4),
        "test_errors": int((predicted != labels).sum()),
        "expected_calibration_error": round(ece, 4),
        "canvas_accuracy": canvas["mean"],
        "val_accuracy": round(trained["val_accuracy"], 4),
        "canvas": canvas,
        "per_class": per_class_scores(counts),
    }

    for path in (args.metrics, args.confusion, args.calibration, args.misclassified):
        path.parent.mkdir(parents=True, exist_ok=True)
    tracking.write_json(metrics, args.metrics)
    tracking.write_csv(
        [{"actual": int(a), "predicted": int(p)} for a, p in zip(labels, predicted, strict=True)],
        args.confusion,
    )
    tracking.write_csv(reliability, args.calibration)
    misclassified_grid(images, labels, probabilities, settings.misclassified_shown).save(
        args.misclassified
    )

    run = tracking.ensure_model_run(args.model, args.data, params, tracking.train_scores(trained))
    with tracking.start_run(run_id=run.info.run_id):
        mlflow.log_metrics(tracking.evaluation_scores(metrics))
        for path in (args.metrics, args.confusion, args.calibration, args.misclassified):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    log.info(
        "test accuracy %.4f (%d errors), canvas accuracy %.4f, ECE %.4f",
        metrics["test_accuracy"],
        metrics["test_errors"],
        metrics["canvas_accuracy"],
        metrics["expected_calibration_error"],
    )


if __name__ == "__main__":
    main()
