"""The built querywarden image, run with podman as a user would run it.

``make test`` builds the image first (``make image``: scripts/build-image.sh, a no-op when
nothing it is made of changed); :func:`built_image` builds it again only if that step was
skipped. Containers use the host's network namespace, so everything they serve and reach
stays on loopback; they run read-only, as the image's own user (uid 65532).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("QW_IMAGE", "localhost/querywarden:dev")
PODMAN = [str(REPO / "scripts" / "podman.sh")]
#: The image's user, as the Dockerfile and the operator's sidecar spec give it.
IMAGE_UID = 65532


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run podman with the project's engine settings; with ``check``, fail with its output."""
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stderr}{result.stdout}"
        )
    return result


def built_image() -> str:
    """The image's name, after building it if its inputs changed (normally a no-op)."""
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh")], check=True, timeout=1800, cwd=REPO
    )
    return IMAGE


def readable_by_image(*paths: Path) -> None:
    """Hand files (and their folders) to the image's user, as a Secret volume would."""
    for path in paths:
        os.chown(path, IMAGE_UID, IMAGE_UID)


@dataclass
class Container:
    """A detached container; :meth:`logs` for what it printed."""

    name: str

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def exit_code(self) -> int | None:
        state = podman("inspect", "--format", "{{.State.ExitCode}}", self.name, check=False)
        return int(state.stdout) if state.returncode == 0 and not self.running() else None


@contextmanager
def container(
    image: str,
    args: Sequence[str],
    *,
    volumes: Sequence[tuple[Path, str, str]] = (),
    env: dict[str, str] | None = None,
    tmpfs: Sequence[str] = ("/tmp",),
    read_only: bool = True,
    network: str = "host",
    extra_args: Sequence[str] = (),
) -> Iterator[Container]:
    """Run ``image`` detached, by default on the host network and read-only; removed afterwards.

    ``volumes`` are (host path, container path, options) bind mounts; ``extra_args`` more
    options of ``podman run`` (``--user``, ...).
    """
    name = f"qw-test-{uuid.uuid4().hex[:10]}"
    command = ["run", "--detach", "--name", name, "--network", network]
    if read_only:
        command.append("--read-only")
    command += extra_args
    for path in tmpfs:
        command += ["--tmpfs", path]
    for host, inside, options in volumes:
        command += ["--volume", f"{host}:{inside}:{options}"]
    for key, value in (env or {}).items():
        command += ["--env", f"{key}={value}"]
    podman(*command, image, *args)
    running = Container(name)
    try:
        yield running
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


def wait_until_serving(running: Container, probe: object, *, timeout: float = 60) -> None:
    """Call ``probe`` (a callable returning true once served) until it is, or fail with logs."""
    assert callable(probe)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running.running():
            raise AssertionError(f"the container exited:\n{running.logs()}")
        if probe():
            return
        time.sleep(0.2)
    raise AssertionError(f"not serving after {timeout:.0f}s:\n{running.logs()}")
