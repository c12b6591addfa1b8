"""Where ``querywarden mcp`` over stdio gets the agent's token.

The agent's own short-lived token is its only credential: from an environment variable
(read again at each use, so a wrapper that rewrites it is followed), or from a command
run when no token is held or the one held is about to expire (``--token-command``, e.g.
``gcloud auth print-identity-token`` or ``cat /var/run/secrets/tokens/querywarden``).
Over HTTP each request brings its own bearer token instead (:mod:`querywarden.mcp.server`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import time
from typing import Protocol

#: A token is fetched again this long before it expires (a hold can outlast it otherwise).
REFRESH_BEFORE = 60.0
#: How long a token whose expiry cannot be read (SAML, opaque) is reused.
UNREADABLE_TTL = 60.0
#: How long the token command may run.
COMMAND_TIMEOUT = 30.0


class TokenUnavailable(Exception):
    """No token can be had: the message says why and what to do."""


class TokenSource(Protocol):
    async def token(self) -> str:
        """A token valid for at least a little while."""
        ...

    def invalidate(self) -> bool:
        """The gateway refused the token: forget it; True if the next may differ."""
        ...


def claims_of(token: str) -> dict[str, object]:
    """A JWT's claims, read WITHOUT verifying ({} for anything else).

    Only for what the gateway has already verified, or to know when to fetch a new
    token: never a reason to trust one.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def expiry(token: str) -> float | None:
    """A JWT's ``exp`` (POSIX seconds), read without verifying; None for anything else."""
    exp = claims_of(token).get("exp")
    return float(exp) if isinstance(exp, int | float) else None


class EnvironmentToken:
    """The token in an environment variable, read at each use."""

    def __init__(self, variable: str) -> None:
        self.variable = variable

    async def token(self) -> str:
        value = os.environ.get(self.variable, "").strip()
        if not value:
            raise TokenUnavailable(
                f"no token: the environment variable {self.variable} is empty; set it to a "
                "token of an issuer the gateway trusts, or start querywarden mcp with "
                "--token-command"
            )
        return value

    def invalidate(self) -> bool:
        return False  # the variable holds what it held: asking again would not help


class CommandToken:
    """A token printed by a command, cached until shortly before it expires."""

    def __init__(self, command: str, *, clock: object = time.time) -> None:
        self.command = command
        self._clock = clock
        self._token: str | None = None
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()

    def _now(self) -> float:
        now = self._clock()  # type: ignore[operator]
        return float(now)

    async def token(self) -> str:
        async with self._lock:
            if self._token is not None and self._now() < self._fresh_until:
                return self._token
            token = await self._run()
            exp = expiry(token)
            now = self._now()
            self._fresh_until = (exp - REFRESH_BEFORE) if exp is not None else now + UNREADABLE_TTL
            self._token = token
            return token

    def invalidate(self) -> bool:
        self._token = None
        return True

    async def _run(self) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(self.command),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise TokenUnavailable(f"the token command could not start: {exc}") from exc
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise TokenUnavailable(
                f"the token command did not finish within {COMMAND_TIMEOUT:g}s"
            ) from None
        token = out.decode("utf-8", "replace").strip()
        if process.returncode != 0 or not token:
            said = err.decode("utf-8", "replace").strip().splitlines()
            raise TokenUnavailable(
                f"the token command failed (exit status {process.returncode})"
                + (f": {said[-1]}" if said else "")
            )
        return token
