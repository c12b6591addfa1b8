"""The admin HTTP API: list, show, approve and deny reviews, on its own port.

::

    GET  /reviews[?state=pending|approved|denied|expired|withdrawn]   {"reviews": [Review]}
    GET  /reviews/{id}                                                Review
    POST /reviews/{id}/approve  {"comment": str, "uses"?: int, "ttl"?: "30m"}   Review
    POST /reviews/{id}/deny     {"comment": str}                                Review
    GET  /me                                                          who the token is
    POST /access  {"database": str, "relations": ["schema.table", ...]}   what the token may do
    GET  /sessions[?limit=N]                                          {"sessions": [...]}
    GET  /sessions/{id}                                               the session's replay
    GET  /healthz               (no token)                            {"ok": true}
    GET  /console[/...]         (no token: the page asks for one)     the approvals console
    GET  /metrics               (no token)                            Prometheus text format

``POST /access`` answers for the token's own identity only (there is no way to ask about
another): for each relation (at most 500; a relation may also be given as
``{"relation": "schema.table", "columns": [...]}`` to limit the masked columns reported to
those), the outcome of ``select``, ``insert``, ``update`` and ``delete`` under the policy
in force, and the columns masked for the identity with their strategies
(:mod:`querywarden.policy.access`)::

    {"subject": str, "database": str, "masked": bool, "detectors": [str],
     "relations": [{"relation": "public.customers",
                    "operations": {"select": {"outcome": "allow" | "review" | "deny",
                                              "rule": str | null, "reason": str}, ...},
                    "masked": {"ssn": "partial", ...}}]}

It reads the database's catalog through the gateway's catalog cache when masking applies
to the identity, and answers 503 when the catalog cannot be read (it does not guess).

The sessions endpoints are for approvers only and read the gateway's audit log
(:mod:`querywarden.approvals.replay` says what they show and what they never show).

``/metrics`` is the gateway's metrics in Prometheus's text exposition format
(:mod:`querywarden.audit.prometheus`), without a token: scrapers rarely hold an OIDC
token, and what it shows is counts by outcome, rule, SQLSTATE, database and upstream
address, never an identity, a statement or a value (docs/audit.md).

Every other request carries ``Authorization: Bearer <token>``, a token of an issuer the
policy trusts (approvers authenticate exactly as clients do). Errors are JSON
``{"error": message}`` with 400 (bad request), 401 (no or invalid token), 403 (not an
approver, self-approval, someone else's review), 404, 409 (no longer pending) or 503
(the issuer's keys, or for ``/access`` the database's catalog, cannot be read: retry).

The server is a small HTTP/1.1 implementation on asyncio streams (one request per
connection, bodies by Content-Length only), because the gateway has no HTTP framework
dependency and these few endpoints need none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import TypeAdapter, ValidationError

from querywarden.approvals.model import (
    ApprovalError,
    NotAnApprover,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
)
from querywarden.approvals.replay import recent_sessions, replay
from querywarden.approvals.service import ApprovalService
from querywarden.audit.log import AuditFormatError, read_records
from querywarden.config import Duration
from querywarden.errors import AuthenticationFailed
from querywarden.identity.principal import Authenticator, Credentials, Principal
from querywarden.policy.access import MAX_RELATIONS, AccessReport, AskedRelation

__all__ = [
    "AccessLookup",
    "AccessUnavailable",
    "AdminApi",
    "BearerAuthenticate",
    "MetricsText",
    "bearer_authenticate",
]

log = logging.getLogger(__name__)

#: ``authenticate(token) -> Principal``; raises AuthenticationFailed for a refused token.
BearerAuthenticate = Callable[[str], Awaitable[Principal]]
#: ``GET /metrics``: the exposition text, or None when the gateway counts nothing.
MetricsText = Callable[[], "str | None"]
#: ``POST /access``: ``(principal, database, relations) -> AccessReport`` under the policy in
#: force; raises :class:`AccessUnavailable` (503) or ValueError (400, e.g. a database the
#: gateway does not serve).
AccessLookup = Callable[[Principal, str, Sequence[AskedRelation]], Awaitable[AccessReport]]
#: Prometheus's text exposition format (querywarden.audit.prometheus.CONTENT_TYPE; not
#: imported, so the API does not load the metrics' OpenTelemetry SDK).
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024
_MAX_COMMENT = 4000
#: Time a client has to send its whole request (a slow client cannot hold a connection).
_REQUEST_TIMEOUT = 10.0
#: Time requests in flight get to finish when the API closes.
_CLOSE_GRACE = 2.0
_DURATION: TypeAdapter[timedelta] = TypeAdapter(Duration)
#: The console's files (package data), by the name the page asks for.
_CONSOLE_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
#: The console runs only its own script and style, talks only to this API, and is never
#: framed: an injected value could not run or send anything anywhere.
_CONSOLE_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MAX_SESSIONS = 200


def bearer_authenticate(
    authenticator: Authenticator, *, client_address: str = "admin-api"
) -> BearerAuthenticate:
    """Adapt the gateway's Authenticator (e.g. TokenAuthenticator) to the API's callable.

    The API sees no client certificate, so a token bound to one (``cnf``) is refused.
    """

    async def authenticate(token: str) -> Principal:
        credentials = Credentials(
            user="", secret=token.encode("utf-8", "replace"), client_address=client_address
        )
        return await authenticator.authenticate(credentials)

    return authenticate


class AccessUnavailable(Exception):
    """``POST /access`` cannot be answered right now (e.g. the catalog cannot be read)."""


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _Request:
    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body


class AdminApi:
    """The admin HTTP(S) server over an :class:`ApprovalService`.

    ``authenticate`` turns a bearer token into a Principal (see :func:`bearer_authenticate`);
    ``ssl_context``, when given, serves HTTPS.
    """

    def __init__(
        self,
        service: ApprovalService,
        authenticate: BearerAuthenticate,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        audit_directory: Path | None = None,
        metrics: MetricsText | None = None,
        access: AccessLookup | None = None,
    ) -> None:
        self._service = service
        self._access = access
        self._audit_directory = audit_directory
        self._metrics = metrics
        self._authenticate = authenticate
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, ssl=self._ssl, limit=_MAX_HEAD
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        log.info("admin API listening on %s:%s%s", host, port, " (TLS)" if self._ssl else "")
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (briefly), drop the rest."""
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            # A decision being stored should finish and report its event; only a client
            # that is slow to send its request is cut off.
            await asyncio.wait(set(self._connections), timeout=_CLOSE_GRACE)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    # --- one connection ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader), _REQUEST_TIMEOUT)
            except _HttpError as exc:
                await _respond(writer, exc.status, {"error": exc.message}, exc.headers)
                return
            except TimeoutError:
                await _respond(writer, HTTPStatus.REQUEST_TIMEOUT, {"error": "request timed out"})
                return
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            try:
                static = _console_file(request)
                if static is not None:
                    content_type, payload = static
                    await _send(writer, HTTPStatus.OK, payload, content_type, _CONSOLE_HEADERS)
                    return
                if request.path == "/metrics":
                    await self._scrape(request, writer)
                    return
                status, body = await self._dispatch(request)
                await _respond(writer, status, body)
            except _HttpError as exc:
                await _respond(writer, exc.status, {"error": exc.message}, exc.headers)
        except (ConnectionError, ssl.SSLError):
            pass
        except Exception:
            log.exception("admin API: unexpected error")
            with contextlib.suppress(Exception):
                await _respond(
                    writer, HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
                )
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _scrape(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        _allow(request, "GET")
        text = self._metrics() if self._metrics is not None else None
        if text is None:
            raise _HttpError(
                HTTPStatus.NOT_FOUND,
                "no metrics: the gateway counts statements in its audit recorder; "
                "set audit.directory to have them",
            )
        # A name from a JSON policy may hold a lone surrogate, which UTF-8 cannot carry: a
        # "?" in one label beats a scrape that fails until the policy changes.
        payload = text.encode("utf-8", "replace")
        await _send(writer, HTTPStatus.OK, payload, _METRICS_CONTENT_TYPE)

    async def _dispatch(self, request: _Request) -> tuple[HTTPStatus, dict[str, Any]]:
        parts = (
            [unquote(p) for p in request.path.strip("/").split("/")] if request.path != "/" else []
        )
        if parts == ["healthz"]:
            _allow(request, "GET")
            return HTTPStatus.OK, {"ok": True}
        if parts == ["me"]:
            _allow(request, "GET")
            principal = await self._principal(request)
            return HTTPStatus.OK, {
                "subject": principal.subject,
                "issuer": principal.issuer,
                "groups": sorted(principal.groups),
                "approver": self._service.is_approver(principal),
            }
        if parts == ["access"]:
            _allow(request, "POST")
            # Who is asking comes first: without a valid token, nothing about the policy.
            principal = await self._principal(request)
            return HTTPStatus.OK, await self._describe_access(principal, request)
        if parts and parts[0] == "sessions" and len(parts) <= 2:
            _allow(request, "GET")
            principal = await self._principal(request)
            try:
                self._service.require_approver(principal)
            except NotAnApprover as exc:
                raise _HttpError(HTTPStatus.FORBIDDEN, str(exc)) from exc
            return HTTPStatus.OK, await self._sessions(
                request, parts[1] if len(parts) == 2 else None
            )
        if not parts or parts[0] != "reviews" or len(parts) > 3:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {request.path}")
        if len(parts) == 3 and parts[2] not in ("approve", "deny"):
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {request.path}")
        _allow(request, "POST" if len(parts) == 3 else "GET")
        # Authenticate before looking anything up: nothing about reviews leaks to a
        # caller without a valid token, not even whether an id exists.
        principal = await self._principal(request)
        try:
            if len(parts) == 1:
                return HTTPStatus.OK, await self._list(principal, request)
            review_id = parts[1]
            if len(parts) == 2:
                review = await self._service.get(review_id)
                if not self._service.may_see(principal, review):
                    raise NotAnApprover(
                        f"{principal.subject} is not an approver and review {review_id} "
                        "is someone else's"
                    )
                return HTTPStatus.OK, review.to_json()
            return HTTPStatus.OK, await self._decide(principal, review_id, parts[2], request)
        except ReviewNotFound as exc:
            raise _HttpError(HTTPStatus.NOT_FOUND, str(exc)) from exc
        except NotAnApprover as exc:
            raise _HttpError(HTTPStatus.FORBIDDEN, str(exc)) from exc
        except ReviewConflict as exc:
            raise _HttpError(HTTPStatus.CONFLICT, str(exc)) from exc
        except (ApprovalError, ValueError) as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from exc

    async def _sessions(self, request: _Request, session_id: str | None) -> dict[str, Any]:
        """Recent sessions, or one session's replay, from the audit log (approvers only)."""
        directory = self._audit_directory
        if directory is None:
            raise _HttpError(
                HTTPStatus.NOT_FOUND, "the audit log is off: there are no sessions to replay"
            )
        if session_id is None:
            limits = request.query.get("limit", ["50"])
            if not limits[-1].isdigit():
                raise ValueError("limit must be a number")
            limit = min(int(limits[-1]), _MAX_SESSIONS)
            found = await asyncio.to_thread(
                _read_log, directory, lambda r: recent_sessions(r, limit=limit)
            )
            return {"sessions": found}
        session: dict[str, Any] | None = await asyncio.to_thread(
            _read_log, directory, lambda r: replay(r, session_id)
        )
        if session is None:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no session {session_id} in the audit log")
        return session

    async def _describe_access(self, principal: Principal, request: _Request) -> dict[str, Any]:
        """``POST /access``: what the caller itself may do with the relations it names."""
        lookup = self._access
        if lookup is None:
            raise _HttpError(
                HTTPStatus.NOT_FOUND, "this gateway does not describe access (no policy gate)"
            )
        try:
            database, relations = _access_request(_json_body(request))
        except ValueError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        try:
            report = await lookup(principal, database, relations)
        except AccessUnavailable as exc:
            raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from exc
        except ValueError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from exc
        return report.to_json()

    async def _principal(self, request: _Request) -> Principal:
        challenge = {"WWW-Authenticate": 'Bearer realm="querywarden"'}
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _HttpError(
                HTTPStatus.UNAUTHORIZED, "send Authorization: Bearer <token>", challenge
            )
        try:
            return await self._authenticate(token.strip())
        except AuthenticationFailed as exc:
            if exc.sqlstate == "08004":
                # The issuer's keys could not be fetched: the token may be fine, retry.
                raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, exc.message) from exc
            challenge = {"WWW-Authenticate": 'Bearer realm="querywarden", error="invalid_token"'}
            raise _HttpError(
                HTTPStatus.UNAUTHORIZED, f"token refused: {exc.message}", challenge
            ) from exc

    async def _list(self, principal: Principal, request: _Request) -> dict[str, Any]:
        states = request.query.get("state", [])
        state = states[-1] if states else None
        if state is not None and state not in {d.value for d in ReviewDecision}:
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                "state must be one of " + ", ".join(d.value for d in ReviewDecision),
            )
        reviews = await self._service.list(pending_only=state == ReviewDecision.PENDING)
        visible = [
            r.to_json()
            for r in reviews
            if (state is None or r.decision == state) and self._service.may_see(principal, r)
        ]
        return {"reviews": visible}

    async def _decide(
        self, principal: Principal, review_id: str, action: str, request: _Request
    ) -> dict[str, Any]:
        # Who is asking comes before what they sent: a non-approver learns nothing more.
        self._service.require_approver(principal)
        body = _json_body(request)
        allowed = {"comment", "uses", "ttl"} if action == "approve" else {"comment"}
        unknown = set(body) - allowed
        if unknown:
            raise ValueError(f"unknown fields for {action}: {', '.join(sorted(unknown))}")
        comment = body.get("comment")
        if not isinstance(comment, str) or not comment.strip():
            raise ValueError("comment is required: say why (the requester sees it)")
        if len(comment) > _MAX_COMMENT:
            raise ValueError(f"comment is longer than {_MAX_COMMENT} characters")
        uses = body.get("uses", 1)
        if not isinstance(uses, int) or isinstance(uses, bool):
            raise ValueError("uses must be an integer (-1: unlimited until the grant expires)")
        ttl: timedelta | None = None
        if body.get("ttl") is not None:
            try:
                ttl = _DURATION.validate_python(body["ttl"])
            except ValidationError as exc:
                raise ValueError(f"ttl: {exc.errors()[0]['msg']}") from exc
        review = await self._service.decide(
            review_id, principal, action == "approve", comment.strip(), uses=uses, ttl=ttl
        )
        log.info(
            "review %s %s by %s (%s)", review_id, review.decision.value, principal.subject, comment
        )
        return review.to_json()


