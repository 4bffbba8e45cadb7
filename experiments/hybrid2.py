"""Hybrid reading on val numbers (seed 99, 100 per length): CNN marks; marks that may hold several
read by a CTC model. python hybrid.py SEQMODEL H W DIGIT_H [CNN]"""
import sys, dataclasses, pathlib
sys.path.insert(0, "/work/main")
import numpy as np, keras
from PIL import Image
from pipelines import tracking
from pipelines.evaluate import EvaluateSettings, draw_numbers, predict_probabilities
from pipelines.download import load_prepared
from pipelines.preprocessing import ink_map, refused, INK_THRESHOLD
from pipelines.segmentation import plan_reading, working_scale
seq = keras.saving.load_model(sys.argv[1], compile=False, safe_mode=False)
H, W, DH = map(int, sys.argv[2:5])
cnn = keras.saving.load_model(sys.argv[5] if len(sys.argv) > 5 else "/work/main/models/model.keras")
def strip(ink):
    rows = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=1)); cols = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=0))
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]; h, w = crop.shape
    scale = min(DH / h, (W - 8) / w); nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = Image.fromarray(crop.astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    out = np.zeros((H, W), np.float32); top = (H - nh) // 2
    out[top: top + nh, 4: 4 + nw] = np.clip(np.asarray(img), 0, 1); return out
def decode(lg):
    s, prev = [], 0
    for c in lg.argmax(-1):
        if c != prev and c != 0: s.append(str(c - 1))
        prev = c
    return "".join(s)
params = tracking.load_params(pathlib.Path("/work/main/params.yaml"))
st = dataclasses.replace(EvaluateSettings.from_params(params["evaluate"]), number_seed=99, number_samples=100)
d = load_prepared("/work/main/data/prepared/mnist.npz")
from pipelines.drawing import CANVAS_STYLES, render_on_canvas
from pipelines.preprocessing import SEVERAL_DIGITS, NOT_A_DIGIT
def use_line(cand, w, variant):
    if not cand.may_hold_several(w): return False
    if variant == 1: return True
    top = int(np.argmax(w))
    return top == SEVERAL_DIGITS or (cand.wide and top < NOT_A_DIGIT)
def read(image, variant):
    plan = plan_reading(ink_map(image), working_scale(image), image.size)
    whole = predict_probabilities(cnn, plan.inputs, 1000)
    text = ""
    for cand, w in zip(plan.candidates, whole):
        if use_line(cand, w, variant):
            t = decode(np.asarray(seq.predict(strip(cand.piece)[None, ..., None], verbose=0), np.float32)[0])
            if t: text += t; continue
        text += "?" if refused(w) else str(int(np.argmax(w[:10])))
    return text
others = load_prepared("/work/main/data/prepared/not_digits.npz")
val_not = others["images"][others["split"] == "validation"]
rng = np.random.default_rng(st.canvas_seed)
drawings = [render_on_canvas(im, CANVAS_STYLES["centred"], st.canvas_size, rng) for im in val_not]
numbers = {length: list(draw_numbers(d["x_val"], d["y_val"], length, st)) for length in st.number_lengths}
for variant in (1, 2):
    res = {length: float(np.mean([read(n.image, variant) == n.text for n in nums])) for length, nums in numbers.items()}
    ref = float(np.mean(["?" in read(dr, variant) for dr in drawings]))
    print(sys.argv[1], "variant", variant, "numbers", res, "mean", round(float(np.mean(list(res.values()))), 4), "| val alphabets drawn refused by /read", round(ref, 4), flush=True)
