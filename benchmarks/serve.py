"""Benchmark the service as deployed: a real `bentoml serve`, real HTTP, a real canvas drawing.

    .venv/bin/python benchmarks/serve.py                  # about a minute
    .venv/bin/python benchmarks/serve.py --duration 10 --requests 1000

Starts `bentoml serve service.service:Digits` on a free port of 127.0.0.1 (with the BentoML
store of BENTOML_HOME, ~/bentoml by default, which must hold a `digits-cnn` model), measures
the cold start until /readyz answers, then for POST /predict (a 280x280 canvas PNG of an MNIST
test digit, ~10 kB), POST /read (a four-digit number of MNIST test digits on an 840x280 pad,
an opaque RGBA PNG of black ink on white as the page sends it, ~38 kB) and GET /livez (the
cheapest route, for comparison): the latency of single sequential requests and the
throughput of 1, 8 and 32 concurrent clients, each on its own keep-alive connection. Also the
sequential latency of /read when the same digits touch, which the line reader reads. Ends with
the resident memory of the server's whole process tree, prints a table with the targets
(/predict p50 <= 4 ms and >= 450 req/s with 8 clients, /read p50 <= 10 ms) and stops the
server.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import http.client
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import (
    BENTOML,
    CANVAS_SIDE,
    NUMBER_CANVAS,
    SERVICE,
    SHARED_MNIST,
    free_port,
    mnist_test_digits,
    render_canvas,
    render_number,
    start_server,
    stop_server,
    tree_cpu_seconds,
    tree_rss_mb,
    wait_ready,
)

from pipelines import drawing

log = logging.getLogger("benchmark")

NUMBER = "2026"  # the number /read is sent
# Targets: sequential p50 in ms per route, and /predict's requests per second with 8 clients.
P50_TARGETS_MS = {"/predict": 4.0, "/read": 10.0}
PREDICT_THROUGHPUT_TARGET = (8, 450.0)


@dataclass(frozen=True)
class Result:
    route: str
    mode: str  # "sequential" or "<n> clients"
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_seconds: float = 0.0  # CPU time the server's processes used meanwhile

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def server_cpu_ms(self) -> float:
        """Server CPU time per request: the cost that limits throughput when cores are busy."""
        return self.server_cpu_seconds * 1000 / max(self.requests, 1)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


# ---- The request ------------------------------------------------------------------------------


def canvas_png(mnist_dir: Path) -> bytes:
    """A 280x280 RGBA PNG like the page's canvas: the first MNIST test digit (a 7)."""
    images, _ = mnist_test_digits(mnist_dir)
    return render_canvas(images[0])


def number_png(mnist_dir: Path, text: str = NUMBER) -> bytes:
    """An 840x280 pad PNG of `text` in MNIST test digits (the first drawing of each digit, the
    next one for a repeated digit)."""
    images, labels = mnist_test_digits(mnist_dir)
    glyphs, used = [], {}
    for character in text:
        matches = np.flatnonzero(labels == int(character))
        if len(matches) == 0:  # no MNIST files: the drawn 7 stands in
            matches = np.array([0])
        glyphs.append(images[matches[used.get(character, 0) % len(matches)]])
        used[character] = used.get(character, 0) + 1
    return render_number(glyphs)


def touching_number_png(mnist_dir: Path, text: str = NUMBER) -> bytes:
    """The same digits as number_png, each touching the next, drawn as evaluation draws them."""
    images, labels = mnist_test_digits(mnist_dir)
    chosen = [int(np.flatnonzero(labels == int(c))[i]) for i, c in enumerate(text)]
    number = drawing.render_number(
        images[chosen], labels[chosen], NUMBER_CANVAS, 1.0, 0.0, np.random.default_rng(0)
    )
    buffer = io.BytesIO()
    number.image.save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(png: bytes) -> bytes:
    return json.dumps({"image": "data:image/png;base64," + base64.b64encode(png).decode()}).encode()


class Route:
    """One keep-alive connection per client thread; `call()` returns the HTTP status."""

    def __init__(self, port: int, method: str, path: str, body: bytes | None = None) -> None:
        self.port, self.method, self.path, self.body = port, method, path, body
        self.headers = {"Content-Type": "application/json"} if body else {}

    def client(self) -> Callable[[], int]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

        def call() -> int:
            connection.request(self.method, self.path, body=self.body, headers=self.headers)
            response = connection.getresponse()
            response.read()
            return response.status

        return call


# ---- Measurements -----------------------------------------------------------------------------


def sequential(route: Route, requests: int, warmup: int = 20) -> Result:
    call = route.client()
    for _ in range(warmup):
        call()
    latencies, errors = [], 0
    began = time.perf_counter()
    for _ in range(requests):
        start = time.perf_counter()
        errors += call() != 200
        latencies.append((time.perf_counter() - start) * 1000)
    elapsed = time.perf_counter() - began
    return Result(route.path, "sequential", requests, errors, elapsed, latencies)


