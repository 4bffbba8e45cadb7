"""Users' corrections, reviewed by a person, as a versioned dataset: the `feedback` stage.

Anyone can send a correction (`POST /feedback` stores it as *pending*), so a correction is a
candidate, not a fact: nothing reaches training until a reviewer accepts it. The commands:

    python -m pipelines.feedback review              pending corrections, with warnings, and a
                                                     contact sheet PNG of their drawings
    python -m pipelines.feedback accept ID...        accept (or `reject`) by id or id prefix;
    python -m pipelines.feedback reject ID...        the reviewer's name and the time are kept
    python -m pipelines.feedback delete ID...        delete corrections for good
    python -m pipelines.feedback delete --client H   delete everything one client hash sent
    python -m pipelines.feedback export              what `dvc repro` runs (below)

`export` turns the accepted corrections into `data/prepared/corrections.npz`: each drawing goes
through the preprocessing contract the service uses (a number's marks become one example per
digit; a number whose digits touch cannot be split without a model and is left out), drawings
that are the same after preprocessing are kept once (and dropped when reviewers accepted
different labels for them), and each lands in train, validation or test by a hash of its
pixels, so it never moves between splits. The file is byte-identical for the same accepted
set: DVC re-runs training only when that set changes.

The store is the service's (`pipelines/corrections.py`): SQLite under DIGITS_FEEDBACK_DIR by
default, or the database at DIGITS_FEEDBACK_URL in team mode.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageOps

from pipelines import corrections
from pipelines.corrections import NOT_A_DIGIT_LABEL, Correction, CorrectionStore
from pipelines.download import write_npz
from pipelines.preprocessing import (
    IMAGE_SIZE,
    NOT_A_DIGIT,
    SEVERAL_DIGITS,
    ImageError,
    decode_image,
    ink_map,
    ink_to_input,
)
from pipelines.segmentation import mark_inputs

log = logging.getLogger("feedback")

SPLITS = ("train", "val", "test")
TILE = 112  # side of one drawing on the contact sheet, in pixels
CAPTION = 30  # height of the caption under each tile


@dataclass(frozen=True)
class FeedbackSettings:
    validation_share: float  # share of drawings (by pixel hash) in validation
    test_share: float  # and in test; the rest trains
    many_from_client: int  # a client with this many corrections is flagged to the reviewer
    low_probability: float  # a label the model gave less than this probability is flagged

    @classmethod
    def from_params(cls, section: Mapping) -> FeedbackSettings:
        return cls(**section)


@dataclass(frozen=True)
class Example:
    """One drawing's training examples: 28x28 uint8 inputs and their classes."""

    inputs: np.ndarray  # (k, 28, 28) uint8
    classes: tuple[int, ...]

    @property
    def key(self) -> str:
        """The drawing's identity after preprocessing: equal drawings, equal keys."""
        return hashlib.sha256(self.inputs.tobytes()).hexdigest()


def examples_of(png: bytes, label: str) -> Example | None:
    """The training examples of one labelled drawing, or None when it cannot give any: an
    unreadable image, or a number whose marks do not match its digits one to one (a number
    drawn as one mark, its digits touching, is one example of several digits)."""
    try:
        ink = ink_map(decode_image(png))
        if label == NOT_A_DIGIT_LABEL or len(label) == 1:
            inputs = [ink_to_input(ink)]  # the whole drawing, as /predict reads it
        else:
            inputs = mark_inputs(ink)
    except ImageError:
        return None
    classes = (NOT_A_DIGIT,) if label == NOT_A_DIGIT_LABEL else tuple(int(d) for d in label)
    if len(classes) > 1 and len(inputs) == 1:
        return Example(_stored(inputs), (SEVERAL_DIGITS,))  # one mark of touching digits
    if len(inputs) != len(classes):
        return None
    return Example(_stored(inputs), classes)


def _stored(inputs: list[np.ndarray]) -> np.ndarray:
    return np.round(np.stack(inputs) * 255).astype(np.uint8)


def split_of(key: str, settings: FeedbackSettings) -> str:
    """train, val or test, from the drawing's hash: stable whatever else is accepted."""
    position = int(key[:8], 16) / 2**32
    if position < settings.test_share:
        return "test"
    if position < settings.test_share + settings.validation_share:
        return "val"
    return "train"


