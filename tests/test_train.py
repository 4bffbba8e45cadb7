"""Training pieces a user relies on: augmentation that keeps digits digits, a reproducible data
stream, and a model builder that checks its arguments."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from pipelines.download import load_prepared, read_split, stroke_width
from pipelines.feedback import SPLITS
from pipelines.model import FusedBatchNormalization, build_model, divide_logits, raise_logit
from pipelines.preprocessing import CLASSES, NOT_A_DIGIT, SEVERAL_DIGITS, as_batch, refused
from pipelines.train import (
    VALIDATION_JOINED,
    TrainSettings,
    calibrated_model,
    canvas_digits,
    crowded_digits,
    early_weights_in_average,
    fit_refusal_shift,
    fit_temperature,
    joined_digits,
    load_data,
    random_affine,
    random_thickness,
    redrawn,
    resolve_precision,
    scribbles,
    softmax,
    train,
    training_dataset,
    with_stock_layers,
    worker_layout,
)
from tests.helpers import SHARED_MNIST, fast_params


def settings(**overrides) -> TrainSettings:
    return TrainSettings.from_params({**fast_params()["train"], **overrides})


def plain_settings(**overrides) -> TrainSettings:
    """A fifth of the images non-digits, and no drawn digits besides MNIST's unless asked."""
    drawn = dict(canvas_digits=0, crowded_digits=0, redrawn_digits=0, redrawn_not_digits=0)
    return settings(**{"not_digit_share": 0.2, **drawn, **overrides})


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


def test_model_maps_images_to_digit_and_not_a_digit_probabilities():
    model = build_model((4, 8, 16), 0.1)
    probabilities = model(np.zeros((3, 28, 28, 1), dtype=np.float32)).numpy()
    assert probabilities.shape == (3, CLASSES) == (3, 12)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_raising_the_not_a_digit_logit_only_makes_that_answer_more_likely():
    model = build_model((4, 8, 16), 0.0)
    images = tf.random.stateless_uniform([32, 28, 28, 1], [5, 6])
    before = model(images).numpy()
    raise_logit(model, 2.0)
    after = model(images).numpy()
    assert (after[:, NOT_A_DIGIT] > before[:, NOT_A_DIGIT]).all()
    digits_before = before[:, :NOT_A_DIGIT] / before[:, :NOT_A_DIGIT].sum(axis=1, keepdims=True)
    digits_after = after[:, :NOT_A_DIGIT] / after[:, :NOT_A_DIGIT].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(digits_after, digits_before, rtol=1e-4)  # digits' odds unchanged


def test_refusal_threshold_refuses_as_many_non_digits_as_the_digit_budget_allows():
    rng = np.random.default_rng(4)
    digits, others = 2000, 500
    labels = np.concatenate([rng.integers(0, 10, digits), np.full(others, NOT_A_DIGIT)])
    logits = rng.standard_normal((digits + others, CLASSES))
    logits[np.arange(digits), labels[:digits]] += 4.0  # digits: their own class stands out
    logits[digits:, NOT_A_DIGIT] += 2.0  # non-digits: a weaker signal, overlapping the digits
    logits[:, SEVERAL_DIGITS] -= 8.0  # no joined digits here: that class never wins
    probabilities = softmax(logits)
    for budget in (0.001, 0.01, 0.05):
        shift = fit_refusal_shift([probabilities], labels, budget)
        pushed = logits.copy()
        pushed[:, NOT_A_DIGIT] += shift
        refused = softmax(pushed).argmax(axis=1) == NOT_A_DIGIT
        assert refused[:digits].mean() <= budget
        slightly_more = logits.copy()
        slightly_more[:, NOT_A_DIGIT] += shift + 0.1
        assert (softmax(slightly_more).argmax(axis=1) == NOT_A_DIGIT)[:digits].mean() > budget
    loose = fit_refusal_shift([probabilities], labels, 0.05)
    strict = fit_refusal_shift([probabilities], labels, 0.001)
    assert loose > strict  # a larger budget refuses more


