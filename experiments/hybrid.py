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
res, line = {}, {}
for length in st.number_lengths:
    nums = list(draw_numbers(d["x_val"], d["y_val"], length, st))
    texts, lines = [], []
    for n in nums:
        plan = plan_reading(ink_map(n.image), working_scale(n.image), n.image.size)
        whole = predict_probabilities(cnn, plan.inputs, 1000)
        text = ""
        for cand, w in zip(plan.candidates, whole):
            if cand.may_hold_several(w):
                t = decode(np.asarray(seq.predict(strip(cand.piece)[None, ..., None], verbose=0), np.float32)[0])
                if t: text += t; continue
            text += "?" if refused(w) else str(int(np.argmax(w[:10])))
        texts.append(text)
        lines.append(decode(np.asarray(seq.predict(strip(ink_map(n.image))[None, ..., None], verbose=0), np.float32)[0]))
    res[length] = float(np.mean([t == n.text for t, n in zip(texts, nums)]))
    line[length] = float(np.mean([t == n.text for t, n in zip(lines, nums)]))
    wrong = [(n.text, t, n.joins) for t, n in zip(texts, nums) if t != n.text][:3]
    print(length, res[length], wrong, flush=True)
print(sys.argv[1], "hybrid", res, "mean", np.mean(list(res.values())))
print(sys.argv[1], "line", line, "mean", np.mean(list(line.values())))
