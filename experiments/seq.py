"""Experiment: a CTC line reader on whole numbers. python seq.py OUTDIR [n_train] [epochs]"""
import sys, time, dataclasses, logging, os
sys.path.insert(0, "/work/main")
import numpy as np
from multiprocessing import Pool
from PIL import Image

H, W, DIGIT_H = 32, 192, 22
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 40000
EPOCHS = int(sys.argv[3]) if len(sys.argv) > 3 else 8
MAXLEN = 6


def strip(ink):
    from pipelines.preprocessing import INK_THRESHOLD
    rows = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=0))
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    h, w = crop.shape
    scale = min(DIGIT_H / h, (W - 8) / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = Image.fromarray(crop.astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    outp = np.zeros((H, W), np.float32)
    top = (H - nh) // 2
    outp[top: top + nh, 4: 4 + nw] = np.clip(np.asarray(img), 0, 1)
    return outp


def make(args):
    seed, count, split = args
    from pipelines.download import load_prepared
    from pipelines.drawing import render_number
    from pipelines.preprocessing import ink_map
    d = load_prepared("/work/main/data/prepared/mnist.npz")
    x, y = d[f"x_{split}"], d[f"y_{split}"]
    rng = np.random.default_rng(seed)
    xs = np.zeros((count, H, W), np.float32); ys = np.full((count, MAXLEN), -1, np.int64)
    for i in range(count):
        n = int(rng.integers(1, MAXLEN + 1))
        idx = rng.integers(0, len(x), n)
        t = rng.uniform(0, 0.5); o = rng.uniform(0, 0.25)
        num = render_number(x[idx], y[idx], (840, 280), t, o, rng)
        xs[i] = strip(ink_map(num.image))
        ys[i, :n] = y[idx]
    return xs, ys


def data(seed, count, split):
    per = count // 2
    with Pool(2) as p:
        parts = p.map(make, [(seed, per, split), (seed + 1000, count - per, split)])
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def build():
    import keras
    from keras import layers
    inp = keras.Input((H, W, 1))
    z = inp
    for f, pool in ((16, (2, 2)), (32, (2, 2)), (64, (2, 1)), (64, (2, 1))):
        z = layers.Conv2D(f, 3, padding="same", use_bias=False)(z)
        z = layers.BatchNormalization()(z); z = layers.ReLU()(z)
        z = layers.MaxPooling2D(pool)(z)
    # (2, 48, 128)
    z = layers.Permute((2, 1, 3))(z)
    z = layers.Reshape((W // 4, 2 * 64))(z)
    z = layers.Dropout(0.25)(z)
    for _ in range(2):
        z = layers.Conv1D(128, 5, padding="same", activation="relu")(z)
    z = layers.Dropout(0.25)(z)
    logits = layers.Dense(11)(z)  # 0 = blank, 1..10 = digits 0..9
    return keras.Model(inp, logits)


def ctc(y_true, y_pred):
    from keras import ops
    y_true = ops.cast(y_true, "int32")
    lengths = ops.sum(ops.cast(y_true >= 0, "int32"), axis=1)
    target = ops.where(y_true >= 0, y_true + 1, 0)
    out_len = ops.full((ops.shape(y_pred)[0],), ops.shape(y_pred)[1], dtype="int32")
    return ops.mean(ops.ctc_loss(target, ops.cast(y_pred, "float32"), lengths, out_len, mask_index=0))


def decode(logits):
    best = logits.argmax(-1)
    texts = []
    for row in best:
        prev, s = 0, []
        for c in row:
            if c != prev and c != 0:
                s.append(str(c - 1))
            prev = c
        texts.append("".join(s))
    return texts


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    t0 = time.time()
    xtr, ytr = data(1, N, "train")
    print("data", time.time() - t0, flush=True)
    import keras
    keras.utils.set_random_seed(3)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build()
    model.summary()
    steps = EPOCHS * (N // 128)
    sched = keras.optimizers.schedules.CosineDecay(1e-4, steps, warmup_target=2e-3, warmup_steps=steps // 12)
    model.compile(keras.optimizers.AdamW(sched, weight_decay=1e-4), loss=ctc)
    model.fit(xtr[..., None], ytr, batch_size=128, epochs=EPOCHS, verbose=2)
    model.save(f"{out}/seq.keras")
    print("trained", time.time() - t0, flush=True)
    # evaluate on val numbers drawn as evaluate draws them (seed 99)
    from pipelines import tracking
    from pipelines.evaluate import EvaluateSettings, draw_numbers
    from pipelines.download import load_prepared
    from pipelines.preprocessing import ink_map
    params = tracking.load_params(__import__("pathlib").Path("/work/main/params.yaml"))
    s = dataclasses.replace(EvaluateSettings.from_params(params["evaluate"]), number_seed=99, number_samples=100)
    d = load_prepared("/work/main/data/prepared/mnist.npz")
    res = {}
    for length in s.number_lengths:
        nums = list(draw_numbers(d["x_val"], d["y_val"], length, s))
        xs = np.stack([strip(ink_map(n.image)) for n in nums])
        texts = decode(np.asarray(model.predict(xs[..., None], verbose=0), np.float32))
        res[length] = np.mean([t == n.text for t, n in zip(texts, nums)])
        joins = [(j, t == n.text) for t, n in zip(texts, nums) for j in n.joins]
    print("val numbers", res, "mean", np.mean(list(res.values())), flush=True)