def test_joined_digits_are_reproducible_inputs_holding_several_digits_side_by_side():
    digits, _ = read_split(SHARED_MNIST, "t10k")
    first, again = joined_digits(digits[:500], 30, seed=3), joined_digits(digits[:500], 30, seed=3)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (30, 28, 28) and first.min() >= 0.0 and first.max() <= 1.0
    assert not np.array_equal(first, joined_digits(digits[:500], 30, seed=4))

    # Two or three digits fitted into the 20-pixel box side by side: wider than tall, where
    # MNIST's digits (fitted the same way) are taller than wide.
    def aspect(images: np.ndarray) -> np.ndarray:
        ink = images > 0.2
        widths = ink.any(axis=1).sum(axis=1)
        heights = ink.any(axis=2).sum(axis=1)
        return widths / heights

    assert np.median(aspect(first)) > 1.2
    assert np.median(aspect(digits[:500] / 255.0)) < 1.0


def test_scribbles_are_reproducible_model_inputs_unlike_any_mnist_digit():
    first, again = scribbles(20, seed=3), scribbles(20, seed=3)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (20, 28, 28) and first.min() >= 0.0 and first.max() <= 1.0
    assert not np.array_equal(first, scribbles(20, seed=4))
    assert (first > 0.5).mean(axis=(1, 2)).min() > 0.03  # every one is a visible drawing


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
    labels = keras.utils.to_categorical(np.arange(32) % CLASSES, CLASSES)
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
        # Each step moves the weights the same way by about as much. Not element for element:
        # round-off (which differs between CPU kinds: about 1% of a layer's gradient here on
        # AVX512, through the batch norms' backward passes) can flip a few ReLU gates.
        expected, actual = expected.ravel(), actual.ravel()
        scale = np.linalg.norm(expected)
        if scale == 0:
            assert np.linalg.norm(actual) == 0
            continue
        assert np.dot(expected, actual) / (scale * np.linalg.norm(actual)) > 0.9995
        assert np.linalg.norm(actual - expected) / scale < 0.03
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
    mixed.fit(
        images, tf.one_hot(tf.range(64) % CLASSES, CLASSES), epochs=2, batch_size=32, verbose=0
    )
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


def small_prepared_split(folder: Path) -> tuple[Path, Path, Path]:
    """Prepared-data files like the download and feedback stages': 2,000 training digits,
    non-digits (scribbles standing in for the drawings of other alphabets) in each split, and
    users' corrections (a few MNIST test digits standing in for reviewed drawings)."""
    x, y = read_split(SHARED_MNIST, "t10k")
    path = folder / "mnist.npz"
    np.savez(path, x_train=x[:2000], y_train=y[:2000], x_val=x[2000:2500], y_val=y[2000:2500])
    others = folder / "not_digits.npz"
    images = np.round(scribbles(60, seed=99) * 255).astype(np.uint8)
    np.savez(others, images=images, split=np.array(["train", "validation", "test"] * 20))
    corrections = folder / "corrections.npz"
    np.savez(
        corrections,
        **{f"x_{split}": x[3000 + 10 * i : 3010 + 10 * i] for i, split in enumerate(SPLITS)},
        **{f"y_{split}": y[3000 + 10 * i : 3010 + 10 * i] for i, split in enumerate(SPLITS)},
    )
    return path, others, corrections


def test_training_data_mixes_in_the_non_digits_at_their_share(tmp_path):
    mnist, others, _ = small_prepared_split(tmp_path)
    run = settings(not_digit_share=0.2, scribbles=60, joined_digits=40, redrawn_not_digits=0)
    data = load_data(mnist, others, None, run)
    labels = data["y_train"]
    # Exactly a fifth of the images: the pool of 120 repeated, then a sample of it.
    assert (labels >= NOT_A_DIGIT).sum() == round(0.25 * (labels < NOT_A_DIGIT).sum())
    assert (labels[:2000] < 10).all() and data["x_train"].shape[1:] == (28, 28)
    # Joined digits are several digits, not "not a digit"; the rest are letters and scribbles.
    refused = labels[labels >= NOT_A_DIGIT]
    assert (refused == SEVERAL_DIGITS).mean() == pytest.approx(40 / (20 + 60 + 40), abs=0.03)
    # Validation holds the MNIST validation digits, only the held-out split's non-digits, and
    # validation digits drawn joined.
    assert (data["y_val"] == NOT_A_DIGIT).sum() == 20 and (data["y_val"] < 10).sum() == 500
    assert (data["y_val"] == SEVERAL_DIGITS).sum() == VALIDATION_JOINED
    # And each MNIST validation digit once more, drawn on the pad, for the refusal threshold.
    mnist_val = load_prepared(mnist)["y_val"]
    assert sorted(data["y_val_drawn"]) == sorted(mnist_val)
    assert data["x_val_drawn"].shape == (500, 28, 28, 1)


