"""The `download` stage: fetch MNIST and the Omniglot drawings, prepare two `.npz` files.

Every later stage reads `data/prepared/mnist.npz` (the digits) or `data/prepared/not_digits.npz`
(drawings of letters and symbols, the "not a digit" class), so this module is the one place that
touches the network. Each raw file is checked against a SHA-256 written in this file (never
one read from a mirror), files are written to a temporary name and moved into place only
once verified, and the validation split is carved from the 60,000 training images with a
fixed seed, so the test set is never used to choose anything.

The not-a-digit drawings come from two public Omniglot subsets (MIT licence, Brenden Lake):
de-duplicated (the Latin and Greek alphabets are in both zips), stripped of the characters a
person could read as a digit (listed in params.yaml), split by whole alphabet so that the
rejection threshold is chosen and tested on alphabets the model never saw, and redrawn with a
pen as wide, relative to the character, as MNIST strokes before going through the same
preprocessing contract as every canvas drawing.

Run it through DVC (`dvc repro download`) or directly:

    python -m pipelines.download --params params.yaml --raw-dir data/raw \
        --out data/prepared/mnist.npz --not-digits-out data/prepared/not_digits.npz
    MNIST_MIRROR=../shared/mnist OMNIGLOT_MIRROR=../shared/omniglot \
        python -m pipelines.download   # local copies instead

MNIST_MIRROR and OMNIGLOT_MIRROR (each a directory, a file:// URL or an http(s):// prefix)
replace the mirrors listed under `download:` and `download.omniglot:` in params.yaml. A local
MNIST_MIRROR alone also serves the Omniglot zips from an `omniglot` folder beside it (a copy of
both datasets side by side, like `../shared`), before the public mirrors.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import http.client
import io
import logging
import os
import socket
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, url2pathname, urlopen

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from pipelines.letters import LetterSettings, draw_letters
from pipelines.preprocessing import DIGIT_BOX, ImageError, ink_to_input

logger = logging.getLogger(__name__)

# SHA-256 of the original files, as served by every public mirror (file name -> hex digest).
MNIST_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",  # noqa: E501
    }
)
MNIST_FILES: tuple[str, ...] = tuple(MNIST_SHA256)

# SHA-256 of the two Omniglot subsets in brendenlake/omniglot (python/), MIT licence.
OMNIGLOT_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "images_background_small1.zip": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",  # noqa: E501
        "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",  # noqa: E501
    }
)
SPLITS = ("train", "validation", "test")
LETTERS_ALPHABET = "Letters"  # the drawn letters and symbols (pipelines.letters) in not_digits.npz
# The eight neighbours of a pixel as (row, col) offsets, clockwise from north (Zhang-Suen's
# P2..P9); neighbour i sets bit i of a pixel's neighbourhood code.
NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))

IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension (count)
IMAGE_SIDE = 28
CHUNK_BYTES = 1 << 16
# Errors worth another attempt at the same mirror; a 404 or a wrong checksum is not.
TRANSIENT_ERRORS = (TimeoutError, ConnectionError, socket.gaierror, http.client.HTTPException)


class DownloadError(Exception):
    """No source delivered a file with the expected checksum."""


class IdxFormatError(ValueError):
    """An IDX file does not match its own header (bad magic, truncated, trailing data)."""


class ChecksumMismatchError(ValueError):
    """A source delivered bytes whose SHA-256 is not the one in MNIST_SHA256."""


class OmniglotFormatError(ValueError):
    """An Omniglot zip or drawing is not laid out as alphabet/characterNN/ID_drawer.png."""


@dataclass(frozen=True)
class DownloadSettings:
    """The `download:` section of params.yaml."""

    mirrors: tuple[str, ...]
    timeout_seconds: float
    retries: int
    backoff_seconds: float
    validation_size: int
    split_seed: int

    def __post_init__(self) -> None:
        if self.timeout_seconds <= 0 or self.retries < 1 or self.backoff_seconds < 0:
            raise ValueError(f"download: need timeout_seconds > 0, retries >= 1, got {self}")

    @classmethod
    def from_params(cls, path: Path) -> DownloadSettings:
        section = (yaml.safe_load(path.read_text()) or {}).get("download") or {}
        missing = [key for key in cls.__dataclass_fields__ if key not in section]
        if missing:
            raise ValueError(f"{path}: download: section lacks {', '.join(missing)}")
        return cls(
            mirrors=tuple(section["mirrors"]),
            timeout_seconds=float(section["timeout_seconds"]),
            retries=int(section["retries"]),
            backoff_seconds=float(section["backoff_seconds"]),
            validation_size=int(section["validation_size"]),
            split_seed=int(section["split_seed"]),
        )


@dataclass(frozen=True)
class OmniglotSettings:
    """The `download.omniglot:` section of params.yaml: the "not a digit" drawings."""

    mirrors: tuple[str, ...]
    validation_alphabets: tuple[str, ...]
    test_alphabets: tuple[str, ...]
    exclude: tuple[str, ...]  # "Alphabet/characterNN" that a person could read as a digit
    stroke_width: tuple[float, float]  # pen width range, in pixels of the 20-pixel digit box
    stroke_seed: int

    def __post_init__(self) -> None:
        shared = set(self.validation_alphabets) & set(self.test_alphabets)
        if shared:
            raise ValueError(f"download.omniglot: alphabets in validation and test: {shared}")
        low, high = self.stroke_width
        if not 0 < low <= high < DIGIT_BOX:
            raise ValueError(f"download.omniglot: need 0 < stroke_width[0] <= [1] < {DIGIT_BOX}")

    @classmethod
    def from_params(cls, path: Path) -> OmniglotSettings:
        download = (yaml.safe_load(path.read_text()) or {}).get("download") or {}
        section = download.get("omniglot") or {}
        missing = [key for key in cls.__dataclass_fields__ if key not in section]
        if missing:
            raise ValueError(f"{path}: download.omniglot: section lacks {', '.join(missing)}")
        low, high = section["stroke_width"]
        return cls(
            mirrors=tuple(section["mirrors"]),
            validation_alphabets=tuple(section["validation_alphabets"]),
            test_alphabets=tuple(section["test_alphabets"]),
            exclude=tuple(section["exclude"]),
            stroke_width=(float(low), float(high)),
            stroke_seed=int(section["stroke_seed"]),
        )


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file: the value DVC records for a single-file output."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yield a temporary file beside `path`; if the block succeeds, fsync it and move it
    into place with os.replace, otherwise delete it. Readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def resolve_sources(mirrors: Sequence[str], override: str | None = None) -> list[str]:
    """Base URLs to try in order: `override` (MNIST_MIRROR) alone if set, else `mirrors`.
    A plain directory becomes a file:// URL, resolved against the working directory."""
    chosen = [override] if override else list(mirrors)
    bases = []
    for mirror in chosen:
        if not mirror.startswith(("http://", "https://", "file://")):
            mirror = Path(mirror).resolve().as_uri()
        bases.append(mirror if mirror.endswith("/") else mirror + "/")
    return bases


