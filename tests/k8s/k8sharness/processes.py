"""Child processes that are always cleaned up: each runs in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

#: How long a process may take to exit after SIGTERM before its group gets SIGKILL.
STOP_TIMEOUT = 15.0


class ProcessFailed(RuntimeError):
    """A harness process exited early or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """A child in a new session (so a process group of its own) with its output in a file.

    ``stop()`` signals the whole group, so nothing the child spawned outlives the tests.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_file: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_file = log_file
        self._log: IO[bytes] = log_file.open("ab")
        try:
            self.popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the child has not exited yet."""
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        """The last lines of the child's output, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(
        self, ready: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.2
    ) -> None:
        """Poll ``ready`` until it holds; fail with the child's output if it dies or stalls."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ProcessFailed(
                    f"{self.name} exited with {self.popen.returncode} before {what}; "
                    f"its output ({self.log_file}):\n{self.tail()}"
                )
            # Not listening yet, an error status, half a response: all mean "not yet".
            with contextlib.suppress(OSError, ValueError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} not {what} after {timeout:.0f}s; its output "
                    f"({self.log_file}):\n{self.tail()}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, and reap the child."""
        try:
            if self.alive():
                self._signal_group(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.popen.wait(timeout)
            # The leader may be gone while something it started still runs in its group.
            self._signal_group(signal.SIGKILL)
        finally:
            self._log.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)
