"""The CNN: a pure builder from hyper-parameters to an uncompiled Keras model, no I/O.

The shape follows the best-studied small MNIST network (Deotte's Kaggle study of 1,500 runs):
three blocks of 3x3, 3x3 and strided 5x5 convolutions with batch norm, then a 4x4 convolution
as the classifier's feature layer. Strided convolutions learn their own down-sampling, and
dropout after each block keeps the net from memorising stroke styles.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf
from keras import layers

from pipelines.preprocessing import CLASSES, INPUT_SHAPE, NOT_A_DIGIT

PRECISIONS = ("float32", "mixed_bfloat16")  # Keras dtype policies training may use


class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training step is TensorFlow's single fused kernel.

    Keras 3 normalises a training batch with a chain of element-wise ops; the fused kernel does
    it in one pass, which made a whole training step of this network 10-16% faster here (CPU,
    one thread).
    Weights and inference are the stock layer's, so `build_model(fused=False)` can take over the
    trained weights and the saved model needs no custom code to load.
    """

    def call(self, inputs, training=None, mask=None):
        if not training:
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
        )
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(moving * self.momentum + batch * (1.0 - self.momentum))
        return outputs


def has_native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU does bfloat16 maths in hardware (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`auto` is mixed bfloat16 where the CPU has it natively and float32 elsewhere: on a CPU
    with only AVX2, TensorFlow emulates bfloat16 and trained 8x slower (37 images/s against
    295, one thread)."""
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if has_native_bfloat16(cpuinfo) else "float32"


def conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel: int,
    strides: int = 1,
    padding: str = "valid",
    fused: bool = False,
    precision: str = "float32",
):
    """Convolution without bias (batch norm has its own), then batch norm and ReLU."""
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, use_bias=False, dtype=precision
    )(x)
    x = (FusedBatchNormalization if fused else layers.BatchNormalization)(dtype=precision)(x)
    return layers.Activation("relu", dtype=precision)(x)


def build_model(
    filters: tuple[int, int, int] = (32, 64, 128),
    dropout: float = 0.4,
    name: str = "digits_cnn",
    fused: bool = False,
    precision: str = "float32",
    classes: int = CLASSES,
) -> keras.Model:
    """Map (N, 28, 28, 1) images in [0, 1] to (N, classes) float32 probabilities: the ten
    digits, then "not a digit".

    Two variants train faster and hand their weights, same shapes in the same order, to the
    stock model that is saved: `fused=True` (FusedBatchNormalization) and
    `precision="mixed_bfloat16"` (bfloat16 maths on float32 weights; the probabilities stay
    float32).
    """
    if len(filters) != 3 or min(filters) < 1:
        raise ValueError(f"filters must be three positive widths, got {filters}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    first, second, third = filters
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    variant = {"fused": fused, "precision": precision}
    x = conv_bn(inputs, first, 3, **variant)  # 26x26
    x = conv_bn(x, first, 3, **variant)  # 24x24
    x = conv_bn(x, first, 5, strides=2, padding="same", **variant)  # 12x12
    x = layers.Dropout(dropout, dtype=precision)(x)
    x = conv_bn(x, second, 3, **variant)  # 10x10
    x = conv_bn(x, second, 3, **variant)  # 8x8
    x = conv_bn(x, second, 5, strides=2, padding="same", **variant)  # 4x4
    x = layers.Dropout(dropout, dtype=precision)(x)
    x = conv_bn(x, third, 4, **variant)  # 1x1
    x = layers.Flatten(dtype=precision)(x)
    x = layers.Dropout(dropout, dtype=precision)(x)
    # float32 whatever the precision: softmax and the loss need its range.
    outputs = layers.Dense(classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def divide_logits(model: keras.Model, temperature: float) -> None:
    """Make the model answer softmax(logits / temperature): sharper below 1, softer above.

    Folded into the classifier's weights in place, so the saved model needs no extra layer.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    classifier = model.get_layer("probabilities")
    kernel, bias = classifier.get_weights()
    classifier.set_weights([kernel / temperature, bias / temperature])


def raise_logit(model: keras.Model, amount: float, label: int = NOT_A_DIGIT) -> None:
    """Add `amount` to one class's logit, in place: how readily the model answers that class.

    Training fits it for NOT_A_DIGIT on validation (the rejection threshold), so the saved model
    refuses by itself, with argmax, wherever it runs.
    """
    classifier = model.get_layer("probabilities")
    kernel, bias = classifier.get_weights()
    bias = bias.copy()
    bias[label] += amount
    classifier.set_weights([kernel, bias])


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """One model whose probabilities are the average of its members' (each named uniquely)."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    outputs = layers.Average(name="probabilities")([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name="digits_cnn_ensemble")
