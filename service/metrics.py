"""The service's own Prometheus metrics, exposed by BentoML at /metrics with its built-in ones.

BentoML runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by
`bentoml serve`) and serves the default registry, so plain `prometheus_client` metrics are
enough. They are created on first use, in the worker, never at import time: the metrics mode
is fixed when prometheus_client is first imported, and a metric may only be registered once
per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

# Refusals about what was drawn, listed (at 0) from the start so that dashboards find them.
DRAWING_REFUSALS = ("no_digit", "not_a_digit", "several_digits")
# What became of each POST /feedback that reached the service (listed at 0 from the start).
FEEDBACK_OUTCOMES = (
    "stored",
    "invalid_label",
    "no_digit",
    "too_many_corrections",
    "feedback_full",
    "storage_full",
    "storage_unavailable",
)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Metrics:
    predictions: Counter  # labels: digit (each digit /read reads counts too)
    confidence: Histogram  # the predicted digit's probability
    rejected: Counter  # labels: reason
    model_batch_size: Histogram  # images per model call
    feedback: Counter  # labels: outcome (FEEDBACK_OUTCOMES, or another refusal's reason)


@functools.cache
def metrics() -> Metrics:
    import prometheus_client

    created = Metrics(
        predictions=prometheus_client.Counter(
            "digits_predictions", "Predictions answered, by predicted digit", ["digit"]
        ),
        confidence=prometheus_client.Histogram(
            "digits_prediction_confidence",
            "Probability of the predicted digit",
            buckets=CONFIDENCE_BUCKETS,
        ),
        rejected=prometheus_client.Counter(
            "digits_rejected_inputs", "Requests and batch items refused, by reason", ["reason"]
        ),
        model_batch_size=prometheus_client.Histogram(
            "digits_model_batch_size", "Images per model call", buckets=BATCH_BUCKETS
        ),
        feedback=prometheus_client.Counter(
            "digits_feedback", "Corrections sent to /feedback, by outcome", ["outcome"]
        ),
    )
    for reason in DRAWING_REFUSALS:
        created.rejected.labels(reason=reason)
    for outcome in FEEDBACK_OUTCOMES:
        created.feedback.labels(outcome=outcome)
    return created


def count_prediction(digit: int, confidence: float) -> None:
    metrics().predictions.labels(digit=str(digit)).inc()
    metrics().confidence.observe(confidence)


def count_rejection(reason: str) -> None:
    metrics().rejected.labels(reason=reason).inc()


def count_feedback(outcome: str) -> None:
    metrics().feedback.labels(outcome=outcome).inc()


def observe_model_batch(size: int) -> None:
    metrics().model_batch_size.observe(size)