def omniglot_sources(mirrors: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """OMNIGLOT_MIRROR alone if set; else an `omniglot` folder beside a local MNIST_MIRROR, if
    there is one, then `mirrors`. Every file is checked against its SHA-256 wherever it is from."""
    if environ.get("OMNIGLOT_MIRROR"):
        return resolve_sources(mirrors, environ["OMNIGLOT_MIRROR"])
    beside = _local_sibling(environ.get("MNIST_MIRROR", ""), "omniglot")
    return resolve_sources(([str(beside)] if beside else []) + list(mirrors))


def _local_sibling(mirror: str, name: str) -> Path | None:
    """The directory `name` beside a local mirror (a path or a file:// URL), if it exists."""
    if not mirror or mirror.startswith(("http://", "https://")):
        return None
    if mirror.startswith("file://"):
        mirror = url2pathname(urlparse(mirror).path)
    sibling = Path(mirror).resolve().parent / name
    return sibling if sibling.is_dir() else None


def _open(url: str, timeout: float) -> tuple[BinaryIO, int | None]:
    """Open a file:// or http(s):// URL; return the stream and its length if known."""
    if url.startswith("file://"):
        path = Path(url2pathname(urlparse(url).path))
        return open(path, "rb"), path.stat().st_size
    # The timeout applies to every socket operation, so a stalled transfer raises too.
    response = urlopen(Request(url, headers={"User-Agent": "digits-download"}), timeout=timeout)
    length = response.headers.get("Content-Length")
    return response, int(length) if length else None


def _copy(url: str, out: BinaryIO, timeout: float, label: str) -> str:
    """Stream `url` into `out` with a progress bar; return the SHA-256 of what was read."""
    digest = hashlib.sha256()
    received = 0
    stream, length = _open(url, timeout)
    with stream, tqdm(total=length, unit="B", unit_scale=True, desc=label) as progress:
        while chunk := stream.read(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            progress.update(len(chunk))
    if length is not None and received != length:
        raise ConnectionError(f"connection closed after {received} of {length} bytes")
    return digest.hexdigest()


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    if isinstance(error, URLError) and isinstance(error.reason, Exception):
        error = error.reason
    return isinstance(error, TRANSIENT_ERRORS)


def _describe(error: Exception) -> str:
    if isinstance(error, HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, URLError) and isinstance(error.reason, Exception):
        error = error.reason
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, TimeoutError):
        return "timed out (no data within timeout_seconds)"
    return str(error) or type(error).__name__


def _fetch_from(url: str, target: Path, sha256: str, settings: DownloadSettings) -> None:
    """Download `url` to `target`, retrying transient errors with exponential backoff."""
    for attempt in range(1, settings.retries + 1):
        try:
            with atomic_write(target) as out:
                got = _copy(url, out, settings.timeout_seconds, target.name)
                if got != sha256:
                    raise ChecksumMismatchError(
                        f"wrong SHA-256 {got[:12]}..., expected {sha256[:12]}..."
                    )
            return
        except (OSError, http.client.HTTPException) as error:
            if attempt == settings.retries or not _is_transient(error):
                raise
            delay = settings.backoff_seconds * 2 ** (attempt - 1)
            logger.warning("%s: %s; retry %d in %.1f s", url, _describe(error), attempt, delay)
            time.sleep(delay)


def fetch_file(
    name: str, sha256: str, sources: Sequence[str], raw_dir: Path, settings: DownloadSettings
) -> Path:
    """Make `raw_dir/name` a verified copy, trying each source in turn; raise DownloadError
    naming every source tried and what was wrong if none delivers."""
    target = raw_dir / name
    if target.is_file():
        if file_sha256(target) == sha256:
            logger.info("%s already verified", name)
            return target
        logger.warning("%s: checksum mismatch on disk (changed or corrupted); fetching again", name)
    problems = []
    for base in sources:
        url = base + name
        try:
            _fetch_from(url, target, sha256, settings)
        except (OSError, ValueError, http.client.HTTPException) as error:
            problems.append(f"{url}: {_describe(error)}")
            logger.warning("%s", problems[-1])
            continue
        logger.info("%s verified, from %s", name, url)
        return target
    tried = "; ".join(problems) or "no sources configured"
    raise DownloadError(f"could not fetch {name} from any source: {tried}")


def download_all(
    raw_dir: Path,
    sources: Sequence[str],
    settings: DownloadSettings,
    checksums: Mapping[str, str] | None = None,
) -> None:
    """Fetch every file in `checksums` (default: MNIST_SHA256) into `raw_dir`."""
    for name, sha256 in (MNIST_SHA256 if checksums is None else checksums).items():
        fetch_file(name, sha256, sources, raw_dir, settings)


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file strictly: known magic, and exactly the bytes its header
    promises. Images come back as uint8 (count, rows, cols), labels as uint8 (count,)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # not gzip, or a truncated gzip stream
        raise IdxFormatError(f"{path.name}: not a complete gzip file ({error})") from error
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise IdxFormatError(
            f"{path.name}: magic {magic}, expected {IMAGES_MAGIC} or {LABELS_MAGIC}"
        )
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path.name}: header truncated ({len(data)} bytes)")
    shape = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing data"
        raise IdxFormatError(
            f"{path.name}: {problem}: {len(data)} bytes, header {shape} promises {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_split(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) and labels (n,) of the `train` or `t10k` files, checked together."""
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(f"{prefix} images: shape {images.shape}, expected (n, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images) or labels.max(initial=0) > 9:
        raise IdxFormatError(f"{prefix} labels: {labels.shape}, need {len(images)} digits 0-9")
    return images, labels


def split_indices(count: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices (each sorted) from a seeded permutation of range(count)."""
    if not 0 < validation_size < count:
        raise ValueError(f"validation_size must be between 1 and {count - 1}: {validation_size}")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez, written atomically. Its output is byte-identical for equal arrays: zipfile
    stamps entries opened by name with a fixed 1980 date, not the current time (checked
    with numpy 2.4 on Python 3.11, and held in place by a test)."""
    with atomic_write(path) as out:
        np.savez(out, allow_pickle=False, **arrays)


def load_prepared(path: Path) -> dict[str, np.ndarray]:
    """The prepared arrays: x_train, y_train, x_val, y_val, x_test, y_test (all uint8)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def prepare(raw_dir: Path, out: Path, validation_size: int, split_seed: int) -> None:
    """Parse the raw files, hold out the validation split and write one .npz to `out`."""
    x_full, y_full = read_split(raw_dir, "train")
    x_test, y_test = read_split(raw_dir, "t10k")
    train, val = split_indices(len(x_full), validation_size, split_seed)
    arrays = {
        "x_train": x_full[train],
        "y_train": y_full[train],
        "x_val": x_full[val],
        "y_val": y_full[val],
        "x_test": x_test,
        "y_test": y_test,
    }
    write_npz(out, arrays)
    shapes = ", ".join(f"{key} {array.shape}" for key, array in arrays.items())
    logger.info("wrote %s (md5 %s): %s", out, file_md5(out), shapes)


@dataclass(frozen=True)
class Drawing:
    """One Omniglot drawing: its character, which of the 20 drawers made it, its PNG bytes."""

    character: str  # "Alphabet/characterNN", the zip's folder names
    drawer: int
    png: bytes

    @property
    def alphabet(self) -> str:
        return self.character.split("/")[0]


def read_drawings(zips: Sequence[Path]) -> list[Drawing]:
    """Every distinct drawing in the zips, sorted by character then drawer. A PNG found twice
    (the Latin and Greek alphabets are in both subsets) counts once, by SHA-256 of its bytes."""
    seen: set[str] = set()
    drawings: dict[tuple[str, int], Drawing] = {}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if not name.endswith(".png"):
                    continue
                png = archive.read(name)
                digest = hashlib.sha256(png).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                drawing = _parse_entry(f"{path.name}:{name}", PurePosixPath(name), png)
                key = (drawing.character, drawing.drawer)
                if key in drawings:
                    raise OmniglotFormatError(f"{path.name}:{name}: a second drawing of {key}")
                drawings[key] = drawing
    return [drawings[key] for key in sorted(drawings)]


def _parse_entry(label: str, name: PurePosixPath, png: bytes) -> Drawing:
    """`subset/alphabet/characterNN/ID_drawer.png` to a Drawing."""
    _, _, drawer = name.stem.partition("_")
    if len(name.parts) != 4 or not drawer.isdigit():
        raise OmniglotFormatError(f"{label}: expected subset/alphabet/characterNN/ID_drawer.png")
    return Drawing(character=f"{name.parts[1]}/{name.parts[2]}", drawer=int(drawer), png=png)


def without_characters(drawings: Sequence[Drawing], exclude: Sequence[str]) -> list[Drawing]:
    """The drawings minus every drawing of an excluded character. A name that matches no
    character is refused: a typo would silently keep a digit-like character in the data."""
    unknown = sorted(set(exclude) - {drawing.character for drawing in drawings})
    if unknown:
        raise ValueError(f"download.omniglot.exclude: no such characters: {', '.join(unknown)}")
    excluded = set(exclude)
    return [drawing for drawing in drawings if drawing.character not in excluded]


def split_of(alphabets: Sequence[str], settings: OmniglotSettings) -> list[str]:
    """The split of each alphabet: whole alphabets go to validation or test, the rest to train.
    Every alphabet named in the settings must be present."""
    unknown = sorted(set(settings.validation_alphabets + settings.test_alphabets) - set(alphabets))
    if unknown:
        raise ValueError(f"download.omniglot: no drawings of alphabets {', '.join(unknown)}")
    return [
        "validation"
        if alphabet in settings.validation_alphabets
        else "test"
        if alphabet in settings.test_alphabets
        else "train"
        for alphabet in alphabets
    ]


def ink_mask(png: bytes) -> np.ndarray:
    """Decode one drawing (black strokes on white) to a boolean mask, True on the ink."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("L")) < 128


@functools.cache
def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 256 neighbourhood codes, whether Zhang-Suen's first and second
    sub-iteration delete the pixel: 2-6 ink neighbours, exactly one background-to-ink
    transition around it, and not the last pixel holding a stroke together."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8): P2..P9
    p2, _, p4, _, p6, _, p8, _ = bits.T
    neighbours = bits.sum(axis=1)
    transitions = ((bits == 0) & (np.roll(bits, -1, axis=1) == 1)).sum(axis=1)
    removable = (neighbours >= 2) & (neighbours <= 6) & (transitions == 1)
    first = removable & (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
    second = removable & (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
    return first, second


def skeleton(masks: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a stack of boolean masks (N, H, W) to lines one pixel wide.
    Only ink pixels can change, so each step looks at those alone (a few percent of all)."""
    tables = _thinning_tables()
    padded = np.pad(np.asarray(masks, dtype=bool), ((0, 0), (1, 1), (1, 1)))
    flat = padded.reshape(-1)  # a view: the one-pixel frame keeps neighbours inside an image
    offsets = [row * padded.shape[2] + col for row, col in NEIGHBOURS]
    ink = np.flatnonzero(flat)
    changed = True
    while changed:
        changed = False
        for table in tables:  # each sub-iteration decides from the state before it
            code = np.zeros(ink.size, dtype=np.uint8)
            for bit, offset in enumerate(offsets):
                code |= flat[ink + offset].view(np.uint8) << bit
            delete = table[code]
            flat[ink[delete]] = False
            ink = ink[~delete]
            changed = changed or bool(delete.any())
    return padded[:, 1:-1, 1:-1]


def stroke_width(images: np.ndarray) -> np.ndarray:
    """Mean stroke width in pixels of each uint8 image (N, 28, 28): ink mass divided by the
    length of the centre line (the skeleton of the pixels at least half dark).

    Measured with it, quartiles in pixels: MNIST's 60,000 training digits 2.24, 2.64, 3.26;
    the Omniglot drawings as drawn, through the contract, 1.26, 1.39, 1.60 (a model would
    learn "thin means not a digit"); redrawn by `pen_ink` with widths uniform in [1.7, 3.3]
    (params.yaml), 2.21, 2.66, 3.27.
    """
    images = np.asarray(images)
    length = skeleton(images >= 128).sum(axis=(1, 2))
    return images.sum(axis=(1, 2), dtype=np.float64) / 255.0 / np.maximum(length, 1)


def pen_ink(centre: np.ndarray, width: float) -> np.ndarray:
    """Redraw a one-pixel centre line with a round pen so that, once the contract has fitted
    the drawing into its 20-pixel box, the stroke is `width` pixels wide.

    A pen W pixels wide widens the ink's bounding box by about W, and the contract scales the
    longer side (S + W) to 20 pixels, so the stroke ends up 20 W / (S + W) wide: solve for W.
    Pixels whose centre lies within W/2 of the line are full ink, and a one-pixel ramp
    anti-aliases the edge. Returns a float32 ink map of the line's bounding box plus a margin
    the pen cannot reach past (the contract crops to the ink anyway; this spares it work).
    """
    rows = np.flatnonzero(centre.any(axis=1))
    cols = np.flatnonzero(centre.any(axis=0))
    if rows.size == 0:
        raise OmniglotFormatError("the drawing holds no ink")
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    pen = width * side / (DIGIT_BOX - width)
    margin = int(np.ceil(pen / 2)) + 1
    window = np.pad(centre[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], margin)
    distance = ndimage.distance_transform_edt(~window)
    return np.clip(pen / 2 + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def drawings_to_inputs(drawings: Sequence[Drawing], widths: Sequence[float]) -> np.ndarray:
    """Redraw each drawing with its stroke width and pass it through the preprocessing contract,
    the service's own: uint8 (N, 28, 28), scaled by 255 and rounded like MNIST's bytes."""
    centres = skeleton(np.stack([ink_mask(drawing.png) for drawing in drawings]))
    names = [f"{drawing.character} drawer {drawing.drawer}" for drawing in drawings]
    return centres_to_inputs(centres, widths, names)


def centres_to_inputs(
    centres: Sequence[np.ndarray], widths: Sequence[float], names: Sequence[str]
) -> np.ndarray:
    """Redraw one-pixel centre lines with round pens of the given widths and pass them through
    the preprocessing contract; `names` say which drawing failed."""
    images = np.empty((len(centres), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    for index, (centre, width, name) in enumerate(zip(centres, widths, names, strict=True)):
        try:
            model_input = ink_to_input(pen_ink(centre, float(width)))  # (28, 28) in [0, 1]
        except (ImageError, OmniglotFormatError) as error:
            raise OmniglotFormatError(f"{name}: {error}") from error
        images[index] = np.round(model_input * 255).astype(np.uint8)
    return images


def prepare_not_digits(
    raw_dir: Path, out: Path, settings: OmniglotSettings, letters: LetterSettings | None = None
) -> dict[str, int]:
    """Read the Omniglot zips, drop the digit-like characters, redraw, preprocess, split by
    alphabet, add the drawn letters and symbols (training only) and write one .npz to `out`.
    Returns the number of drawings per split."""
    drawings = read_drawings([raw_dir / name for name in OMNIGLOT_SHA256])
    kept = without_characters(drawings, settings.exclude)
    logger.info(
        "omniglot: %d distinct drawings of %d characters; %d characters excluded as digit-like",
        len(drawings),
        len({drawing.character for drawing in drawings}),
        len(settings.exclude),
    )
    rng = np.random.default_rng(settings.stroke_seed)
    widths = rng.uniform(*settings.stroke_width, size=len(kept))  # one pen per drawing
    alphabets = [drawing.alphabet for drawing in kept]
    arrays = {
        "images": drawings_to_inputs(kept, widths),
        "alphabet": np.array(alphabets, dtype=str),
        "character": np.array([drawing.character for drawing in kept], dtype=str),
        "drawer": np.array([drawing.drawer for drawing in kept], dtype=np.int32),
        "split": np.array(split_of(alphabets, settings), dtype=str),
    }
    if letters is not None and letters.drawings > 0:
        widths = rng.uniform(*settings.stroke_width, size=letters.drawings)
        arrays = _with_letters(arrays, letters, widths)
    write_npz(out, arrays)
    counts = Counter(arrays["split"].tolist())
    measured = np.percentile(stroke_width(arrays["images"]), [25, 50, 75])
    logger.info(
        "wrote %s (md5 %s): %s; stroke width quartiles %.2f, %.2f, %.2f px",
        out,
        file_md5(out),
        ", ".join(f"{split} {counts[split]}" for split in SPLITS),
        *measured,
    )
    return {split: counts[split] for split in SPLITS}


def _with_letters(
    arrays: dict[str, np.ndarray], settings: LetterSettings, widths: np.ndarray
) -> dict[str, np.ndarray]:
    """The Omniglot arrays followed by the drawn letters and symbols, all in the train split:
    held-out alphabets alone choose and test the refusal threshold."""
    drawn = draw_letters(settings)
    names = [f"{letter.font} {letter.character!r}" for letter in drawn]
    logger.info(
        "letters: %d drawings of %d characters in %d fonts",
        len(drawn),
        len(settings.characters),
        len(settings.fonts),
    )
    extra = {
        "images": centres_to_inputs([letter.centre for letter in drawn], widths, names),
        "alphabet": np.full(len(drawn), LETTERS_ALPHABET),
        "character": np.array([f"{LETTERS_ALPHABET}/{name}" for name in names], dtype=str),
        "drawer": np.arange(len(drawn), dtype=np.int32),
        "split": np.full(len(drawn), "train"),
    }
    return {key: np.concatenate([arrays[key], extra[key]]) for key in arrays}


@contextlib.contextmanager
def _naming_the_mirror_variable(variable: str) -> Iterator[None]:
    """Add to a DownloadError how to point the stage at a copy of the files instead."""
    try:
        yield
    except DownloadError as error:
        raise DownloadError(
            f"{error}. Without access to these sources, set {variable} to a directory (or a "
            "file:// or http(s):// URL) holding a copy of the files"
        ) from error


def main(argv: Sequence[str] | None = None) -> None:
    """Run the stage. A download, data or settings error ends it with one logged line, exit 1."""
    parser = argparse.ArgumentParser(description="Download and prepare MNIST and Omniglot.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared/mnist.npz"))
    parser.add_argument("--not-digits-out", type=Path, default=Path("data/prepared/not_digits.npz"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = DownloadSettings.from_params(args.params)
        omniglot = OmniglotSettings.from_params(args.params)
        letters = LetterSettings.from_params(args.params)
        sources = resolve_sources(settings.mirrors, os.environ.get("MNIST_MIRROR"))
        with _naming_the_mirror_variable("MNIST_MIRROR"):
            download_all(args.raw_dir, sources, settings)
        prepare(args.raw_dir, args.out, settings.validation_size, settings.split_seed)
        sources = omniglot_sources(omniglot.mirrors, os.environ)
        with _naming_the_mirror_variable("OMNIGLOT_MIRROR"):
            download_all(args.raw_dir, sources, settings, OMNIGLOT_SHA256)
        prepare_not_digits(args.raw_dir, args.not_digits_out, omniglot, letters)
    except (DownloadError, ValueError) as error:
        logger.error("download stage failed: %s", error)
        raise SystemExit(1) from error


if __name__ == "__main__":
    main()
