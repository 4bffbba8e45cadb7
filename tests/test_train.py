"""Training pieces a user relies on: augmentation that keeps digits digits, a reproducible data
stream, and a model builder that checks its arguments."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from pipelines.download import load_prepared, read_split
from pipelines.model import FusedBatchNormalization, build_model, divide_logits
from pipelines.preprocessing import as_batch
from pipelines.train import (
    TrainSettings,
    calibrated_model,
    early_weights_in_average,
    fit_temperature,
    random_affine,
    random_thickness,
    resolve_precision,
    softmax,
    train,
    training_dataset,
    with_stock_layers,
    worker_layout,
)
from tests.helpers import SHARED_MNIST, fast_params


def settings(**overrides) -> TrainSettings:
    return TrainSettings.from_params({**fast_params()["train"], **overrides})


def bar_images(count: int = 8) -> tf.Tensor:
    images = np.zeros((count, 28, 28, 1), dtype=np.float32)
    images[:, 6:22, 12:16] = 1.0  # a vertical stroke, like a 1
    return tf.constant(images)


def test_thickness_augmentation_thickens_and_thins_strokes():
    images = bar_images(256)
    changed = random_thickness(images, strength=1.0, seed=tf.constant([1, 2], tf.int64))
    ink_before = float(tf.reduce_sum(images[0]))
    ink_after = tf.reduce_sum(changed, axis=[1, 2, 3]).numpy()
    assert (ink_after > ink_before * 1.2).any() and (ink_after < ink_before * 0.8).any()
    assert float(tf.reduce_min(changed)) >= 0.0 and float(tf.reduce_max(changed)) <= 1.0


def test_affine_augmentation_keeps_the_digit_on_the_frame_with_empty_fill():
    images = bar_images()
    moved = random_affine(images, 10, 0.1, 2, seed=tf.constant([3, 4], tf.int64)).numpy()
    assert moved.shape == images.shape
    corners = moved[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners == 0.0)  # constant fill, no mirrored stroke fragments
    ratio = moved.sum(axis=(1, 2, 3)) / images.numpy().sum(axis=(1, 2, 3))
    assert np.all((ratio > 0.75) & (ratio < 1.3))


def test_zero_augmentation_is_the_identity():
    images = bar_images()
    same = random_affine(images, 0, 0, 0, seed=tf.constant([5, 6], tf.int64))
    np.testing.assert_allclose(same.numpy(), images.numpy(), atol=1e-5)


def test_training_stream_is_reproducible_from_the_seed():
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 256)

    def first_batches(seed: int) -> list[np.ndarray]:
        stream = training_dataset(x, y, settings(seed=seed, batch_size=64), steps=3)
        return [images.numpy() for images, _ in stream]

    np.testing.assert_array_equal(np.stack(first_batches(1)), np.stack(first_batches(1)))
    assert not np.array_equal(np.stack(first_batches(1)), np.stack(first_batches(2)))


def test_the_untrained_share_of_the_weight_average_shrinks_with_the_run_length():
    default_run = settings(ema_momentum=0.999)
    assert early_weights_in_average(default_run, steps=25 * 429) < 0.001
    assert early_weights_in_average(default_run, steps=3 * 429) > 0.25
    assert early_weights_in_average(settings(ema_momentum=0), steps=10) == 0.0


def test_settings_reject_unknown_keys_so_typos_in_params_fail_loudly():
    with pytest.raises(TypeError):
        TrainSettings.from_params({**fast_params()["train"], "epohcs": 3})


@pytest.mark.parametrize(
    ("flags", "chosen"),
    [
        ("fpu sse4_2 avx2 fma", "float32"),
        ("fpu avx2 avx512f avx512_bf16", "mixed_bfloat16"),
        ("fpu avx2 amx_bf16 amx_tile", "mixed_bfloat16"),
    ],
)
def test_auto_precision_uses_bfloat16_only_where_the_cpu_has_it(tmp_path, flags, chosen):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert resolve_precision("auto", cpuinfo) == chosen
    assert resolve_precision("float32", cpuinfo) == "float32"  # an explicit choice stands
    assert resolve_precision("auto", tmp_path / "missing") == "float32"


def test_model_maps_images_to_ten_probabilities():
    model = build_model((4, 8, 16), 0.1)
    probabilities = model(np.zeros((3, 28, 28, 1), dtype=np.float32)).numpy()
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_dividing_the_logits_sharpens_the_probabilities_without_changing_the_answer():
    model = build_model((4, 8, 16), 0.0)
    images = tf.random.stateless_uniform([32, 28, 28, 1], [11, 12])
    before = model(images).numpy()
    divide_logits(model, 0.5)
    after = model(images).numpy()
    np.testing.assert_array_equal(after.argmax(axis=1), before.argmax(axis=1))
    np.testing.assert_allclose(after, softmax(np.log(before) / 0.5), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("miscalibration", [0.5, 1.0, 2.0])
def test_temperature_undoes_over_and_under_confidence(miscalibration):
    rng = np.random.default_rng(3)
    logits = 3.0 * rng.standard_normal((20000, 10))
    truth = softmax(logits)  # labels drawn from these probabilities: calibrated by construction
    labels = np.array([rng.choice(10, p=row) for row in truth])
    reported = softmax(logits * miscalibration)  # over- (> 1) or under-confident (< 1)
    fitted = fit_temperature([reported], labels)
    assert fitted == pytest.approx(miscalibration, rel=0.08)


def test_fused_batch_norm_trains_like_the_stock_layer_and_hands_over_its_weights():
    """The fast training variant must learn what the stock (saved) model would learn."""
    images = np.random.default_rng(1).random((32, 28, 28, 1), dtype=np.float32)
    labels = keras.utils.to_categorical(np.arange(32) % 10, 10)
    keras.utils.set_random_seed(3)
    stock = build_model((4, 8, 16), 0.0)
    fused = build_model((4, 8, 16), 0.0, fused=True)
    fused.set_weights(stock.get_weights())

    def loss_and_gradients(model: keras.Model) -> tuple[float, list[np.ndarray]]:
        with tf.GradientTape() as tape:
            loss = keras.losses.categorical_crossentropy(labels, model(images, training=True))
            loss = tf.reduce_mean(loss)
        return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]

    stock_loss, stock_gradients = loss_and_gradients(stock)
    fused_loss, fused_gradients = loss_and_gradients(fused)
    assert fused_loss == pytest.approx(stock_loss, rel=1e-5)
    for expected, actual in zip(stock_gradients, fused_gradients, strict=True):
        # Float round-off can flip a few ReLU gates, hence a tolerance relative to the largest.
        np.testing.assert_allclose(actual, expected, atol=2e-3 * np.abs(expected).max())
    moving_statistics = zip(stock.non_trainable_weights, fused.non_trainable_weights, strict=True)
    for expected, actual in moving_statistics:
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-3)

    handed_over = with_stock_layers(fused, settings(filters=[4, 8, 16], dropout=0.0))
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in handed_over.layers)
    np.testing.assert_allclose(handed_over(images).numpy(), fused(images).numpy(), atol=1e-6)


def test_bfloat16_training_hands_float32_weights_to_the_saved_model():
    mixed = build_model((4, 8, 16), 0.0, fused=True, precision="mixed_bfloat16")
    mixed.compile(optimizer="adam", loss="categorical_crossentropy")
    images = tf.random.stateless_uniform([64, 28, 28, 1], [13, 14])
    mixed.fit(images, tf.one_hot(tf.range(64) % 10, 10), epochs=2, batch_size=32, verbose=0)
    assert mixed(images).dtype == "float32"  # probabilities and the loss stay in float32

    handed_over = with_stock_layers(mixed, settings(filters=[4, 8, 16], dropout=0.0))
    assert {layer.dtype_policy.name for layer in handed_over.layers} == {"float32"}
    assert all(weight.dtype == "float32" for weight in handed_over.weights)
    # The saved model computes in float32: bfloat16's 8-bit mantissa was only a training detail.
    np.testing.assert_allclose(handed_over(images).numpy(), mixed(images).numpy(), atol=0.02)


@pytest.mark.parametrize(
    "filters, dropout, precision",
    [
        ((4, 8), 0.1, "float32"),
        ((0, 8, 16), 0.1, "float32"),
        ((4, 8, 16), 1.0, "float32"),
        ((4, 8, 16), 0.1, "bfloat16"),  # not a mixed policy: the weights would be bfloat16 too
    ],
)
def test_model_builder_rejects_bad_hyper_parameters(filters, dropout, precision):
    with pytest.raises(ValueError):
        build_model(filters, dropout, precision=precision)


@pytest.mark.parametrize(
    "members, cores, layout",
    [(1, 2, (1, 2)), (2, 2, (2, 1)), (3, 2, (2, 1)), (4, 8, (4, 2)), (1, 1, (1, 1))],
)
def test_members_train_side_by_side_one_per_core(members, cores, layout):
    assert worker_layout(members, cores) == layout


def small_prepared_split(folder: Path) -> Path:
    """A prepared-data file like the download stage's, cut to 2,000 training images."""
    x, y = read_split(SHARED_MNIST, "t10k")
    path = folder / "mnist.npz"
    np.savez(path, x_train=x[:2000], y_train=y[:2000], x_val=x[2000:2500], y_val=y[2000:2500])
    return path


