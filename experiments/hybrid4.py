"""The line reader alone (no CNN) on whole drawings: val numbers (seed 99, 100 per length) read
exactly, and val alphabets drawn on the pad refused (any '?' or nothing read). python hybrid4.py READER"""
import sys, dataclasses, pathlib
sys.path.insert(0, "/tmp/s16/line")
import numpy as np, keras
from pipelines import tracking
from pipelines.evaluate import EvaluateSettings, draw_numbers
from pipelines.download import load_prepared
from pipelines.drawing import CANVAS_STYLES, render_on_canvas
from pipelines.lines import line_input, read_line
from pipelines.preprocessing import ink_map
reader = keras.saving.load_model(sys.argv[1], compile=False, safe_mode=False)
def texts(images):
    lines = [line_input(ink_map(im)) for im in images]
    out = np.asarray(reader.predict(np.stack([l.pixels for l in lines])[..., None], batch_size=200, verbose=0))
    return ["".join(str(d.digit) if d.is_digit else "?" for d in read_line(o, l)) for o, l in zip(out, lines)]
params = tracking.load_params(pathlib.Path("/work/main/params.yaml"))
st = dataclasses.replace(EvaluateSettings.from_params(params["evaluate"]), number_seed=99, number_samples=100)
d = load_prepared("/work/main/data/prepared/mnist.npz")
others = load_prepared("/work/main/data/prepared/not_digits.npz")
val_not = others["images"][others["split"] == "validation"]
rng = np.random.default_rng(st.canvas_seed)
drawings = [render_on_canvas(im, CANVAS_STYLES["centred"], st.canvas_size, rng) for im in val_not]
res = {}
for length in st.number_lengths:
    nums = list(draw_numbers(d["x_val"], d["y_val"], length, st))
    res[length] = float(np.mean([t == n.text for t, n in zip(texts([n.image for n in nums]), nums)]))
alpha = texts(drawings)
refused = float(np.mean([("?" in t) or not t for t in alpha]))
# single val digits drawn on the pad: read as that one digit?
rng = np.random.default_rng(5)
idx = rng.choice(len(d["x_val"]), 1000, replace=False)
singles = [render_on_canvas(d["x_val"][i], CANVAS_STYLES["centred"], st.canvas_size, rng) for i in idx]
single_ok = float(np.mean([t == str(d["y_val"][i]) for t, i in zip(texts(singles), idx)]))
single_refused = float(np.mean([("?" in t) or not t for t in texts(singles)]))
print(sys.argv[1], "line alone: numbers", res, "mean", round(float(np.mean(list(res.values()))), 4), "| val alphabets drawn refused", round(refused, 4), "| val digits drawn: right", single_ok, "refused", single_refused)
