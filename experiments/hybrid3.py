"""Hybrid reading variants with the branch's lines.py: python hybrid3.py READER [CNN]
Numbers: val digits, seed 99, 100 per length. Alphabets: val non-digits drawn on the pad (centred)."""
import sys, dataclasses, pathlib
sys.path.insert(0, "/tmp/s16/line")
import numpy as np, keras
from pipelines import tracking
from pipelines.evaluate import EvaluateSettings, draw_numbers, predict_probabilities
from pipelines.download import load_prepared
from pipelines.drawing import CANVAS_STYLES, render_on_canvas
from pipelines.lines import line_input, read_line
from pipelines.preprocessing import ink_map, refused, ink_to_input, NoDigitError, SEVERAL_DIGITS, NOT_A_DIGIT
from pipelines.segmentation import plan_reading, working_scale

reader = keras.saving.load_model(sys.argv[1], compile=False, safe_mode=False)
cnn = keras.saving.load_model(sys.argv[2] if len(sys.argv) > 2 else "/work/main/models/model.keras")
LOGITS = "--logits" in sys.argv


def frames_of(strip):
    out = np.asarray(reader.predict(strip[None, ..., None], verbose=0), np.float64)[0]
    if LOGITS:
        out = np.exp(out - out.max(-1, keepdims=True)); out /= out.sum(-1, keepdims=True)
    return out


def analyse(image):
    plan = plan_reading(ink_map(image), working_scale(image), image.size)
    whole = predict_probabilities(cnn, plan.inputs, 1000)
    marks = []
    for cand, w in zip(plan.candidates, whole):
        info = {"w": w, "flag": cand.may_hold_several(w), "wide": cand.wide, "digits": None}
        if info["flag"]:
            try:
                line = line_input(cand.piece)
                digits = read_line(frames_of(line.pixels), line)
            except NoDigitError:
                digits = []
            pieces = []
            for dg in digits:
                a, b = dg.columns
                part = np.zeros_like(cand.piece); part[:, a:b] = cand.piece[:, a:b]
                try:
                    pieces.append(ink_to_input(part))
                except NoDigitError:
                    pieces.append(np.zeros((28, 28), np.float32))
            checks = predict_probabilities(cnn, np.stack(pieces), 1000) if pieces else np.zeros((0, 12))
            info["digits"] = [(dg.digit, float(dg.probabilities.max()), c) for dg, c in zip(digits, checks)]
        marks.append(info)
    return marks


def text(marks, route, min_conf, verify):
    out = ""
    for m in marks:
        w = m["w"]
        use = m["flag"] and (route == 1 or int(np.argmax(w)) == SEVERAL_DIGITS or (m["wide"] and int(np.argmax(w)) < NOT_A_DIGIT))
        if use and m["digits"]:
            ok = all(c >= min_conf for _, c, _ in m["digits"])
            if verify:
                ok = ok and all(not refused(chk) for _, _, chk in m["digits"])
            if ok:
                out += "".join(str(d) for d, _, _ in m["digits"]); continue
        out += "?" if refused(w) else str(int(np.argmax(w[:10])))
    return out


params = tracking.load_params(pathlib.Path("/work/main/params.yaml"))
st = dataclasses.replace(EvaluateSettings.from_params(params["evaluate"]), number_seed=99, number_samples=100)
d = load_prepared("/work/main/data/prepared/mnist.npz")
others = load_prepared("/work/main/data/prepared/not_digits.npz")
val_not = others["images"][others["split"] == "validation"]
import os
LIMIT = int(os.environ.get("LIMIT", 0)) or None
val_not = val_not[:LIMIT]
if LIMIT: st = dataclasses.replace(st, number_samples=LIMIT)
rng = np.random.default_rng(st.canvas_seed)
drawings = [render_on_canvas(im, CANVAS_STYLES["centred"], st.canvas_size, rng) for im in val_not]
numbers = [(length, n, analyse(n.image)) for length in st.number_lengths for n in draw_numbers(d["x_val"], d["y_val"], length, st)]
alphabets = [analyse(dr) for dr in drawings]
for route in (1, 2):
    for min_conf in (0.0, 0.9, 0.97):
        for verify in (False, True):
            res = {}
            for length in st.number_lengths:
                res[length] = float(np.mean([text(m, route, min_conf, verify) == n.text for L, n, m in numbers if L == length]))
            ref = float(np.mean(["?" in text(m, route, min_conf, verify) for m in alphabets]))
            print(f"route {route} conf {min_conf} verify {verify}: numbers {np.mean(list(res.values())):.3f} {res} | alphabets /read refused {ref:.4f}", flush=True)
