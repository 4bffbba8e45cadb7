"""Tests for the `download` stage against real mirrors: an HTTP server on 127.0.0.1 started
by each test, local directories and file:// URLs. Most tests serve small synthetic IDX files
and Omniglot-shaped zips (patched into the checksum tables) to stay fast; a few read the real
MNIST files and Omniglot zips from the shared local copies."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import logging
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines import download
from pipelines.download import DownloadError, DownloadSettings, IdxFormatError, OmniglotSettings
from pipelines.preprocessing import ink_to_input
from tests.helpers import REPO as REPO_ROOT
from tests.helpers import SHARED_MNIST, SHARED_OMNIGLOT

TRAIN_COUNT, TEST_COUNT, VALIDATION_SIZE = 30, 8, 6


def settings(**overrides: object) -> DownloadSettings:
    values = dict(
        mirrors=(),
        timeout_seconds=0.3,
        retries=2,
        backoff_seconds=0.01,
        validation_size=VALIDATION_SIZE,
        split_seed=7,
    )
    return DownloadSettings(**(values | overrides))


def idx_bytes(array: np.ndarray) -> bytes:
    magic = download.IMAGES_MAGIC if array.ndim == 3 else download.LABELS_MAGIC
    header = b"".join(n.to_bytes(4, "big") for n in (magic, *array.shape))
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    # mtime=0 keeps the gzip bytes, and so the checksums, stable.
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def mirror_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of four small, valid MNIST-named IDX files, whose checksums replace
    MNIST_SHA256 for the duration of the test."""
    root = tmp_path / "mirror"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", TRAIN_COUNT), ("t10k", TEST_COUNT)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_gz(root / f"{prefix}-images-idx3-ubyte.gz", idx_bytes(images))
        write_gz(root / f"{prefix}-labels-idx1-ubyte.gz", idx_bytes(labels))
    table = {name: download.file_sha256(root / name) for name in download.MNIST_FILES}
    monkeypatch.setattr(download, "MNIST_SHA256", table)
    return root


