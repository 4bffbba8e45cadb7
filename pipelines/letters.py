"""Letters and symbols drawn as a hand would draw them: more "not a digit" training drawings.

Omniglot's Latin alphabet is lower case, so without more data the model never sees the capital
letters people write most (an R, an E or a T came back as a confident digit). The Hershey fonts
(the `hershey-fonts` package, MIT licence) describe each glyph as pen strokes, a centre line like
the one `pipelines.download` recovers from an Omniglot drawing. Each drawing here takes one glyph,
slants, rotates and stretches it, moves every stroke and point a little as a hand would, and
traces the result on a grid as a one-pixel centre line; the download stage then redraws it with a
round pen of MNIST's stroke width and passes it through the preprocessing contract, exactly as it
does for Omniglot. Characters a person could read as a digit (O, I, S, Z, B, G, ...) are never
listed (params.yaml), and digits are refused outright.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

GRID = 64  # side in pixels of the grid a glyph's centre line is traced on
MARGIN = 4  # blank pixels kept around the traced glyph

Stroke = np.ndarray  # (points, 2) x, y in font units, y pointing down


@dataclass(frozen=True)
class LetterSettings:
    """The `download.letters:` section of params.yaml."""

    fonts: tuple[str, ...]  # single-stroke Hershey fonts
    characters: str  # drawn from every font; none may be a digit
    drawings: int  # how many drawings in all, characters and fonts taken in turn
    rotation_degrees: float  # each drawing turned by up to this much either way
    slant: float  # and sheared by up to this much (x += slant * y)
    stretch: float  # and its width scaled by a factor in [1 - stretch, 1 + stretch]
    wobble: float  # strokes and points moved by up to this share of the glyph's height
    seed: int

    def __post_init__(self) -> None:
        digits = sorted({character for character in self.characters if character.isdigit()})
        if digits:
            raise ValueError(f"download.letters: characters must not hold digits: {digits}")
        if not self.fonts or not self.characters.strip() or self.drawings < 0:
            raise ValueError("download.letters: need fonts, characters and drawings >= 0")
        if not 0 <= self.stretch < 1 or self.wobble < 0:
            raise ValueError("download.letters: need 0 <= stretch < 1 and wobble >= 0")

    @classmethod
    def from_params(cls, path: Path) -> LetterSettings:
        download = (yaml.safe_load(path.read_text()) or {}).get("download") or {}
        try:
            return cls.from_section(download.get("letters") or {})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> LetterSettings:
        missing = [key for key in cls.__dataclass_fields__ if key not in section]
        if missing:
            raise ValueError(f"download.letters: section lacks {', '.join(missing)}")
        return cls(
            fonts=tuple(section["fonts"]),
            characters=str(section["characters"]).replace(" ", ""),
            drawings=int(section["drawings"]),
            rotation_degrees=float(section["rotation_degrees"]),
            slant=float(section["slant"]),
            stretch=float(section["stretch"]),
            wobble=float(section["wobble"]),
            seed=int(section["seed"]),
        )


@dataclass(frozen=True)
class Letter:
    """One drawing: which glyph it shows and its traced centre line (bool, GRID x GRID)."""

    font: str
    character: str
    centre: np.ndarray


def glyph_strokes(fonts: Sequence[str], characters: str) -> dict[tuple[str, str], list[Stroke]]:
    """Every (font, character)'s pen strokes. Raises ValueError for an unknown font or a
    character a font does not draw."""
    from HersheyFonts import HersheyFonts  # the font data is only needed by this stage

    strokes: dict[tuple[str, str], list[Stroke]] = {}
    for font_name in fonts:
        font = HersheyFonts()
        if font_name not in font.default_font_names:
            raise ValueError(f"download.letters: unknown Hershey font {font_name!r}")
        font.load_default_font(font_name)
        for character in characters:
            lines = [
                np.asarray(line, dtype=np.float64) for line in font.strokes_for_text(character)
            ]
            lines = [line for line in lines if len(line) > 1]
            if not lines:
                raise ValueError(f"download.letters: font {font_name} draws no {character!r}")
            strokes[font_name, character] = lines
    return strokes


def draw_letters(settings: LetterSettings) -> list[Letter]:
    """`settings.drawings` drawings, the glyphs taken in turn, each distorted its own way."""
    strokes = glyph_strokes(settings.fonts, settings.characters)
    glyphs = sorted(strokes)
    rng = np.random.default_rng(settings.seed)
    letters = []
    for index in range(settings.drawings):
        font, character = glyphs[index % len(glyphs)]
        moved = distort(strokes[font, character], settings, rng)
        letters.append(Letter(font, character, trace(moved)))
    return letters


def distort(
    strokes: Sequence[Stroke], settings: LetterSettings, rng: np.random.Generator
) -> list[Stroke]:
    """The strokes turned, slanted, stretched, and each stroke and point moved a little."""
    points = np.concatenate(strokes)
    height = max(float(np.ptp(points[:, 1])), float(np.ptp(points[:, 0])), 1.0)
    angle = math.radians(rng.uniform(-1.0, 1.0) * settings.rotation_degrees)
    shear = rng.uniform(-1.0, 1.0) * settings.slant
    widen = rng.uniform(1.0 - settings.stretch, 1.0 + settings.stretch)
    cos, sin = math.cos(angle), math.sin(angle)
    transform = np.array([[cos, -sin], [sin, cos]]) @ np.array([[widen, shear], [0.0, 1.0]])
    centre = points.mean(axis=0)
    moved = []
    for stroke in strokes:
        shift = rng.uniform(-1.0, 1.0, size=2) * settings.wobble * height
        jitter = rng.normal(0.0, settings.wobble * height / 3, size=stroke.shape)
        moved.append((stroke - centre) @ transform.T + shift + _smoothed(jitter))
    return moved


def _smoothed(jitter: np.ndarray) -> np.ndarray:
    """Jitter averaged along the stroke, so that a line bends rather than zigzags."""
    if len(jitter) < 3:
        return jitter
    padded = np.pad(jitter, ((1, 1), (0, 0)), mode="edge")
    return (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0


def trace(strokes: Sequence[Stroke]) -> np.ndarray:
    """Strokes scaled into the grid (longer side GRID - 2 * MARGIN) as one-pixel lines."""
    points = np.concatenate(strokes)
    low = points.min(axis=0)
    scale = (GRID - 2 * MARGIN - 1) / max(float(np.ptp(points, axis=0).max()), 1e-6)
    canvas = Image.new("1", (GRID, GRID), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        xy = (stroke - low) * scale + MARGIN
        draw.line([tuple(point) for point in xy.round(2).tolist()], fill=1, width=1)
    return np.asarray(canvas, dtype=bool)
