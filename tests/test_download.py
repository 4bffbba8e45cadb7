"""Tests for the `download` stage against real mirrors: an HTTP server on 127.0.0.1 started
by each test, local directories and file:// URLs. Most tests serve small synthetic IDX files
(patched into the checksum table) to stay fast; one test downloads and prepares the real
MNIST files from the shared local copy."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipelines import download
from pipelines.download import DownloadError, DownloadSettings, IdxFormatError
from tests.helpers import REPO as REPO_ROOT
from tests.helpers import SHARED_MNIST

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
        env=os.environ | {"MNIST_MIRROR": str(empty)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert download.MNIST_FILES[0] in errors[0]
    assert f"{empty.as_uri()}/{download.MNIST_FILES[0]}: not found" in errors[0]
    assert not (tmp_path / "mnist.npz").exists()
    assert listing(tmp_path / "raw") == []  # the temporary file was removed


@pytest.mark.parametrize("form", ["relative directory", "file URL"])
def test_mnist_mirror_env_overrides_params_mirrors(tmp_path, mirror_dir, serve, monkeypatch, form):
    unused = serve(mirror_dir)
    params = write_params(tmp_path / "params.yaml", [unused.url])
    monkeypatch.chdir(tmp_path)
    mirror = "mirror" if form == "relative directory" else mirror_dir.as_uri()
    monkeypatch.setenv("MNIST_MIRROR", mirror)
    download.main(["--params", str(params), "--raw-dir", "raw", "--out", "prepared/mnist.npz"])
    assert_verified(tmp_path / "raw", mirror_dir)
    assert unused.requests == []
    prepared = download.load_prepared(tmp_path / "prepared" / "mnist.npz")
    assert prepared["x_train"].shape == (TRAIN_COUNT - VALIDATION_SIZE, 28, 28)


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