@pytest.fixture
def tracking(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Its own experiment: another test may have left a different active one in this process.
    experiment = mlflow.MlflowClient().create_experiment("train-test")
    with mlflow.start_run(experiment_id=experiment):
        yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.slow
def test_members_train_in_parallel_workers_and_the_model_averages_them(tmp_path, tracking):
    data = small_prepared_split(tmp_path)
    members, epochs = train(data, settings(members=2, epochs=1, batch_size=100), tmp_path)
    model, _ = calibrated_model(members, load_prepared(data))

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert [member.name for member in members] == ["member_1", "member_2"]
    images = as_batch(load_prepared(data)["x_val"][:16].astype(np.float32) / 255.0)
    first, second = (member(images).numpy() for member in members)
    assert not np.allclose(first, second)  # seeds seed and seed + 1 give different networks
    np.testing.assert_allclose(model(images).numpy(), (first + second) / 2, atol=1e-6)
    assert [(row["member"], row["epoch"]) for row in epochs.history] == [(1, 1), (2, 2)]


@pytest.mark.slow
def test_a_member_that_fails_stops_training_with_an_error(tmp_path, tracking):
    data = small_prepared_split(tmp_path)
    broken = settings(members=2, epochs=1, filters=(0, 8, 16))  # rejected inside each worker
    with pytest.raises(RuntimeError, match="training failed in member 1, member 2"):
        train(data, broken, tmp_path)
