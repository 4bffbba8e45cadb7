"""What the benchmarks share: a real `bentoml serve` on a free port, canvas drawings of MNIST
test digits, and the memory and CPU time of the server's process tree read from /proc.

Imported by `serve.py` and `load.py`, which run as scripts (`python benchmarks/<name>.py`), so
this directory is first on their import path.
"""

from __future__ import annotations

import http.client
import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.drawing import glyphs_in_slots

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO_ROOT.parent / "shared" / "mnist"
BENTOML = REPO_ROOT / ".venv" / "bin" / "bentoml"
SERVICE = "service.service:Digits"
CANVAS_SIDE = 280  # the drawing page's canvas, in pixels
NUMBER_CANVAS = (840, 280)  # width, height: a canvas for a four-digit number


# ---- Drawings ---------------------------------------------------------------------------------


def render_canvas(digit: np.ndarray) -> bytes:
    """A 28x28 MNIST digit drawn like the page's canvas: a 280x280 RGBA PNG, dark strokes on a
    transparent background, scaled up smoothly."""
    ink = Image.fromarray(np.asarray(digit, dtype=np.uint8), mode="L").resize(
        (CANVAS_SIDE, CANVAS_SIDE), Image.Resampling.BILINEAR
    )
    canvas = Image.new("RGBA", ink.size, (20, 20, 20, 0))
    canvas.putalpha(ink)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def render_number(glyphs: list[np.ndarray], size: tuple[int, int] = NUMBER_CANVAS) -> bytes:
    """28x28 MNIST digits written left to right on one line, each in an equal slot at 3/4 of
    the height (as tests/conftest.py's render_line), sent the way the page sends its pad: an
    RGBA PNG of black ink on opaque white (web/pad.js, exportImage)."""
    ink = glyphs_in_slots(list(glyphs), size)
    paper = Image.fromarray(255 - ink)
    canvas = Image.merge("RGBA", [paper, paper, paper, Image.new("L", size, 255)])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def mnist_test_digits(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test images (n, 28, 28) uint8 and labels (n,); a drawn 7 if the files are
    missing."""
    if (mnist_dir / "t10k-images-idx3-ubyte.gz").exists():
        from pipelines.download import read_split

        return read_split(mnist_dir, "t10k")
    ink = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(ink).line([(7, 6), (21, 6), (12, 23)], fill=255, width=2)
    return np.asarray(ink)[np.newaxis], np.array([7])


# ---- The server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    bentoml: Path,
    service: str,
    port: int,
    log_file: Path,
    cwd: Path = REPO_ROOT,
    environ: Mapping[str, str] = os.environ,
) -> subprocess.Popen:
    """`bentoml serve` of the project in `cwd` on 127.0.0.1:port, with the BentoML store of
    BENTOML_HOME (~/bentoml) in `environ`."""
    env = {**environ, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_file, "wb") as output:
        return subprocess.Popen(
            [str(bentoml), "serve", service, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stopping it stops its workers
        )


def wait_ready(process: subprocess.Popen, port: int, timeout: float) -> float:
    """Seconds from now until /readyz answers 200."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with code {process.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return time.perf_counter() - began
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.05)
    raise TimeoutError(f"not ready within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL if it has not exited within 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


# ---- The server's resources, from /proc -------------------------------------------------------


def process_tree(root_pid: int) -> list[Path]:
    """/proc entries of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        found.append(Path(f"/proc/{pid}"))
        pending.extend(children.get(pid, []))
    return found


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (VmRSS summed), in MB."""
    total_kb = 0
    for entry in process_tree(root_pid):
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        total_kb += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")),
            0,
        )
    return total_kb / 1024


def tree_cpu_seconds(root_pid: int) -> float:
    """User + system CPU time used so far by a process and its descendants."""
    ticks = 0
    for entry in process_tree(root_pid):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
