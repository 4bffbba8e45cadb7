"""Load and soak test of the service as deployed: a real `bentoml serve`, many clients, real
drawings, and the server's memory watched from outside.

    .venv/bin/python benchmarks/load.py                       # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/load.py --requests 2000 --soak-seconds 0
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:3000 --pid <server pid>

Starts `bentoml serve service.service:Digits` on a free port of 127.0.0.1 with the BentoML store
of BENTOML_HOME (~/bentoml by default, which must hold a `digits-cnn` model), or uses the
server at `--url`. `--clients` threads (32), each on its own keep-alive connection, POST
/predict with MNIST test digits drawn as the page's canvas PNGs: `--digits` different drawings
(1,000), one after another, so that the answers can be checked against the labels. Two phases:

    load   --requests requests (20,000) as fast as the server answers them
    soak   then requests without a pause for --soak-seconds (120), memory sampled meanwhile

Each phase reports requests/s, p50/p99 latency, errors by status, and the accuracy on the
digits sent; then the resident memory of the server's process tree (VmRSS summed over /proc)
after warm-up, after the load and during and after the soak, and its growth. Exits with status 1
when a target is missed: any error, or memory growing by 10% or more across the soak. The
server it started is stopped (its whole process group) at the end.

`bentoml serve` empties the Prometheus directory of its BENTOML_HOME when it starts, so starting
one here resets the /metrics of any other server running on the same store: to load a server
that is already running, point `--url` at it instead.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from common import (
    BENTOML,
    SERVICE,
    SHARED_MNIST,
    free_port,
    mnist_test_digits,
    render_canvas,
    start_server,
    stop_server,
    tree_rss_mb,
    wait_ready,
)

log = logging.getLogger("load")

CONNECTION_ERROR = 0  # the status recorded when no HTTP answer came (refused, reset, timeout)
MEMORY_GROWTH_TARGET = 10.0  # percent, across the soak
WARMUP_REQUESTS = 500  # before the first memory reading: let allocators and caches settle


@dataclass(frozen=True)
class Drawing:
    body: bytes  # the JSON request body
    label: int


@dataclass
class Tally:
    """What one client saw: latency of each request, statuses, and correct answers."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    answered: int = 0  # 200s
    correct: int = 0  # 200s that read the digit drawn

    def merge(self, other: Tally) -> None:
        self.latencies_ms += other.latencies_ms
        self.statuses.update(other.statuses)
        self.answered += other.answered
        self.correct += other.correct


@dataclass(frozen=True)
class Phase:
    name: str
    tally: Tally
    seconds: float

    @property
    def requests(self) -> int:
        return len(self.tally.latencies_ms)

    @property
    def errors(self) -> dict[int, int]:
        return {status: n for status, n in sorted(self.tally.statuses.items()) if status != 200}

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.tally.latencies_ms, q)) if self.requests else float("nan")


# ---- The requests -----------------------------------------------------------------------------


def drawings(mnist_dir: Path, count: int) -> list[Drawing]:
    """The first `count` MNIST test digits as canvas PNG data URLs in /predict bodies."""
    images, labels = mnist_test_digits(mnist_dir)
    made = []
    for index in range(min(count, len(images))):
        png = base64.b64encode(render_canvas(images[index])).decode("ascii")
        body = json.dumps({"image": f"data:image/png;base64,{png}"}).encode()
        made.append(Drawing(body, int(labels[index])))
    return made