def _read_log(directory: Path, view: Callable[[Any], Any]) -> Any:
    """``view`` over the audit log's records (in a worker thread: the log may be large)."""
    try:
        return view(read_records(directory))
    except (OSError, AuditFormatError) as exc:
        raise _HttpError(
            HTTPStatus.SERVICE_UNAVAILABLE, f"cannot read the audit log: {exc}"
        ) from exc


def _access_request(body: dict[str, Any]) -> tuple[str, list[AskedRelation]]:
    """The database and relations of a ``POST /access`` body; ValueError says what is wrong."""
    unknown = set(body) - {"database", "relations"}
    if unknown:
        raise ValueError(f"unknown fields for /access: {', '.join(sorted(unknown))}")
    database = body.get("database")
    if not isinstance(database, str) or not database or "\x00" in database:
        raise ValueError('database is required: {"database": "app", "relations": [...]}')
    if len(database.encode("utf-8", "surrogatepass")) > 63:
        raise ValueError("database is longer than a PostgreSQL name (63 bytes)")
    relations = body.get("relations")
    if not isinstance(relations, list):
        raise ValueError('relations is required: a list of "schema.table" names')
    if len(relations) > MAX_RELATIONS:
        raise ValueError(f"at most {MAX_RELATIONS} relations per request ({len(relations)} sent)")
    asked = []
    for item in relations:
        if isinstance(item, dict):
            extra = set(item) - {"relation", "columns"}
            if extra:
                raise ValueError(f"unknown fields for a relation: {', '.join(sorted(extra))}")
            asked.append(AskedRelation.parse(item.get("relation"), item.get("columns")))
        else:
            asked.append(AskedRelation.parse(item))
    return database, asked