class MirrorServer:
    """A real HTTP mirror on a free port that serves files from `root`, misbehaving on
    request: "serve", "corrupt" (one byte flipped), "error" (HTTP 503 for the first
    `failures` requests), or "stall" (before the headers or halfway through the body)."""

    def __init__(self, root: Path, behaviour: str = "serve", failures: int = 0) -> None:
        self.root, self.behaviour, self.failures = root, behaviour, failures
        self.requests: list[str] = []
        self.release = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server looks up)
                mirror.requests.append(self.path)
                path = mirror.root / self.path.removeprefix("/files/")
                if mirror.behaviour == "stall_before_headers":
                    mirror.release.wait(10)
                    return
                if mirror.behaviour == "error" and len(mirror.requests) <= mirror.failures:
                    self.send_error(503)
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                if mirror.behaviour == "corrupt":
                    body = body[:-1] + bytes([body[-1] ^ 0xFF])
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.behaviour == "stall_mid_body":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    mirror.release.wait(10)
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        return Handler

    def __enter__(self) -> MirrorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[..., MirrorServer]]:
    """Start MirrorServers for a test; all are shut down when it ends."""
    servers: list[MirrorServer] = []

    def start(root: Path, behaviour: str = "serve", failures: int = 0) -> MirrorServer:
        servers.append(MirrorServer(root, behaviour, failures).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__()


def assert_verified(raw_dir: Path, mirror_dir: Path) -> None:
    for name in download.MNIST_FILES:
        assert (raw_dir / name).read_bytes() == (mirror_dir / name).read_bytes()
    assert listing(raw_dir) == sorted(download.MNIST_FILES)  # no temporary files left


def test_downloads_and_verifies_all_files_over_http(tmp_path, mirror_dir, serve):
    server = serve(mirror_dir)
    download.download_all(tmp_path / "raw", [server.url], settings())
    assert_verified(tmp_path / "raw", mirror_dir)
    assert len(server.requests) == 4


def test_falls_back_to_next_mirror_on_404_without_retrying(tmp_path, mirror_dir, serve):
    empty = serve(tmp_path)  # serves tmp_path, which holds no MNIST files
    good = serve(mirror_dir)
    download.download_all(tmp_path / "raw", [empty.url, good.url], settings(retries=3))
    assert_verified(tmp_path / "raw", mirror_dir)
    assert len(empty.requests) == 4  # one request per file: a 404 is not retried


def test_rejects_corrupted_body_and_uses_next_mirror(tmp_path, mirror_dir, serve):
    corrupt = serve(mirror_dir, "corrupt")
    good = serve(mirror_dir)
    download.download_all(tmp_path / "raw", [corrupt.url, good.url], settings())
    assert_verified(tmp_path / "raw", mirror_dir)
    assert len(corrupt.requests) == 4 and len(good.requests) == 4


def test_retries_server_errors_with_backoff_then_succeeds(tmp_path, mirror_dir, serve, caplog):
    flaky = serve(mirror_dir, "error", failures=1)
    name = download.MNIST_FILES[0]
    sha256 = download.MNIST_SHA256[name]
    download.fetch_file(name, sha256, [flaky.url], tmp_path / "raw", settings(retries=2))
    assert (tmp_path / "raw" / name).read_bytes() == (mirror_dir / name).read_bytes()
    assert len(flaky.requests) == 2
    assert "HTTP 503" in caplog.text and "retry 1" in caplog.text


@pytest.mark.parametrize("behaviour", ["stall_before_headers", "stall_mid_body"])
def test_stalled_mirror_times_out_then_falls_back_to_next(tmp_path, mirror_dir, serve, behaviour):
    stalled = serve(mirror_dir, behaviour)
    good = serve(mirror_dir)
    name = download.MNIST_FILES[0]
    started = time.monotonic()
    download.fetch_file(
        name, download.MNIST_SHA256[name], [stalled.url, good.url], tmp_path / "raw", settings()
    )
    assert time.monotonic() - started < 5
    assert len(stalled.requests) == 2  # both attempts timed out
    assert listing(tmp_path / "raw") == [name]


def test_all_mirrors_failing_raises_one_clear_error_and_keeps_verified_files(
    tmp_path, mirror_dir, serve
):
    raw = tmp_path / "raw"
    first, second = download.MNIST_FILES[:2]
    raw.mkdir()
    (raw / first).write_bytes((mirror_dir / first).read_bytes())  # verified by an earlier run
    missing = serve(tmp_path)
    corrupt = serve(mirror_dir, "corrupt")
    with pytest.raises(DownloadError) as raised:
        download.download_all(raw, [missing.url, corrupt.url], settings())
    message = str(raised.value)
    assert "\n" not in message
    assert f"could not fetch {second}" in message
    assert f"{missing.url}{second}: HTTP 404" in message
    assert f"{corrupt.url}{second}: wrong SHA-256" in message
    assert listing(raw) == [first]  # the verified file stays; no partial or temp files


def write_params(path: Path, mirrors: list[str]) -> Path:
    path.write_text(
        "download:\n"
        f"  mirrors: {mirrors}\n"
        "  timeout_seconds: 0.3\n  retries: 1\n  backoff_seconds: 0.0\n"
        f"  validation_size: {VALIDATION_SIZE}\n  split_seed: 7\n"
        "  omniglot:\n"
        "    mirrors: [https://unused.invalid/]\n"
        "    validation_alphabets: [Beta]\n    test_alphabets: [Gamma]\n"
        "    exclude: [Alpha/character02]\n    stroke_width: [1.7, 3.3]\n    stroke_seed: 5\n"
        "  letters:\n    fonts: [futural]\n    characters: ER\n    drawings: 4\n"
        "    rotation_degrees: 12\n    slant: 0.3\n    stretch: 0.25\n    wobble: 0.04\n"
        "    seed: 17\n"
    )
    return path


def test_stage_exits_nonzero_with_one_error_line_when_no_source_has_the_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    params = write_params(tmp_path / "params.yaml", ["https://unused.invalid/"])
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.download", "--params", str(params)]
        + ["--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "mnist.npz")],
        cwd=REPO_ROOT,
        env=os.environ | {"MNIST_MIRROR": str(empty), "OMNIGLOT_MIRROR": str(empty)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert download.MNIST_FILES[0] in errors[0]
    assert "set MNIST_MIRROR to a directory" in errors[0]  # says how to get past a firewall
    assert f"{empty.as_uri()}/{download.MNIST_FILES[0]}: not found" in errors[0]
    assert not (tmp_path / "mnist.npz").exists()
    assert listing(tmp_path / "raw") == []  # the temporary file was removed


@pytest.mark.parametrize("form", ["relative directory", "file URL"])
def test_mnist_mirror_env_overrides_params_mirrors(
    tmp_path, mirror_dir, omniglot_dir, serve, monkeypatch, form
):
    unused = serve(mirror_dir)
    params = write_params(tmp_path / "params.yaml", [unused.url])
    monkeypatch.chdir(tmp_path)
    mirror = "mirror" if form == "relative directory" else mirror_dir.as_uri()
    omniglot = "omniglot" if form == "relative directory" else omniglot_dir.as_uri()
    monkeypatch.setenv("MNIST_MIRROR", mirror)
    monkeypatch.setenv("OMNIGLOT_MIRROR", omniglot)
    download.main(["--params", str(params), "--raw-dir", "raw", "--out", "prepared/mnist.npz"])
    for name in download.MNIST_FILES:
        assert (tmp_path / "raw" / name).read_bytes() == (mirror_dir / name).read_bytes()
    assert unused.requests == []
    prepared = download.load_prepared(tmp_path / "prepared" / "mnist.npz")
    assert prepared["x_train"].shape == (TRAIN_COUNT - VALIDATION_SIZE, 28, 28)
    not_digits = download.load_prepared(Path("data/prepared/not_digits.npz"))  # the default
    omniglot = not_digits["alphabet"] != download.LETTERS_ALPHABET
    assert omniglot.sum() == TINY_KEPT
    assert set(not_digits["split"][~omniglot]) == {"train"} and (~omniglot).sum() == 4


def test_a_local_mnist_mirror_alone_also_serves_the_omniglot_folder_beside_it(
    tmp_path, mirror_dir, omniglot_dir, monkeypatch
):
    """A copy of both datasets side by side (like ../shared) needs only MNIST_MIRROR: the
    newcomer's command works without knowing of the second variable."""
    params = write_params(tmp_path / "params.yaml", ["https://unused.invalid/"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", "mirror")
    monkeypatch.delenv("OMNIGLOT_MIRROR", raising=False)
    download.main(["--params", str(params), "--raw-dir", "raw", "--out", "prepared/mnist.npz"])
    for name in download.OMNIGLOT_SHA256:
        assert (tmp_path / "raw" / name).read_bytes() == (omniglot_dir / name).read_bytes()


def test_omniglot_sources_put_the_folder_beside_a_local_mnist_mirror_before_the_public_ones(
    tmp_path,
):
    public = ["https://example.invalid/omniglot/"]
    (tmp_path / "mnist").mkdir()
    assert download.omniglot_sources(public, {"MNIST_MIRROR": str(tmp_path / "mnist")}) == public
    (tmp_path / "omniglot").mkdir()
    beside = (tmp_path / "omniglot").as_uri() + "/"
    for mirror in (str(tmp_path / "mnist"), (tmp_path / "mnist").as_uri()):
        assert download.omniglot_sources(public, {"MNIST_MIRROR": mirror}) == [beside, *public]
    remote = {"MNIST_MIRROR": "https://example.invalid/mnist/"}
    assert download.omniglot_sources(public, remote) == public
    chosen = {"MNIST_MIRROR": str(tmp_path / "mnist"), "OMNIGLOT_MIRROR": str(tmp_path / "x")}
    assert download.omniglot_sources(public, chosen) == [(tmp_path / "x").as_uri() + "/"]


def test_missing_omniglot_zips_end_the_stage_naming_omniglot_mirror(
    tmp_path, mirror_dir, monkeypatch, caplog
):
    params = write_params(tmp_path / "params.yaml", ["https://unused.invalid/"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", "mirror")  # no omniglot folder beside it
    monkeypatch.delenv("OMNIGLOT_MIRROR", raising=False)
    with pytest.raises(SystemExit), caplog.at_level(logging.ERROR):
        download.main(["--params", str(params), "--raw-dir", "raw", "--out", "prepared/mnist.npz"])
    assert "images_background_small1.zip" in caplog.text
    assert "set OMNIGLOT_MIRROR to a directory" in caplog.text


def test_rerun_skips_verified_files_without_any_request(tmp_path, mirror_dir, serve, caplog):
    server = serve(mirror_dir)
    download.download_all(tmp_path / "raw", [server.url], settings())
    assert len(server.requests) == 4
    with caplog.at_level(logging.INFO):
        download.download_all(tmp_path / "raw", [server.url], settings())
    assert len(server.requests) == 4
    assert caplog.text.count("already verified") == 4


def test_replaces_a_present_file_whose_checksum_is_wrong(tmp_path, mirror_dir, serve):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / download.MNIST_FILES[0]).write_bytes(b"not mnist")
    download.download_all(raw, [serve(mirror_dir).url], settings())
    assert_verified(raw, mirror_dir)


def test_read_idx_parses_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    parsed = download.read_idx(write_gz(tmp_path / "images.gz", idx_bytes(images)))
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(download.read_idx(write_gz(tmp_path / "l.gz", idx_bytes(labels))), labels)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: data[:-1], "truncated"),
        (lambda data: data + b"\0", "trailing data"),
        (lambda data: (2050).to_bytes(4, "big") + data[4:], "magic 2050"),
        (lambda data: data[:10], "header truncated"),
    ],
    ids=["truncated", "trailing", "wrong-magic", "short-header"],
)
def test_read_idx_rejects_malformed_file_naming_it(tmp_path, damage, expected):
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    path = write_gz(tmp_path / "broken-images.gz", damage(data))
    with pytest.raises(IdxFormatError, match=f"broken-images.gz: .*{expected}"):
        download.read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8)))[:-12])
    with pytest.raises(IdxFormatError, match="cut.gz"):
        download.read_idx(path)