def ink_judge() -> keras.Model:
    """A stand-in network that calls an image "not a digit" the more ink it holds (logit 10 x
    the mean ink, against 1 for the digit 0)."""
    inputs = keras.Input(shape=(28, 28, 1))
    classifier = keras.layers.Dense(CLASSES, activation="softmax", name="probabilities")
    model = keras.Model(inputs, classifier(keras.layers.GlobalAveragePooling2D()(inputs)))
    kernel, bias = np.zeros((1, CLASSES)), np.zeros(CLASSES)
    kernel[0, NOT_A_DIGIT], bias[0] = 10.0, 1.0
    classifier.set_weights([kernel, bias])
    return model


def test_the_refusal_threshold_answers_for_the_validation_digits_drawn_on_the_pad_too():
    rng = np.random.default_rng(3)
    digits = rng.random((400, 28, 28, 1)).astype(np.float32) * 0.1  # little ink: digits
    drawn = digits * 8.0  # the same digits drawn, more ink: the judge doubts them
    labels = rng.integers(0, 10, 400)  # the judge reads every digit as 0: a soft temperature
    data = {"x_val": digits, "y_val": labels, "x_val_drawn": drawn, "y_val_drawn": labels}
    model, _, _ = calibrated_model([ink_judge()], data, 0.02)
    assert refused(model.predict(np.concatenate([digits, drawn]), verbose=0)).mean() <= 0.02
    # Fitted on the MNIST digits alone, the threshold would refuse the drawn ones.
    model, _, _ = calibrated_model([ink_judge()], {**data, "x_val_drawn": digits}, 0.02)
    assert refused(model.predict(digits, verbose=0)).mean() <= 0.02
    assert refused(model.predict(drawn, verbose=0)).mean() > 0.5


def test_digits_drawn_on_the_pad_and_cut_from_pairs_train_under_their_labels(tmp_path):
    digits, labels = read_split(SHARED_MNIST, "t10k")
    drawn, drawn_labels = canvas_digits(digits[:300], labels[:300], 40, seed=3)
    again, _ = canvas_digits(digits[:300], labels[:300], 40, seed=3)
    np.testing.assert_array_equal(drawn, again)
    assert drawn.shape == (40, 28, 28) and set(drawn_labels) <= set(labels[:300])
    crowded, crowded_labels = crowded_digits(digits[:300], labels[:300], 40, seed=3)
    assert crowded.shape == (40, 28, 28) and crowded.min() >= 0.0 and crowded.max() <= 1.0
    assert set(crowded_labels) <= set(labels[:300]) and len(set(crowded_labels)) > 3
    mnist, others, _ = small_prepared_split(tmp_path)
    run = settings(not_digit_share=0.2, canvas_digits=100, crowded_digits=50, redrawn_digits=30)
    data = load_data(mnist, others, None, run)
    assert (data["y_train"] < 10).sum() == 2000 + 180  # MNIST's, then the drawn ones
    assert 0.15 <= (data["y_train"] >= NOT_A_DIGIT).mean() <= 0.25  # the share counts them


