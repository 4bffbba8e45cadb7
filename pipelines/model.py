"""The CNN: a pure builder from hyper-parameters to an uncompiled Keras model, no I/O.

The shape follows the best-studied small MNIST network (Deotte's Kaggle study of 1,500 runs):
three blocks of 3x3, 3x3 and strided 5x5 convolutions with batch norm, then a 4x4 convolution
as the classifier's feature layer. Strided convolutions learn their own down-sampling, and
dropout after each block keeps the net from memorising stroke styles.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from pipelines.lines import LINE_CLASSES, LINE_HEIGHT, LINE_STRIDE, LINE_WIDTH
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


def build_line_reader(
    filters: tuple[int, int, int, int] = (16, 32, 64, 64),
    dropout: float = 0.25,
    fused: bool = False,
    precision: str = "float32",
) -> keras.Model:
    """Map (N, LINE_HEIGHT, LINE_WIDTH, 1) strips (`pipelines.lines.line_input`) to
    (N, LINE_FRAMES, LINE_CLASSES) float32 probabilities: per frame of LINE_STRIDE columns,
    no new digit (BLANK) or one of the ten, trained with a CTC loss.

    Four convolution blocks halve the height each time and the width twice (to LINE_STRIDE
    columns a frame); two 1-D convolutions along the frames then see about two digits either
    side, enough to tell where one digit ends and the next begins.
    """
    if len(filters) != 4 or min(filters) < 1:
        raise ValueError(f"filters must be four positive widths, got {filters}")
    inputs = keras.Input(shape=(LINE_HEIGHT, LINE_WIDTH, 1), name="strip")
    variant = {"fused": fused, "precision": precision}
    x = inputs
    for index, width in enumerate(filters):
        x = conv_bn(x, width, 3, padding="same", **variant)
        across = 2 if 2**index < LINE_STRIDE else 1
        x = layers.MaxPooling2D((2, across), dtype=precision)(x)
    rows = LINE_HEIGHT // 2 ** len(filters)
    x = layers.Permute((2, 1, 3), dtype=precision)(x)  # frames first
    x = layers.Reshape((LINE_WIDTH // LINE_STRIDE, rows * filters[-1]), dtype=precision)(x)
    x = layers.Dropout(dropout, dtype=precision)(x)
    for _ in range(2):
        x = layers.Conv1D(128, 5, padding="same", activation="relu", dtype=precision)(x)
    x = layers.Dropout(dropout, dtype=precision)(x)
    outputs = layers.Dense(LINE_CLASSES, activation="softmax", name="frames", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="digits_line_reader")