def _console_file(request: _Request) -> tuple[str, bytes] | None:
    """The console file a GET under /console asks for (the page for any other path)."""
    path = request.path
    if path != "/console" and not path.startswith("/console/"):
        return None
    _allow(request, "GET")
    name = path.removeprefix("/console").strip("/")
    if name not in _CONSOLE_FILES:
        name = "index.html"  # /console, /console/reviews/<id>, /console/sessions/<id>
    payload = resources.files("querywarden.approvals").joinpath("console", name).read_bytes()
    return _CONSOLE_FILES[name], payload


# --- HTTP/1.1 framing ---------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> _Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise _HttpError(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
        ) from exc
    lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError as exc:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line") from exc
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.1 only")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        # Refused rather than half-supported: a body framing disagreement is how requests
        # get smuggled past proxies in front of us.
        raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "send the body with Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    length = int(length_text)
    if length > _MAX_BODY:
        raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {_MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    return _Request(method, url.path or "/", parse_qs(url.query), headers, body)


def _allow(request: _Request, method: str) -> None:
    if request.method != method:
        raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {method} here", {"Allow": method})


def _json_body(request: _Request) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


async def _respond(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode()
    await _send(writer, status, payload, "application/json; charset=utf-8", headers)


async def _send(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    payload: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> None:
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
    await writer.drain()
