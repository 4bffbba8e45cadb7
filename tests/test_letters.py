"""The drawn letters and symbols that teach the model what is not a digit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import download
from pipelines.letters import GRID, LetterSettings, draw_letters, glyph_strokes
from tests.helpers import letter_settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_glyph_is_drawn_in_turn_as_a_one_pixel_centre_line_on_the_grid():
    letters = draw_letters(letter_settings())
    assert [(letter.font, letter.character) for letter in letters[:8]] == [
        (font, character) for font in ("futural", "scripts") for character in "+ERT"
    ]
    for letter in letters:
        assert letter.centre.shape == (GRID, GRID) and letter.centre.dtype == bool
        rows, cols = np.flatnonzero(letter.centre.any(1)), np.flatnonzero(letter.centre.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) >= GRID - 12  # fills the grid
        assert letter.centre.sum() < 0.25 * GRID * GRID  # lines, not blobs


def test_the_same_seed_draws_the_same_letters_and_another_seed_other_ones():
    first, again = draw_letters(letter_settings()), draw_letters(letter_settings())
    other = draw_letters(letter_settings(seed=18))
    assert all(np.array_equal(a.centre, b.centre) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a.centre, b.centre) for a, b in zip(first, other, strict=True))


def test_two_drawings_of_one_glyph_differ_as_two_hands_would():
    letters = draw_letters(letter_settings(characters="R", fonts=("futural",), drawings=2))
    assert not np.array_equal(letters[0].centre, letters[1].centre)


def test_digits_unknown_fonts_and_characters_a_font_lacks_are_refused():
    with pytest.raises(ValueError, match="must not hold digits"):
        letter_settings(characters="AB7")
    with pytest.raises(ValueError, match="unknown Hershey font"):
        glyph_strokes(("comic_sans",), "A")
    with pytest.raises(ValueError, match="draws no"):
        glyph_strokes(("futural",), "\u00e9")


def test_the_params_letters_exclude_every_character_a_person_could_read_as_a_digit():
    letters = LetterSettings.from_params(REPO_ROOT / "params.yaml")
    digit_like = set("OQDCIJLlZzSsGbBYyt&$?agdqceo") | set("0123456789")
    assert not digit_like & set(letters.characters)
    assert glyph_strokes(letters.fonts, letters.characters)  # every font draws every character


def test_drawn_letters_join_the_train_split_only_as_model_inputs(tmp_path):
    images = download.centres_to_inputs(
        [letter.centre for letter in draw_letters(letter_settings())], [2.5] * 16, ["x"] * 16
    )
    assert images.dtype == np.uint8 and images.shape == (16, 28, 28)
    assert images.max() == 255
    # as wide as MNIST's strokes once in the 20-pixel box (quartiles 2.24-3.26 px)
    assert 2.0 < np.median(download.stroke_width(images)) < 3.3
    arrays = {
        "images": np.zeros((2, 28, 28), np.uint8),
        "alphabet": np.array(["Beta", "Gamma"]),
        "character": np.array(["Beta/character01", "Gamma/character01"]),
        "drawer": np.array([1, 1], np.int32),
        "split": np.array(["validation", "test"]),
    }
    joined = download._with_letters(arrays, letter_settings(drawings=5), np.full(5, 2.5))
    assert len(joined["images"]) == 7
    assert list(joined["split"]) == ["validation", "test"] + ["train"] * 5
    assert set(joined["alphabet"][2:]) == {download.LETTERS_ALPHABET}