def test_split_indices_are_disjoint_cover_everything_and_depend_only_on_seed():
    train, val = download.split_indices(100, 20, seed=3)
    assert len(val) == 20 and set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(100))
    again_train, again_val = download.split_indices(100, 20, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, download.split_indices(100, 20, seed=4)[1])
    with pytest.raises(ValueError, match="validation_size"):
        download.split_indices(100, 100, seed=3)


def test_real_mnist_files_verify_and_prepare_byte_identically(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    sources = download.resolve_sources([], str(SHARED_MNIST))
    download.download_all(raw, sources, settings())  # the production checksum table
    for name, sha256 in download.MNIST_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == sha256

    download.prepare(raw, tmp_path / "first.npz", validation_size=5000, split_seed=20251123)
    later = time.time() + 86_400  # a ZIP stamped with the time would differ
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: later)
        download.prepare(raw, tmp_path / "second.npz", validation_size=5000, split_seed=20251123)
    assert (tmp_path / "first.npz").read_bytes() == (tmp_path / "second.npz").read_bytes()
    md5 = hashlib.md5((tmp_path / "first.npz").read_bytes()).hexdigest()
    assert download.file_md5(tmp_path / "first.npz") == md5

    data = download.load_prepared(tmp_path / "first.npz")
    shapes = {key: array.shape for key, array in data.items()}
    assert shapes == {
        "x_train": (55000, 28, 28),
        "y_train": (55000,),
        "x_val": (5000, 28, 28),
        "y_val": (5000,),
        "x_test": (10000, 28, 28),
        "y_test": (10000,),
    }
    assert all(array.dtype == np.uint8 for array in data.values())
    x_full = download.read_idx(raw / "train-images-idx3-ubyte.gz")
    train, val = download.split_indices(60000, 5000, 20251123)
    assert set(train).isdisjoint(val)
    assert np.array_equal(data["x_train"], x_full[train])
    assert np.array_equal(data["x_val"], x_full[val])
    assert listing(tmp_path) == ["first.npz", "raw", "second.npz"]  # no temp files