def build_dataset(
    accepted: Sequence[Correction], settings: FeedbackSettings
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of corrections.npz (x_/y_ per split, sorted by drawing hash) and the counts
    of what was kept and why the rest was not."""
    by_key: dict[str, list[tuple[Example, str]]] = defaultdict(list)
    unusable = 0
    for correction in accepted:
        example = examples_of(correction.image_png, correction.label)
        if example is None:
            unusable += 1
            continue
        by_key[example.key].append((example, correction.label))
    chosen: dict[str, list[Example]] = {split: [] for split in SPLITS}
    conflicting = duplicates = 0
    for key in sorted(by_key):
        group = by_key[key]
        if len({label for _, label in group}) > 1:
            conflicting += len(group)
            continue
        duplicates += len(group) - 1
        chosen[split_of(key, settings)].append(group[0][0])
    arrays: dict[str, np.ndarray] = {}
    for split, examples in chosen.items():
        inputs = [example.inputs for example in examples]
        arrays[f"x_{split}"] = (
            np.concatenate(inputs) if inputs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        )
        arrays[f"y_{split}"] = np.array(
            [c for example in examples for c in example.classes], dtype=np.int64
        )
    kept = sum(len(examples) for examples in chosen.values())
    counts = {
        "accepted": len(accepted),
        "drawings": kept,
        "duplicates": duplicates,  # sent again with the same label: kept once
        "conflicting": conflicting,
        "unusable": unusable,
        **{f"{split}_examples": len(arrays[f"y_{split}"]) for split in SPLITS},
    }
    return arrays, counts


def export(out: Path, report: Path, settings: FeedbackSettings) -> dict[str, int]:
    """Write the accepted corrections' dataset and its counts."""
    accepted: list[Correction] = []
    if corrections.store_exists():  # else nobody sent one here: an empty set, and no new file
        store = CorrectionStore.from_env()
        try:
            accepted = store.list(status="accepted")
        finally:
            store.close()
    arrays, counts = build_dataset(accepted, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(out, arrays)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    return counts


def warnings_for(
    pending: Sequence[Correction], everything: Sequence[Correction], settings: FeedbackSettings
) -> dict[str, list[str]]:
    """What a reviewer should look at twice, per pending correction id: a client sending many,
    a label the model found very unlikely, a drawing sent before, a number that cannot be
    split into its digits."""
    per_client = Counter(c.client_hash for c in everything)
    keys: dict[str, str | None] = {}
    for correction in everything:
        example = examples_of(correction.image_png, correction.label)
        keys[correction.id] = example.key if example else None
    per_key = Counter(key for key in keys.values() if key is not None)
    flagged: dict[str, list[str]] = {}
    for correction in pending:
        notes = []
        if per_client[correction.client_hash] >= settings.many_from_client:
            notes.append(f"client sent {per_client[correction.client_hash]}")
        probability = correction.label_probability
        if probability is not None and probability < settings.low_probability:
            notes.append(f"model gave the label p={probability:.3f}")
        key = keys[correction.id]
        if key is None:
            notes.append("unusable: marks do not match the label's digits")
        elif per_key[key] > 1:
            notes.append(f"same drawing sent {per_key[key]} times")
        flagged[correction.id] = notes
    return flagged


def contact_sheet(pending: Sequence[Correction], flagged: Mapping[str, list[str]]) -> Image.Image:
    """The pending drawings side by side, each captioned with its number, label and the model's
    answer; flagged ones framed in red."""
    columns = max(1, min(8, len(pending)))
    rows = max(1, -(-len(pending) // columns))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for number, correction in enumerate(pending, start=1):
        left = (number - 1) % columns * TILE
        top = (number - 1) // columns * (TILE + CAPTION)
        sheet.paste(drawing_tile(correction.image_png), (left, top))
        colour = "red" if flagged.get(correction.id) else "black"
        if flagged.get(correction.id):
            draw.rectangle([left, top, left + TILE - 1, top + TILE - 1], outline="red", width=3)
        draw.text((left + 4, top + TILE + 2), f"#{number} {correction.label}", fill=colour)
        draw.text((left + 4, top + TILE + 15), f"model: {correction.model_answer}", fill="gray")
    return sheet


def drawing_tile(png: bytes) -> Image.Image:
    """A drawing as dark ink on white, fitted into a tile (transparent canvases included)."""
    try:
        ink = ink_map(decode_image(png))
    except ImageError:
        return Image.new("RGB", (TILE, TILE), "lightgray")
    peak = float(ink.max()) or 1.0
    gray = Image.fromarray(np.uint8(255 - np.clip(ink / peak, 0, 1) * 255))
    tile = ImageOps.pad(gray, (TILE - 8, TILE - 8), color=255)
    framed = Image.new("L", (TILE, TILE), 255)
    framed.paste(tile, (4, 4))
    return framed.convert("RGB")


def review(sheet: Path, settings: FeedbackSettings, limit: int) -> str:
    """The pending corrections as a table (returned) and a contact sheet (written)."""
    store = CorrectionStore.from_env()
    try:
        everything = store.list()
        pending = [c for c in everything if c.status == "pending"][:limit]
    finally:
        store.close()
    if not pending:
        return "no pending corrections\n"
    flagged = warnings_for(pending, everything, settings)
    sheet.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(pending, flagged).save(sheet)
    lines = [f"{len(pending)} pending correction(s); drawings in {sheet}", ""]
    lines.append(f"{'#':>3}  {'id':<10} {'label':<12} {'model':<12} {'client':<10} warnings")
    for number, c in enumerate(pending, start=1):
        lines.append(
            f"{number:>3}  {c.id[:8]:<10} {c.label:<12} {c.model_answer or '-':<12} "
            f"{c.client_hash[:8]:<10} {'; '.join(flagged[c.id])}"
        )
    lines += [
        "",
        "accept or reject by id (a unique prefix is enough):",
        "  python -m pipelines.feedback accept ID...",
        "  python -m pipelines.feedback reject ID...",
    ]
    return "\n".join(lines) + "\n"


def resolve(prefixes: Sequence[str], known: Sequence[str], what: str) -> list[str]:
    """The full values for full values or unique prefixes of them (ids, client hashes, as
    `review` shows them); raises SystemExit naming any that matches none or several."""
    resolved = []
    for prefix in prefixes:
        matches = sorted({value for value in known if value.startswith(prefix.lower())})
        if len(matches) != 1:
            problem = "matches no correction" if not matches else "is ambiguous"
            raise SystemExit(f"feedback: {what} {prefix!r} {problem}")
        resolved.append(matches[0])
    return resolved


def judge(prefixes: Sequence[str], status: str, reviewer: str) -> str:
    store = CorrectionStore.from_env()
    try:
        ids = resolve(prefixes, [c.id for c in store.list()], "id")
        changed = store.review(ids, status, reviewer)
    finally:
        store.close()
    return f"{changed} correction(s) {status} by {reviewer}\n"


def delete(prefixes: Sequence[str], client: str | None) -> str:
    store = CorrectionStore.from_env()
    try:
        stored = store.list()
        if client:
            [client] = resolve([client], [c.client_hash for c in stored], "client")
            removed = store.delete_client(client)
        else:
            removed = sum(store.delete(i) for i in resolve(prefixes, [c.id for c in stored], "id"))
    finally:
        store.close()
    return f"{removed} correction(s) deleted\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    commands = parser.add_subparsers(dest="command", required=True)
    shown = commands.add_parser("review", help="show pending corrections")
    shown.add_argument("--sheet", type=Path, help="contact sheet (default: the store's folder)")
    shown.add_argument("--limit", type=int, default=200)
    for verb in ("accept", "reject"):
        judged = commands.add_parser(verb, help=f"{verb} pending corrections")
        judged.add_argument("ids", nargs="+")
        judged.add_argument("--reviewer", default=getpass.getuser())
    removed = commands.add_parser("delete", help="delete corrections, or all of one client's")
    removed.add_argument("ids", nargs="*")
    removed.add_argument("--client", help="a client hash, or its prefix as `review` shows it")
    exported = commands.add_parser("export", help="the accepted corrections as a dataset")
    exported.add_argument("--out", type=Path, default=Path("data/prepared/corrections.npz"))
    exported.add_argument("--report", type=Path, default=Path("reports/corrections.json"))
    args = parser.parse_args(argv)
    if args.command == "delete" and not (args.ids or args.client):
        parser.error("delete needs ids or --client")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = FeedbackSettings.from_params(yaml.safe_load(args.params.read_text())["feedback"])
    if args.command == "export":
        counts = export(args.out, args.report, settings)
        log.info("accepted corrections: %s", counts)
        return
    if args.command == "review":
        sheet = args.sheet or corrections.store_folder() / "review.png"
        answer = review(sheet, settings, args.limit)
    elif args.command in ("accept", "reject"):
        answer = judge(args.ids, f"{args.command}ed", args.reviewer)
    else:
        answer = delete(args.ids, args.client)
    sys.stdout.write(answer)


if __name__ == "__main__":
    main()