class Client:
    """One keep-alive connection; reconnects after a failure or a `Connection: close`."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.connection: http.client.HTTPConnection | None = None

    def predict(self, drawing: Drawing, tally: Tally) -> None:
        began = time.perf_counter()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, self.timeout)
            self.connection.request(
                "POST", "/predict", drawing.body, {"Content-Type": "application/json"}
            )
            response = self.connection.getresponse()
            answer = response.read()
            status = response.status
            if response.will_close:
                self.close()
        except (OSError, http.client.HTTPException):
            status, answer = CONNECTION_ERROR, b""
            self.close()
        tally.latencies_ms.append((time.perf_counter() - began) * 1000)
        tally.statuses[status] += 1
        if status == 200:
            tally.answered += 1
            tally.correct += _digit(answer) == drawing.label

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_phase(
    name: str,
    address: tuple[str, int],
    work: list[Drawing],
    clients: int,
    timeout: float,
    requests: int | None = None,
    seconds: float | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> Phase:
    """`clients` threads send `requests` in all, or send without a pause for `seconds`.

    Client i sends drawings i, i + clients, i + 2 * clients, ... (cycling), so all of them are
    used and no two clients send the same one at the same moment. `on_tick(elapsed)` is called
    from this thread five times a second while the phase runs.
    """
    tallies = [Tally() for _ in range(clients)]
    finished = [0.0] * clients
    start_line = threading.Barrier(clients + 1)
    deadline = [float("inf")]

    def client(index: int) -> None:
        connection = Client(*address, timeout)
        start_line.wait()
        ticket = index
        while (requests is None or ticket < requests) and time.perf_counter() < deadline[0]:
            connection.predict(work[ticket % len(work)], tallies[index])
            ticket += clients
        finished[index] = time.perf_counter()
        connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    if seconds is not None:
        deadline[0] = began + seconds
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.2)
        if on_tick is not None:
            on_tick(time.perf_counter() - began)
    elapsed = max(finished) - began
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    return Phase(name, total, elapsed)


# ---- Main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server to load instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its memory")
    parser.add_argument("--bentoml", type=Path, default=BENTOML)
    parser.add_argument("--service", default=SERVICE)
    parser.add_argument("--mnist-dir", type=Path, default=SHARED_MNIST)
    parser.add_argument("--requests", type=int, default=20_000, help="requests of the load phase")
    parser.add_argument("--soak-seconds", type=float, default=120.0, help="0 skips the soak")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--digits", type=int, default=1000, help="different drawings to send")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout, seconds")
    parser.add_argument("--sample-seconds", type=float, default=15.0, help="memory sampling")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = drawings(args.mnist_dir, args.digits)
    log.info("%d drawings, %.1f kB per request on average", len(work), _mean_kb(work))
    process = None
    if args.url:
        parts = urlsplit(args.url)
        address = (parts.hostname or "127.0.0.1", parts.port or 80)
        server_pid = args.pid
    else:
        port = free_port()
        log_file = Path(tempfile.mkstemp(prefix="digits-load-", suffix=".log")[1])
        log.info("starting bentoml serve on port %d (log: %s)", port, log_file)
        process = start_server(args.bentoml, args.service, port, log_file)
        address, server_pid = ("127.0.0.1", port), process.pid
    try:
        if process is not None:
            wait_ready(process, address[1], args.start_timeout)
        return run(args, address, server_pid, work)
    finally:
        if process is not None:
            stop_server(process)


def run(
    args: argparse.Namespace, address: tuple[str, int], pid: int | None, work: list[Drawing]
) -> int:
    def rss() -> float | None:
        return tree_rss_mb(pid) if pid is not None else None

    run_phase("warm-up", address, work, args.clients, args.timeout, requests=WARMUP_REQUESTS)
    memory: dict[str, float | None] = {"after warm-up": rss()}
    log.info("load: %d requests from %d clients", args.requests, args.clients)
    phases = [run_phase("load", address, work, args.clients, args.timeout, args.requests)]
    memory["after load"] = rss()
    samples: list[tuple[float, float]] = []
    if args.soak_seconds > 0:
        log.info("soak: %.0f s from %d clients", args.soak_seconds, args.clients)
        next_sample = [args.sample_seconds]

        def sample(elapsed: float) -> None:
            if pid is not None and elapsed >= next_sample[0]:
                samples.append((elapsed, tree_rss_mb(pid)))
                next_sample[0] += args.sample_seconds

        phases.append(
            run_phase(
                "soak",
                address,
                work,
                args.clients,
                args.timeout,
                seconds=args.soak_seconds,
                on_tick=sample,
            )
        )
        memory["after soak"] = rss()
    return report(phases, memory, samples, args.clients, len(work))


def report(
    phases: list[Phase],
    memory: dict[str, float | None],
    samples: list[tuple[float, float]],
    clients: int,
    different_drawings: int,
) -> int:
    lines = [
        "",
        f"POST /predict, {clients} clients, {different_drawings} different canvas drawings of "
        "MNIST test digits",
        f"{'phase':<6} {'requests':>8} {'seconds':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'accuracy':>8}  errors by status",
    ]
    errors = 0
    for phase in phases:
        tally = phase.tally
        failed = sum(phase.errors.values())
        errors += failed
        accuracy = tally.correct / tally.answered if tally.answered else float("nan")
        by_status = ", ".join(
            f"{'no answer' if status == CONNECTION_ERROR else status}: {n}"
            for status, n in phase.errors.items()
        )
        lines.append(
            f"{phase.name:<6} {phase.requests:>8} {phase.seconds:>7.1f} "
            f"{phase.requests / phase.seconds:>7.0f} {phase.percentile(50):>7.1f} "
            f"{phase.percentile(99):>7.1f} {failed:>6} {accuracy:>8.2%}  {by_status or '-'}"
        )
    growth = None
    if None in memory.values():
        lines.append("resident memory: n/a (pass --pid with --url)")
    else:
        lines.append(
            "resident memory (server process tree): "
            + ", ".join(f"{when} {mb:.0f} MB" for when, mb in memory.items())
        )
        if samples:
            lines.append(
                "  during the soak: "
                + ", ".join(f"{elapsed:.0f} s {mb:.0f} MB" for elapsed, mb in samples)
            )
        before = memory["after load"] if "after soak" in memory else memory["after warm-up"]
        after = memory.get("after soak", memory["after load"])
        growth = (after - before) / before * 100
        phase = "the soak" if "after soak" in memory else "the load"
        lines.append(f"memory growth across {phase}: {growth:+.1f}%")
        overall = (after - memory["after warm-up"]) / memory["after warm-up"] * 100
        lines.append(f"memory growth since warm-up: {overall:+.1f}%")
    missed = []
    if errors:
        missed.append(f"{errors} errors")
    if growth is not None and growth >= MEMORY_GROWTH_TARGET:
        missed.append(f"memory grew {growth:.1f}%")
    lines.append(
        "targets (zero errors, memory growth < 10%): "
        + ("met" if not missed else "MISSED: " + "; ".join(missed))
    )
    log.info("\n".join(lines))
    return 1 if missed else 0


def _digit(answer: bytes) -> int | None:
    try:
        return json.loads(answer).get("digit")
    except (ValueError, AttributeError):  # not the documented answer: counts as a wrong one
        return None


def _mean_kb(work: list[Drawing]) -> float:
    return sum(len(drawing.body) for drawing in work) / max(len(work), 1) / 1000


if __name__ == "__main__":
    sys.exit(main())