# Omniglot: the "not a digit" drawings. A tiny pair of zips laid out like the real ones
# (subset/alphabet/characterNN/ID_drawer.png), with the alphabet "Shared" in both, byte for byte.
TINY_LAYOUT = {
    "images_background_small1.zip": {"Alpha": 2, "Shared": 2},
    "images_background_small2.zip": {"Shared": 2, "Beta": 2, "Gamma": 1},
}
TINY_DRAWERS = 3
TINY_DISTINCT = (2 + 2 + 2 + 1) * TINY_DRAWERS  # Shared counts once
TINY_KEPT = TINY_DISTINCT - TINY_DRAWERS  # Alpha/character02 is excluded


def tiny_settings(**overrides: object) -> OmniglotSettings:
    values = dict(
        mirrors=(),
        validation_alphabets=("Beta",),
        test_alphabets=("Gamma",),
        exclude=("Alpha/character02",),
        stroke_width=(1.7, 3.3),
        stroke_seed=5,
    )
    return OmniglotSettings(**(values | overrides))


def drawing_png(key: str) -> bytes:
    """A 105x105 1-bit PNG: a black polyline 3 px wide on white, its own for every key."""
    rng = np.random.default_rng(list(hashlib.sha256(key.encode()).digest()))
    image = Image.new("1", (105, 105), 1)
    points = [(int(x), int(y)) for x, y in rng.integers(15, 90, size=(4, 2))]
    ImageDraw.Draw(image).line(points, fill=0, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_zip(path: Path, alphabets: dict[str, int]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet, characters in alphabets.items():
            for character in range(1, characters + 1):
                folder = f"{path.stem}/{alphabet}/character{character:02d}"
                for drawer in range(1, TINY_DRAWERS + 1):
                    png = drawing_png(f"{alphabet}/{character}/{drawer}")
                    archive.writestr(f"{folder}/09{character:02d}_{drawer:02d}.png", png)
    return path


@pytest.fixture
def omniglot_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with the two tiny zips, whose checksums replace OMNIGLOT_SHA256."""
    root = tmp_path / "omniglot"
    root.mkdir()
    for name, alphabets in TINY_LAYOUT.items():
        write_tiny_zip(root / name, alphabets)
    table = {name: download.file_sha256(root / name) for name in TINY_LAYOUT}
    monkeypatch.setattr(download, "OMNIGLOT_SHA256", table)
    return root


@pytest.fixture(scope="module")
def real_drawings() -> list[download.Drawing]:
    return download.read_drawings([SHARED_OMNIGLOT / name for name in download.OMNIGLOT_SHA256])


def test_omniglot_zip_with_wrong_checksum_is_refused_and_not_kept(tmp_path, serve):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in download.OMNIGLOT_SHA256:
        (bad / name).write_bytes((SHARED_OMNIGLOT / name).read_bytes()[:-1])  # one byte short
    raw = tmp_path / "raw"
    sources = [download.resolve_sources([], str(bad))[0], serve(bad, "corrupt").url]
    with pytest.raises(DownloadError, match="images_background_small1.zip") as raised:
        download.download_all(raw, sources, settings(), download.OMNIGLOT_SHA256)
    assert str(raised.value).count("wrong SHA-256") == 2  # both sources named
    assert listing(raw) == []


def test_real_omniglot_zips_verify_and_hold_4840_distinct_drawings(tmp_path, real_drawings):
    raw = tmp_path / "raw"
    sources = download.resolve_sources([], SHARED_OMNIGLOT.as_uri())
    download.download_all(raw, sources, settings(), download.OMNIGLOT_SHA256)
    assert listing(raw) == sorted(download.OMNIGLOT_SHA256)
    pngs = 0
    for name in download.OMNIGLOT_SHA256:
        with zipfile.ZipFile(raw / name) as archive:
            pngs += sum(entry.endswith(".png") for entry in archive.namelist())
    assert pngs == 5840  # Latin (520) and Greek (480) are in both zips
    assert len(real_drawings) == 4840
    per_character = Counter(drawing.character for drawing in real_drawings)
    assert len(per_character) == 242 and set(per_character.values()) == {20}
    assert len({drawing.alphabet for drawing in real_drawings}) == 8


def test_duplicates_across_the_zips_count_once(omniglot_dir):
    drawings = download.read_drawings([omniglot_dir / name for name in TINY_LAYOUT])
    assert len(drawings) == TINY_DISTINCT
    assert len({hashlib.sha256(drawing.png).digest() for drawing in drawings}) == TINY_DISTINCT
    keys = [(drawing.character, drawing.drawer) for drawing in drawings]
    assert keys == sorted(keys)
    assert Counter(drawing.alphabet for drawing in drawings)["Shared"] == 2 * TINY_DRAWERS


def test_exclusions_remove_every_drawing_of_a_character_and_refuse_unknown_names(omniglot_dir):
    drawings = download.read_drawings([omniglot_dir / name for name in TINY_LAYOUT])
    kept = download.without_characters(drawings, ["Alpha/character02", "Beta/character01"])
    assert len(kept) == TINY_DISTINCT - 2 * TINY_DRAWERS
    assert {"Alpha/character02", "Beta/character01"}.isdisjoint(d.character for d in kept)
    with pytest.raises(ValueError, match="no such characters: Latin/character15"):
        download.without_characters(drawings, ["Latin/character15"])


def test_params_exclusions_and_split_alphabets_name_real_characters(real_drawings):
    omniglot = OmniglotSettings.from_params(REPO_ROOT / "params.yaml")
    kept = download.without_characters(real_drawings, omniglot.exclude)
    assert len(set(omniglot.exclude)) == len(omniglot.exclude) == 52
    assert len({drawing.character for drawing in kept}) == 242 - 52
    splits = download.split_of([drawing.alphabet for drawing in kept], omniglot)
    assert Counter(splits) == {"train": 2240, "validation": 740, "test": 820}


def test_prepared_not_digits_hold_whole_alphabets_per_split_in_mnist_format(tmp_path, omniglot_dir):
    out = tmp_path / "not_digits.npz"
    counts = download.prepare_not_digits(omniglot_dir, out, tiny_settings())
    data = download.load_prepared(out)
    count = len(data["images"])
    assert count == TINY_KEPT
    assert counts == {"train": 3 * TINY_DRAWERS, "validation": 6, "test": 3}
    assert data["images"].dtype == np.uint8 and data["images"].shape == (count, 28, 28)
    assert data["images"].max() == 255
    for key in ("alphabet", "character", "split"):
        assert data[key].dtype.kind == "U" and data[key].shape == (count,)
    assert data["drawer"].dtype.kind == "i" and set(data["drawer"]) == {1, 2, 3}
    assert "Alpha/character02" not in data["character"]
    split_of_alphabet = {}
    for alphabet, split in zip(data["alphabet"], data["split"], strict=True):
        assert split_of_alphabet.setdefault(alphabet, split) == split  # one split per alphabet
    assert split_of_alphabet == {
        "Alpha": "train",
        "Shared": "train",
        "Beta": "validation",
        "Gamma": "test",
    }


def test_not_digits_are_byte_identical_on_a_second_run(tmp_path, omniglot_dir, monkeypatch):
    download.prepare_not_digits(omniglot_dir, tmp_path / "first.npz", tiny_settings())
    later = time.time() + 86_400  # a ZIP stamped with the time would differ
    monkeypatch.setattr(time, "time", lambda: later)
    download.prepare_not_digits(omniglot_dir, tmp_path / "second.npz", tiny_settings())
    assert (tmp_path / "first.npz").read_bytes() == (tmp_path / "second.npz").read_bytes()


def test_redrawn_strokes_are_as_wide_as_mnist_and_raw_ones_are_not(real_drawings):
    """On one drawing of every character: the prepared drawings' median stroke width lies in
    the middle half of MNIST's, where the drawings as drawn fall below MNIST's lower quartile."""
    sample = [drawing for drawing in real_drawings if drawing.drawer == 1]
    omniglot = OmniglotSettings.from_params(REPO_ROOT / "params.yaml")
    widths = np.random.default_rng(0).uniform(*omniglot.stroke_width, size=len(sample))
    redrawn = download.stroke_width(download.drawings_to_inputs(sample, widths))
    as_drawn = download.stroke_width(
        np.stack(
            [
                np.round(ink_to_input(download.ink_mask(drawing.png)) * 255).astype(np.uint8)
                for drawing in sample
            ]
        )
    )
    digits = download.read_idx(SHARED_MNIST / "train-images-idx3-ubyte.gz")[:5000]
    mnist = download.stroke_width(digits)
    low, middle, high = np.percentile(mnist, [25, 50, 75])
    assert low < np.median(redrawn) < high
    assert abs(np.median(redrawn) - middle) < 0.25
    assert np.percentile(redrawn, 25) > np.percentile(mnist, 10)
    assert np.percentile(redrawn, 75) < np.percentile(mnist, 90)
    assert np.median(as_drawn) < low


def test_pen_width_is_relative_to_the_character_size():
    """The same stroke shape drawn small or large comes out equally wide in the 20 px box."""
    outputs = []
    for length in (30, 90):
        centre = np.zeros((105, 105), dtype=bool)
        centre[10 : 10 + length, 50] = True  # a vertical line, like a 1
        image = ink_to_input(download.pen_ink(centre, 3.0))
        outputs.append(download.stroke_width(np.round(image * 255).astype(np.uint8)[None])[0])
    assert outputs[0] == pytest.approx(outputs[1], abs=0.3)
    assert outputs[0] == pytest.approx(3.0, abs=0.5)


def test_skeleton_thins_a_thick_bar_to_one_pixel():
    masks = np.zeros((2, 20, 30), dtype=bool)
    masks[0, 8:13, 3:27] = True  # a bar 5 pixels thick
    centre = download.skeleton(masks)
    assert centre[1].sum() == 0
    assert centre[0].any(axis=1).sum() == 1  # one row left
    assert 15 <= centre[0].sum() <= 24


def test_omniglot_settings_refuse_an_alphabet_in_two_splits():
    with pytest.raises(ValueError, match="validation and test"):
        tiny_settings(validation_alphabets=("Beta",), test_alphabets=("Beta",))
    with pytest.raises(ValueError, match="stroke_width"):
        tiny_settings(stroke_width=(3.0, 2.0))


def test_stage_fails_with_one_line_when_omniglot_mirror_lacks_the_zips(
    tmp_path, mirror_dir, monkeypatch, caplog
):
    empty = tmp_path / "empty"
    empty.mkdir()
    params = write_params(tmp_path / "params.yaml", ["https://unused.invalid/"])
    monkeypatch.setenv("MNIST_MIRROR", str(mirror_dir))
    monkeypatch.setenv("OMNIGLOT_MIRROR", str(empty))
    out = tmp_path / "not_digits.npz"
    with pytest.raises(SystemExit) as raised:
        download.main(
            ["--params", str(params), "--raw-dir", str(tmp_path / "raw")]
            + ["--out", str(tmp_path / "mnist.npz"), "--not-digits-out", str(out)]
        )
    assert raised.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not fetch images_background_small1.zip" in errors[0]
    assert (tmp_path / "mnist.npz").exists() and not out.exists()
