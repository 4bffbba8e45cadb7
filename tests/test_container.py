"""The deployment as a user runs it: `bentoml build`, `bentoml containerize` with podman, then
the image served on 127.0.0.1 and asked over HTTP like the page asks it.

    .venv/bin/python -m pytest -m container tests/test_container.py -q

Needs podman (`scripts/setup --container`). The bento's Dockerfile starts `FROM
python:3.11-slim`; where no container registry is reachable, the test builds a stand-in for that
image from Debian's own packages (see `stand_in_base_image`) and says so in a warning. The image
and the container are removed afterwards; the base image stays, so later runs reuse it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines.corrections import CorrectionStore
from tests.conftest import BENTOML, data_url, free_port, render_canvas
from tests.helpers import REPO as REPO_ROOT

pytestmark = pytest.mark.container
log = logging.getLogger(__name__)

PODMAN = shutil.which("podman")
BASE_IMAGE = "docker.io/library/python:3.11-slim"  # what `FROM python:3.11-slim` resolves to
STAND_IN_LABEL = "digits.stand-in"  # set on a stand-in base image, never on the real one
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
READY_TIMEOUT = 120.0  # seconds from `podman run` to /readyz answering 200
MAX_ADDED_BYTES = 400e6  # the layers the bento adds on its base image, at most
CLEAR_DIGITS = (0, 1, 2, 3)  # MNIST test images 7, 2, 1, 0: any working model reads them

# What the slim Debian images configure, so that packages installed on the stand-in take the room
# they take on the real image: no apt caches or translations kept, compressed package lists, no
# documentation (the dpkg part is given to mmdebstrap, so it applies to the base system too).
APT_SLIM_CONFIG = {
    "docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
        '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-gzip-indexes": (
        'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n'
    ),
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
DPKG_SLIM_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
STAND_IN_CONTAINERFILE = f"""\
FROM {{rootfs}}
COPY apt/ /etc/apt/apt.conf.d/
COPY host-ca.crt /usr/local/share/host-ca.crt
RUN rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \\
 && ln -s /usr/bin/python3.11 /usr/local/bin/python3.11 \\
 && ln -s /usr/bin/python3 /usr/local/bin/python3 \\
 && ln -s /usr/bin/python3 /usr/local/bin/python \\
 && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV SSL_CERT_FILE=/usr/local/share/host-ca.crt \\
    PIP_CERT=/usr/local/share/host-ca.crt \\
    REQUESTS_CA_BUNDLE=/usr/local/share/host-ca.crt
LABEL {STAND_IN_LABEL}="Debian bookworm's python3 standing in for python:3.11-slim"
CMD ["python3"]
"""


def run(*command: str, timeout: float = 600, check: bool = True, **options) -> str:
    """Run a command; return its stdout. Fails the test with the command's output if it fails."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **options
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-5000:]}")
    return result.stdout


def podman(*args: str, timeout: float = 600, check: bool = True) -> str:
    return run(PODMAN, *args, timeout=timeout, check=check)


def stand_in_base_image(workdir: Path) -> None:
    """Build `python:3.11-slim` from Debian bookworm's packages and tag it as the real one.

    Debian 12's python3 is 3.11, like the official image's; mmdebstrap installs it (with venv,
    pip and CA certificates) into a minimal root file system, `podman import` makes that an
    image, and a small Containerfile adds what the official image offers: `python`, `python3.11`
    and `pip` in /usr/local/bin, pip allowed to install into the system Python, and the slim
    images' apt and dpkg settings. It also carries this machine's CA bundle, since package
    downloads may pass a TLS proxy that only that bundle trusts."""
    rootfs = workdir / "rootfs.tar"
    run(
        "mmdebstrap",
        "--variant=minbase",
        "--include=python3,python3-venv,python3-pip,ca-certificates",
        *(f"--dpkgopt={option}" for option in DPKG_SLIM_OPTIONS),
        "bookworm",
        str(rootfs),
        timeout=900,
    )
    rootfs_image = f"localhost/digits-stand-in-rootfs:{uuid.uuid4().hex[:8]}"
    podman("import", str(rootfs), rootfs_image)
    try:
        (workdir / "apt").mkdir()
        for name, text in APT_SLIM_CONFIG.items():
            (workdir / "apt" / name).write_text(text)
        shutil.copy(HOST_CA_BUNDLE, workdir / "host-ca.crt")
        (workdir / "Containerfile").write_text(STAND_IN_CONTAINERFILE.format(rootfs=rootfs_image))
        podman("build", "--network", "host", "-t", BASE_IMAGE, str(workdir))
    finally:
        podman("rmi", rootfs_image, check=False)