def cosine(images: np.ndarray, others: np.ndarray) -> np.ndarray:
    """How alike each image is to its partner in `others` (1: the same up to brightness)."""

    def unit(batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(len(batch), -1).astype(np.float64)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    return (unit(images) * unit(others)).sum(axis=1)


def test_digits_and_non_digits_are_redrawn_with_the_same_round_pens(tmp_path):
    digits, labels = read_split(SHARED_MNIST, "t10k")
    thin, chosen = redrawn(digits[:400], 60, (1.5, 1.5), seed=3)
    again, same = redrawn(digits[:400], 60, (1.5, 1.5), seed=3)
    np.testing.assert_array_equal(thin, again)
    np.testing.assert_array_equal(chosen, same)
    assert thin.shape == (60, 28, 28) and thin.min() >= 0.0 and thin.max() <= 1.0
    thick, _ = redrawn(digits[:400], 60, (4.5, 4.5), seed=3)
    # Each is its own digit redrawn: more like its original than like the next one chosen.
    for pen in (thin, thick):
        own = cosine(pen, digits[chosen])
        assert np.mean(own > cosine(pen, np.roll(digits[chosen], 1, axis=0))) >= 0.95
        assert own.mean() > 0.7
    # And as wide as the pen: thinner than most MNIST digits or thicker (quartiles 2.2 and 3.3,
    # 90th percentile 4.3, as download.stroke_width measures).
    thin_width = stroke_width(np.round(thin * 255).astype(np.uint8))
    thick_width = stroke_width(np.round(thick * 255).astype(np.uint8))
    assert np.median(thin_width) < 1.9 and np.median(thick_width) > 4.5
    # Training takes the redrawn digits under their labels, and redrawn non-digits in the pool.
    mnist, others, _ = small_prepared_split(tmp_path)
    run = plain_settings(scribbles=60, joined_digits=40, redrawn_digits=50, redrawn_not_digits=20)
    data = load_data(mnist, others, None, run)
    train_digits = load_prepared(mnist)
    images, indices = redrawn(train_digits["x_train"], 50, run.redrawn_stroke_width, run.seed)
    np.testing.assert_allclose(data["x_train"][2000:2050], images)
    assert list(data["y_train"][2000:2050]) == list(train_digits["y_train"][indices])
    # The redrawn non-digits join the pool, which still makes a fifth of the images.
    drawings = load_prepared(others)
    pens, seed = run.redrawn_stroke_width, run.seed + 1
    letters, _ = redrawn(drawings["images"][drawings["split"] == "train"], 20, pens, seed)
    refused = data["x_train"][data["y_train"] == NOT_A_DIGIT].reshape(-1, 1, 28 * 28)
    assert (np.abs(refused - letters.reshape(1, 20, -1)).max(axis=2) < 1e-6).any(axis=0).all()
    assert (data["y_train"] >= NOT_A_DIGIT).sum() == round(0.25 * 2050)


def test_a_small_training_set_is_not_drowned_in_non_digits(tmp_path):
    mnist, others, _ = small_prepared_split(tmp_path)
    run = plain_settings(scribbles=1500, joined_digits=500)
    first, again = load_data(mnist, others, None, run), load_data(mnist, others, None, run)
    labels = first["y_train"]
    assert (labels >= NOT_A_DIGIT).sum() == 500  # 2,000 digits: a fifth of 2,500 images
    np.testing.assert_array_equal(first["x_train"], again["x_train"])  # the same sample


def test_users_corrections_train_at_their_weight_and_validate_once(tmp_path):
    mnist, others, corrections = small_prepared_split(tmp_path)
    run = settings(not_digit_share=0.2, scribbles=60, joined_digits=40, corrections_weight=3)
    without = load_data(mnist, others, None, run)
    data = load_data(mnist, others, corrections, run)
    users = load_prepared(corrections)
    added = data["x_train"][len(without["x_train"]) :]
    assert len(added) == 3 * len(users["x_train"])
    np.testing.assert_allclose(added[:10], users["x_train"] / 255.0, atol=1e-6)
    assert list(data["y_train"][len(without["y_train"]) :]) == list(users["y_train"]) * 3
    assert len(data["y_val"]) == len(without["y_val"]) + len(users["y_val"])
    test_image = users["x_test"][0] / 255.0  # the held-out split never trains
    assert (
        np.abs(data["x_train"] - test_image).reshape(len(data["x_train"]), -1).max(axis=1).min() > 0
    )


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
    paths = small_prepared_split(tmp_path)
    run = settings(members=2, epochs=1, batch_size=100)
    data = load_data(*paths, run)
    members, epochs = train(data, run, tmp_path)
    model, _, _ = calibrated_model(members, data, 0.01)

    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert [member.name for member in members] == ["member_1", "member_2"]
    images = as_batch(load_prepared(paths[0])["x_val"][:16].astype(np.float32) / 255.0)
    first, second = (member(images).numpy() for member in members)
    assert not np.allclose(first, second)  # seeds seed and seed + 1 give different networks
    np.testing.assert_allclose(model(images).numpy(), (first + second) / 2, atol=1e-6)
    assert [(row["member"], row["epoch"]) for row in epochs.history] == [(1, 1), (2, 2)]


@pytest.mark.slow
def test_a_member_that_fails_stops_training_with_an_error(tmp_path, tracking):
    broken = settings(members=2, epochs=1, filters=(0, 8, 16))  # rejected inside each worker
    data = load_data(*small_prepared_split(tmp_path), broken)
    with pytest.raises(RuntimeError, match="training failed in member 1, member 2"):
        train(data, broken, tmp_path)
