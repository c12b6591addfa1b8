"""The gateway's admin API, as ``querywarden mcp`` asks it: with the caller's own token.

Three questions: who a bearer token is (``GET /me``, to verify an HTTP caller by the
gateway's own issuers), what happened to a review (``GET /reviews/{id}``: the API shows a
requester their own reviews), and what the policy lets the caller do with some relations
(``POST /access``). Blocking ``urllib`` calls in a worker thread: a handful per tool call.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: How long one admin API request may take.
TIMEOUT = 10.0


class AdminError(Exception):
    """The admin API refused (``status`` 4xx/5xx) or could not be asked (``status`` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AdminClient:
    """Calls to one gateway's admin API."""

    def __init__(self, url: str, cafile: Path | None = None) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the admin API URL must be http:// or https://, not {url!r}")
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https:"):
            self._context = ssl.create_default_context(cafile=str(cafile) if cafile else None)

    async def me(self, token: str) -> dict[str, Any]:
        """``{"subject", "issuer", "groups", "approver"}`` for the token, or AdminError 401."""
        return await self._call("GET", "/me", token)

    async def review(self, token: str, review_id: str) -> dict[str, Any]:
        """The review, as the admin API shows it to this caller."""
        return await self._call("GET", f"/reviews/{review_id}", token)

    async def access(self, token: str, database: str, relations: list[str]) -> dict[str, Any]:
        """What the policy lets the caller do with ``relations`` (``POST /access``)."""
        return await self._call(
            "POST", "/access", token, {"database": database, "relations": relations}
        )

    async def _call(
        self, method: str, path: str, token: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._blocking_call, method, path, token, body)

    def _blocking_call(
        self, method: str, path: str, token: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(  # noqa: S310 - the scheme is checked in __init__
                request, timeout=TIMEOUT, context=self._context
            ) as reply:
                answer = json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            try:
                said = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                said = ""
            raise AdminError(
                f"the gateway's admin API answered {exc.code}" + (f": {said}" if said else ""),
                exc.code,
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"the gateway's admin API at {self.url} could not be asked: {reason}"
            ) from None
        if not isinstance(answer, dict):
            raise AdminError("the gateway's admin API answered something other than an object")
        return answer