def concurrent(route: Route, clients: int, duration: float) -> Result:
    """`clients` threads send requests back to back for `duration` seconds."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_line = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(index: int) -> None:
        call = route.client()
        call()  # open the connection before the clock starts
        start_line.wait()
        while (start := time.perf_counter()) < stop_at[0]:
            try:
                errors[index] += call() != 200
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                call = route.client()
            latencies[index].append((time.perf_counter() - start) * 1000)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + duration + 0.05
    start_line.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(duration + 35)
    merged = [value for values in latencies for value in values]
    elapsed = time.perf_counter() - began
    return Result(route.path, f"{clients} clients", len(merged), sum(errors), elapsed, merged)


# ---- Main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bentoml", type=Path, default=BENTOML)
    parser.add_argument("--service", default=SERVICE)
    parser.add_argument("--mnist-dir", type=Path, default=SHARED_MNIST)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per route")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per concurrency level")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = [int(level) for level in args.clients.split(",")]

    png, number = canvas_png(args.mnist_dir), number_png(args.mnist_dir)
    port = free_port()
    log_file = Path(tempfile.mkstemp(prefix="digits-serve-", suffix=".log")[1])
    log.info("starting bentoml serve on port %d (log: %s)", port, log_file)
    began = time.perf_counter()
    process = start_server(args.bentoml, args.service, port, log_file)
    try:
        wait_ready(process, port, args.start_timeout)
        cold_start = time.perf_counter() - began
        predict = Route(port, "POST", "/predict", request_body(png))
        read = Route(port, "POST", "/read", request_body(number))
        touching = Route(port, "POST", "/read", request_body(touching_number_png(args.mnist_dir)))
        livez = Route(port, "GET", "/livez")
        reply = json.loads(_fetch(predict))
        log.info("cold start %.1f s; /predict answers digit %s", cold_start, reply.get("digit"))
        log.info("/read of %s answers %s", NUMBER, json.loads(_fetch(read)).get("text"))
        answer = json.loads(_fetch(touching)).get("text")
        log.info("/read of %s with its digits touching answers %s", NUMBER, answer)
        results = []
        for route in (predict, read, livez):
            phases = [functools.partial(sequential, route, args.requests)] + [
                functools.partial(concurrent, route, clients, args.duration) for clients in levels
            ]
            for phase in phases:
                cpu_before = tree_cpu_seconds(process.pid)
                result = phase()
                cpu = tree_cpu_seconds(process.pid) - cpu_before
                results.append(dataclasses.replace(result, server_cpu_seconds=cpu))
        cpu_before = tree_cpu_seconds(process.pid)
        joined = sequential(touching, args.requests)
        cpu = tree_cpu_seconds(process.pid) - cpu_before
        results.append(dataclasses.replace(joined, route="/read touch", server_cpu_seconds=cpu))
        rss = tree_rss_mb(process.pid)
    finally:
        stop_server(process)
    report(results, cold_start, rss, len(png), len(number))


def _fetch(route: Route) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", route.port, timeout=30)
    connection.request(route.method, route.path, body=route.body, headers=route.headers)
    return connection.getresponse().read()


def report(
    results: list[Result], cold_start: float, rss_mb: float, png_bytes: int, number_bytes: int
) -> None:
    width, height = NUMBER_CANVAS
    lines = [
        "",
        f"request: /predict with a {CANVAS_SIDE}x{CANVAS_SIDE} canvas PNG ({png_bytes} bytes), "
        f"/read with {NUMBER} on a {width}x{height} pad PNG ({number_bytes} bytes)",
        f"{'route':<12} {'mode':<12} {'requests':>8} {'errors':>6} {'req/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'server CPU ms/req':>17}",
    ]
    for result in results:
        lines.append(
            f"{result.route:<12} {result.mode:<12} {result.requests:>8} {result.errors:>6} "
            f"{result.throughput:>8.0f} {result.percentile(50):>7.2f} "
            f"{result.percentile(99):>7.2f} {result.server_cpu_ms:>17.2f}"
        )
    p50 = {r.route: r.percentile(50) for r in results if r.mode == "sequential"}
    for route, target in P50_TARGETS_MS.items():
        met = _verdict(p50[route] <= target)
        lines.append(f"{route} p50 (sequential): {p50[route]:.2f} ms, target <= {target:g} {met}")
    clients, wanted = PREDICT_THROUGHPUT_TARGET
    for result in results:
        if (result.route, result.mode) == ("/predict", f"{clients} clients"):
            met = _verdict(result.throughput >= wanted)
            lines.append(
                f"/predict, {clients} clients: {result.throughput:.0f} req/s, "
                f"target >= {wanted:g} {met}"
            )
    lines += [
        f"/predict p50 / /livez p50 (sequential): {p50['/predict'] / p50['/livez']:.2f}x",
        f"cold start to ready: {cold_start:.1f} s",
        f"resident memory (server process tree): {rss_mb:.0f} MB",
    ]
    log.info("\n".join(lines))


def _verdict(met: bool) -> str:
    return "(met)" if met else "(MISSED)"


if __name__ == "__main__":
    main()