def provide_base_image() -> str | None:
    """Make sure podman has `python:3.11-slim`: the local one, pulled, or a stand-in built
    here. Returns what to warn about when it is a stand-in, else None."""
    if subprocess.run([PODMAN, "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        labels = json.loads(podman("image", "inspect", "--format", "{{json .Labels}}", BASE_IMAGE))
        if STAND_IN_LABEL in (labels or {}):
            return (
                f"{BASE_IMAGE} is the stand-in an earlier run built from Debian packages "
                "(no registry was reachable), not the official image"
            )
        return None
    pulled = subprocess.run(
        [PODMAN, "pull", "-q", BASE_IMAGE], capture_output=True, text=True, timeout=600, check=False
    )
    if pulled.returncode == 0:
        return None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="digits-stand-in-") as workdir:
        stand_in_base_image(Path(workdir))
    return (
        f"{BASE_IMAGE} could not be pulled ({pulled.stderr.strip()[-160:]}); built a stand-in "
        f"from Debian bookworm's python3 in {time.monotonic() - started:.0f} s and tagged it "
        "with that name (kept for later runs)"
    )


@pytest.fixture(scope="module")
def base_image() -> Iterator[Future[str | None]]:
    """`provide_base_image` on a thread: a stand-in takes minutes of downloading and unpacking,
    which overlap the model's training in `bentoml_home` (requested after this fixture)."""
    if PODMAN is None:
        pytest.skip("podman is not installed (scripts/setup --container installs it)")
    with ThreadPoolExecutor(1, thread_name_prefix="base-image") as pool:
        yield pool.submit(provide_base_image)


@pytest.fixture(scope="module")
def image(base_image: Future[str | None], bentoml_home: Path) -> Iterator[str]:
    """`bentoml build`, then `bentoml containerize` with podman; yields the image's name and
    removes it at the end."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
    built = run(str(BENTOML), "build", "-o", "tag", cwd=REPO_ROOT, env=env, timeout=300)
    bento_tag = built.strip().splitlines()[-1].removeprefix("__tag__:")
    stand_in = base_image.result()
    if stand_in:
        warnings.warn(stand_in, stacklevel=1)
    name = f"localhost/digits-test:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        run(
            str(BENTOML),
            "containerize",
            "--backend",
            "podman",
            "--opt",
            "network=host",
            "--image-tag",
            name,
            bento_tag,
            cwd=REPO_ROOT,
            env=env,
            timeout=1200,
        )
        log.info("containerized %s as %s in %.0f s", bento_tag, name, time.monotonic() - started)
        yield name
    finally:
        podman("rmi", "--force", name, check=False)


@pytest.fixture(scope="module")
def corrections_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host folder the container keeps its corrections in, as README's command mounts it."""
    return tmp_path_factory.mktemp("container_feedback")


@pytest.fixture(scope="module")
def container(image: str, corrections_volume: Path) -> Iterator[str]:
    """The image running with host networking on a free port of 127.0.0.1, its corrections in
    `corrections_volume` (`:U` gives the folder to the container's user); yields its URL."""
    port = free_port()
    name = f"digits-test-{uuid.uuid4().hex[:12]}"
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--env",
        "BENTOML_HOST=127.0.0.1",
        "--env",
        f"BENTOML_PORT={port}",
        "--env",
        "DIGITS_WORKERS=1",
        "--volume",
        f"{corrections_volume}:/feedback:U",
        "--env",
        "DIGITS_FEEDBACK_DIR=/feedback",
        image,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, name)
        yield base_url
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


def wait_until_ready(base_url: str, name: str) -> None:
    started = time.monotonic()
    while time.monotonic() < started + READY_TIMEOUT:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                log.info("%s ready in %.1f s", name, time.monotonic() - started)
                return
        except httpx.TransportError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).strip()
        if state not in ("created", "running"):
            break
        time.sleep(0.5)
    logs = podman("logs", name, check=False)
    pytest.fail(f"the container did not get ready (state {state!r}):\n{logs[-5000:]}")


def test_the_image_serves_predictions_info_and_the_page(container, mnist_test, bentoml_home):
    import bentoml

    images, labels = mnist_test
    for index in CLEAR_DIGITS:
        response = httpx.post(
            f"{container}/predict",
            json={"image": data_url(render_canvas(images[index]))},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["digit"] == int(labels[index]), response.json()

    info = httpx.get(f"{container}/info", timeout=10)
    assert info.status_code == 200
    assert info.json()["model_tag"] == str(bentoml.models.get("digits-cnn:latest").tag)

    page = httpx.get(f"{container}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text


def test_the_image_keeps_corrections_in_the_mounted_folder(
    container, corrections_volume, mnist_test
):
    images, labels = mnist_test
    response = httpx.post(
        f"{container}/feedback",
        json={"image": data_url(render_canvas(images[0])), "label": str(labels[0])},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    store = CorrectionStore.from_env({"DIGITS_FEEDBACK_DIR": str(corrections_volume)})
    try:
        [correction] = store.list()
    finally:
        store.close()
    assert correction.id == response.json()["id"] and correction.label == str(labels[0])


def test_the_image_holds_the_pinned_packages_and_no_package_cache(image):
    """The image's Python environment is exactly bentofile.yaml's pins (the versions the tests
    ran), and uv left no download cache behind. Logs the image's size."""
    pins = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    expected = dict(pin.split("==") for pin in pins)
    listing = podman(
        "run",
        "--rm",
        "--user",
        "root",
        "--entrypoint",
        "/app/.venv/bin/python",
        image,
        "-c",
        "import importlib.metadata as m, json, os, re; print(json.dumps(["
        "{re.sub(r'[-_.]+', '-', d.name).lower(): d.version for d in m.distributions()},"
        " os.path.exists('/root/.cache/uv')]))",
    )
    installed, uv_cache = json.loads(listing)
    assert installed == expected
    assert not uv_cache, "uv's download cache is in the image"

    def total(name: str) -> int:
        return sum(
            layer["size"] for layer in json.loads(podman("history", "--format", "json", name))
        )

    base, whole = total(BASE_IMAGE), total(image)
    log.info("%s: %.0f MB, of which %s %.0f MB", image, whole / 1e6, BASE_IMAGE, base / 1e6)
    assert whole - base <= MAX_ADDED_BYTES, f"the bento adds {(whole - base) / 1e6:.0f} MB"


def test_the_image_has_no_compilers_on_top_of_its_base(image):
    """Every package is a wheel, so nothing is built in the image: BentoML's build tools for
    Debian (build-essential, git, gnupg2: 306 MB) are not installed."""
    found = podman(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for tool in gcc cc make git gpg; do command -v $tool || true; done",
    )
    assert found.strip() == ""
