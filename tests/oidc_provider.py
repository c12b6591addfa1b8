"""A real OpenID Connect provider (panva's oidc-provider, run by Node) on loopback for tests.

``tests/oidc/provider.mjs`` serves HTTPS on 127.0.0.1 and issues RS256 JWT access tokens
through the client-credentials grant, with ``aud: "querywarden"``, ``sub`` = the client id and
a ``groups`` claim holding that client's groups. ``OidcProvider`` starts it with a
self-signed certificate, confidential clients with generated secrets, and fetches tokens.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from querywarden.tlsutil import write_self_signed

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
SCRIPT = OIDC_DIR / "provider.mjs"
AUDIENCE = "querywarden"
DEFAULT_TTL = 600
READY_TIMEOUT = 30.0  # per attempt; normal start-up takes about half a second
START_ATTEMPTS = 3


class _NotReady(Exception):
    """The provider process did not print READY in time."""


HTTP_TIMEOUT = 10.0


class OidcError(RuntimeError):
    """The provider answered an HTTP request with an error."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"OIDC provider answered HTTP {status}: {body}")
        self.status = status
        self.body = body
        try:
            self.error: str | None = json.loads(body).get("error")
        except (ValueError, AttributeError):
            self.error = None


def _pinned_version() -> str:
    package = json.loads((OIDC_DIR / "package.json").read_text())
    return str(package["dependencies"]["oidc-provider"])


def _installed_version() -> str | None:
    installed = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
    if not installed.exists():
        return None
    return str(json.loads(installed.read_text())["version"])


def ensure_installed() -> None:
    """Install oidc-provider from tests/oidc/package-lock.json unless it already is."""
    if _installed_version() == _pinned_version():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to install the test OIDC provider (tests/oidc)")
    subprocess.run(
        [npm, "ci", "--prefix", str(OIDC_DIR), "--no-audit", "--no-fund"],
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if _installed_version() != _pinned_version():
        raise RuntimeError("npm ci did not install the pinned oidc-provider in tests/oidc")


class OidcProvider:
    """One oidc-provider process serving HTTPS on 127.0.0.1."""

    def __init__(self, *, ttl: int = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self.issuer = ""
        self.ca_file: Path | None = None
        self.clients: dict[str, list[str]] = {}
        self.log_file: Path | None = None
        self._secrets: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._context: ssl.SSLContext | None = None
        self._metadata: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, tmp_dir: Path | str, clients: dict[str, list[str]]) -> OidcProvider:
        """Start the provider with these clients (id -> groups); wait until it listens."""
        if self._process is not None:
            raise RuntimeError("this OidcProvider is already started")
        ensure_installed()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is needed to run the test OIDC provider")
        directory = Path(tmp_dir)
        cert_path, key_path = write_self_signed(directory, "oidc", hostname="localhost")
        self.ca_file = cert_path
        self._context = ssl.create_default_context(cafile=str(cert_path))
        self.clients = {client_id: list(groups) for client_id, groups in clients.items()}
        self._secrets = {client_id: secrets.token_urlsafe(24) for client_id in clients}
        clients_file = directory / "oidc-clients.json"
        clients_file.write_text(
            json.dumps(
                [
                    {"client_id": cid, "client_secret": self._secrets[cid], "groups": groups}
                    for cid, groups in self.clients.items()
                ]
            )
        )
        clients_file.chmod(0o600)
        self.log_file = directory / "oidc-provider.log"
        self._log = self.log_file.open("wb")
        command = [
            node,
            str(SCRIPT),
            "--port=0",
            f"--cert={cert_path}",
            f"--key={key_path}",
            f"--clients={clients_file}",
            f"--ttl={self.ttl}",
            "--watch-stdin",
        ]
        # A start that hangs (seen rarely on a loaded machine, with nothing in the log) is
        # retried with a fresh process rather than failing the test run.
        for attempt in range(1, START_ATTEMPTS + 1):
            # stdin stays an open pipe: the provider exits when it closes, even if we die.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=OIDC_DIR,
            )
            try:
                self.issuer = self._wait_ready()
                self._metadata = self.discovery()
            except _NotReady:
                self._kill()
                if attempt == START_ATTEMPTS:
                    self.stop()
                    raise RuntimeError(
                        f"the OIDC provider was not ready after {START_ATTEMPTS} attempts of "
                        f"{READY_TIMEOUT} s:\n{self.log()}"
                    ) from None
                continue
            except BaseException:
                self.stop()
                raise
            return self
        raise AssertionError("unreachable")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()
        self._process = None

    def _wait_ready(self) -> str:
        assert self._process is not None and self.log_file is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.log_file.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    return line.split(maxsplit=1)[1].strip()
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the OIDC provider exited with {self._process.returncode}:\n{self.log()}"
                )
            time.sleep(0.05)
        raise _NotReady

    def log(self) -> str:
        """What the provider printed so far (notices, warnings, errors)."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(errors="replace")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def returncode(self) -> int | None:
        """The exit status once stopped, else None."""
        return None if self._process is None else self._process.returncode

    def stop(self) -> None:
        """Stop the provider (stdin close, then SIGTERM, then SIGKILL) and reap it."""
        process = self._process
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts this provider's certificate."""
        if self._context is None:
            raise RuntimeError("the OidcProvider is not started")
        return self._context

    def _request(
        self,
        url: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> Any:
        request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(
                request, context=self.ssl_context(), timeout=HTTP_TIMEOUT
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                body = error.read().decode(errors="replace")
            raise OidcError(error.code, body) from None

    def discovery(self) -> dict[str, Any]:
        """The ``/.well-known/openid-configuration`` document."""
        result: dict[str, Any] = self._request(f"{self.issuer}/.well-known/openid-configuration")
        return result

    @property
    def jwks_uri(self) -> str:
        return str(self._metadata["jwks_uri"])

    @property
    def token_endpoint(self) -> str:
        return str(self._metadata["token_endpoint"])

    def jwks(self) -> dict[str, Any]:
        """The public JWKS, fetched now."""
        result: dict[str, Any] = self._request(self.jwks_uri)
        return result

    def client_secret(self, client_id: str) -> str:
        return self._secrets[client_id]

    def token_response(
        self,
        client_id: str,
        *,
        ttl: int | None = None,
        resource: str | None = None,
        client_secret: str | None = None,
    ) -> dict[str, Any]:
        """The token endpoint's JSON for a client-credentials grant (client_secret_basic)."""
        secret = self._secrets[client_id] if client_secret is None else client_secret
        # RFC 6749 2.3.1: form-urlencode id and secret before base64.
        pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(pair.encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        if ttl is not None:
            headers["X-Test-Token-TTL"] = str(ttl)
        form = {"grant_type": "client_credentials"}
        if resource is not None:
            form["resource"] = resource
        result: dict[str, Any] = self._request(
            self.token_endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers=headers,
            method="POST",
        )
        return result

    def token(self, client_id: str, *, ttl: int | None = None, resource: str | None = None) -> str:
        """A fresh JWT access token for this client (aud "querywarden", its groups)."""
        return str(self.token_response(client_id, ttl=ttl, resource=resource)["access_token"])

    def rotate_keys(self, *, keep_old: bool = False) -> str:
        """Sign with a new RSA key from now on; return its kid.

        The JWKS then publishes only the new key, or the new and the old ones with keep_old.
        """
        suffix = "?keep_old=1" if keep_old else ""
        result = self._request(f"{self.issuer}/test/rotate{suffix}", data=b"", method="POST")
        return str(result["kid"])
