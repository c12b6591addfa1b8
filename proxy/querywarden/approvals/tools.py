"""``querywarden reviews list | show | approve | deny``: the CLI over the admin API.

Each command is a plain function that talks to the API, prints to the streams it is given
and returns the exit code (0 done, 1 refused by the API, 2 the API could not be asked), so
tests call it directly; :func:`add_review_commands` wires them into an argparse tree.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

__all__ = [
    "AdminClient",
    "AdminClientError",
    "add_review_commands",
    "approve_command",
    "deny_command",
    "list_command",
    "show_command",
]

DEFAULT_URL = "http://127.0.0.1:6433"
URL_ENV = "QUERYWARDEN_ADMIN_URL"
TOKEN_ENV = "QUERYWARDEN_TOKEN"  # noqa: S105 - the variable's name, not a secret
_TIMEOUT = 15.0
_TEXT_WIDTH = 60


class AdminClientError(Exception):
    """The API answered with an error (``status``) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class AdminClient:
    """A small blocking client of the admin API (the CLI has no event loop to share)."""

    url: str
    token: str
    cacert: Path | None = None
    timeout: float = _TIMEOUT

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; the decoded JSON answer, or :class:`AdminClientError`."""
        base = self.url.rstrip("/")
        scheme = urlsplit(base).scheme
        if scheme not in ("http", "https"):
            raise AdminClientError(0, f"the admin URL must be http:// or https://, not {base!r}")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        context = None
        if scheme == "https":
            context = ssl.create_default_context(
                cafile=str(self.cacert) if self.cacert is not None else None
            )
        try:
            with urllib.request.urlopen(  # noqa: S310 - scheme checked above
                request, timeout=self.timeout, context=context
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminClientError(exc.code, _error_message(exc)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminClientError(0, f"cannot reach the admin API at {base}: {reason}") from exc
        except json.JSONDecodeError as exc:
            raise AdminClientError(0, f"the admin API at {base} did not answer JSON") from exc


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        message = body.get("error") if isinstance(body, dict) else None
    except (OSError, ValueError):
        message = None
    return f"{exc.code} {exc.reason}: {message or 'no detail'}"


# --- commands -----------------------------------------------------------------------------


def list_command(
    client: AdminClient, out: TextIO, err: TextIO, *, show_all: bool = False, as_json: bool = False
) -> int:
    """Print pending reviews (all of them with ``show_all``), oldest first."""
    path = "/reviews" if show_all else "/reviews?state=pending"
    try:
        reviews: list[dict[str, Any]] = client.request("GET", path)["reviews"]
    except AdminClientError as exc:
        return _fail(exc, err)
    if as_json:
        print(json.dumps(reviews, indent=2, ensure_ascii=False), file=out)
        return 0
    if not reviews:
        print("no reviews" if show_all else "no pending reviews", file=out)
        return 0
    now = datetime.now(UTC)
    rows = [("ID", "AGE", "STATE", "REQUESTER", "DATABASE", "RULE", "STATEMENT")]
    rows += [
        (
            r["id"],
            _age(now, r["created"]),
            r["decision"],
            r["requester"]["subject"],
            r["database"],
            r["rule"] or "-",
            _short(r["statement"]),
        )
        for r in reviews
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)
    return 0


def show_command(
    client: AdminClient, review_id: str, out: TextIO, err: TextIO, *, as_json: bool = False
) -> int:
    """Print one review in full."""
    try:
        review = client.request("GET", f"/reviews/{quote(review_id, safe='')}")
    except AdminClientError as exc:
        return _fail(exc, err)
    if as_json:
        print(json.dumps(review, indent=2, ensure_ascii=False), file=out)
        return 0
    _print_review(review, out)
    return 0


def approve_command(
    client: AdminClient,
    review_id: str,
    comment: str,
    out: TextIO,
    err: TextIO,
    *,
    uses: int | None = None,
    ttl: str | None = None,
    as_json: bool = False,
) -> int:
    """Approve a pending review: a grant of ``uses`` runs (default 1) for ``ttl``."""
    body: dict[str, Any] = {"comment": comment}
    if uses is not None:
        body["uses"] = uses
    if ttl is not None:
        body["ttl"] = ttl
    return _decide(client, review_id, "approve", body, out=out, err=err, as_json=as_json)


def deny_command(
    client: AdminClient,
    review_id: str,
    comment: str,
    out: TextIO,
    err: TextIO,
    *,
    as_json: bool = False,
) -> int:
    """Deny a pending review; the requester sees the comment."""
    return _decide(
        client, review_id, "deny", {"comment": comment}, out=out, err=err, as_json=as_json
    )


def _decide(
    client: AdminClient,
    review_id: str,
    action: str,
    body: dict[str, Any],
    *,
    out: TextIO,
    err: TextIO,
    as_json: bool,
) -> int:
    try:
        review = client.request("POST", f"/reviews/{quote(review_id, safe='')}/{action}", body)
    except AdminClientError as exc:
        return _fail(exc, err)
    if as_json:
        print(json.dumps(review, indent=2, ensure_ascii=False), file=out)
    elif review["decision"] == "approved":
        print(f"approved {review['id']}: {_grant(review)}", file=out)
    else:
        print(f"{review['decision']} {review['id']}", file=out)
    return 0


def _fail(exc: AdminClientError, err: TextIO) -> int:
    print(f"querywarden: {exc.message}", file=err)
    return 2 if exc.status == 0 else 1


# --- formatting ---------------------------------------------------------------------------


def _print_review(review: dict[str, Any], out: TextIO) -> None:
    requester = review["requester"]
    summary = review.get("summary") or {}
    lines = [
        ("review", f"{review['id']}  {review['decision']}"),
        ("requester", _party(requester)),
        ("database", review["database"]),
        ("rule", review["rule"] or "-"),
        ("reason", review["reason"] or "-"),
        ("operations", ", ".join(summary.get("operations") or []) or "-"),
        ("writes", ", ".join(summary.get("writes") or []) or "-"),
        ("reads", ", ".join(summary.get("reads") or []) or "-"),
        ("estimate", "-" if review.get("estimate") is None else f"{review['estimate']} rows"),
        ("created", review["created"]),
    ]
    if review.get("decided"):
        lines.append(("decided", review["decided"]))
    if review.get("approver"):
        lines.append(("approver", _party(review["approver"])))
    if review.get("comment"):
        lines.append(("comment", review["comment"]))
    if review["decision"] == "approved":
        lines.append(("grant", _grant(review)))
        if review.get("usedAt"):
            lines.append(("used at", ", ".join(review["usedAt"])))
    for label, value in lines:
        print(f"{label + ':':<12}{value}", file=out)
    print("statement:", file=out)
    for line in review["statement"].splitlines() or [""]:
        print(f"  {line}", file=out)
    for n, value in enumerate(review.get("parameters") or [], start=1):
        print(
            f"  ${n} = {'NULL' if value is None else json.dumps(value, ensure_ascii=False)}",
            file=out,
        )


def _party(party: dict[str, Any]) -> str:
    groups = ", ".join(party.get("groups") or [])
    issuer = f" via {party['issuer']}" if party.get("issuer") else ""
    return f"{party['subject']}{issuer}" + (f" (groups: {groups})" if groups else "")


def _grant(review: dict[str, Any]) -> str:
    uses = review.get("usesLeft", 0)
    left = {-1: "any number of runs", 0: "used up", 1: "1 run left"}.get(uses, f"{uses} runs left")
    return f"{left}, until {review.get('grantExpires')}"


def _age(now: datetime, created: str) -> str:
    seconds = max(0, int((now - datetime.fromisoformat(created)).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TEXT_WIDTH else flat[: _TEXT_WIDTH - 1] + "…"


# --- argparse -----------------------------------------------------------------------------


def _uses(text: str) -> int:
    if text == "unlimited":
        return -1
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number, or 'unlimited' (-1)") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError("a positive number, or 'unlimited' (-1)")
    return value


def add_review_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reviews list | show ID | approve ID | deny ID``.

    Each leaf sets ``handler`` (``Callable[[argparse.Namespace], int]``) to run it.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help=f"the admin API (default ${URL_ENV}, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        help=f"your token, from an issuer the policy trusts (default ${TOKEN_ENV}; the "
        "environment keeps it out of the process list)",
    )
    common.add_argument("--cacert", type=Path, help="CA bundle for an https:// admin API")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    reviews = subparsers.add_parser("reviews", help="list, show, approve and deny held statements")
    commands = reviews.add_subparsers(dest="reviews_command", required=True)
    listing = commands.add_parser("list", parents=[common], help="list pending reviews")
    listing.add_argument("--all", action="store_true", help="include decided reviews")
    listing.set_defaults(handler=_handle_list)
    show = commands.add_parser("show", parents=[common], help="show one review in full")
    show.add_argument("id", help="the review id")
    show.set_defaults(handler=_handle_show)
    approve = commands.add_parser("approve", parents=[common], help="let the statement run")
    approve.add_argument("id", help="the review id")
    approve.add_argument("--comment", required=True, help="why (recorded and shown)")
    approve.add_argument(
        "--uses",
        type=_uses,
        metavar="N",
        help="runs the grant allows (default 1; 'unlimited' or -1: any until it expires)",
    )
    approve.add_argument("--ttl", help="how long the grant lasts, e.g. 30m (default grantTTL)")
    approve.set_defaults(handler=_handle_approve)
    deny = commands.add_parser("deny", parents=[common], help="refuse the statement")
    deny.add_argument("id", help="the review id")
    deny.add_argument("--comment", required=True, help="why (the requester sees it)")
    deny.set_defaults(handler=_handle_deny)


def _client(args: argparse.Namespace) -> AdminClient | None:
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"querywarden: no token: pass --token or set {TOKEN_ENV}", file=sys.stderr)
        return None
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    return AdminClient(url=url, token=token.strip(), cacert=args.cacert)


def _handle_list(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2
    return list_command(client, sys.stdout, sys.stderr, show_all=args.all, as_json=args.json)


def _handle_show(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2
    return show_command(client, args.id, sys.stdout, sys.stderr, as_json=args.json)


def _handle_approve(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2
    return approve_command(
        client,
        args.id,
        args.comment,
        sys.stdout,
        sys.stderr,
        uses=args.uses,
        ttl=args.ttl,
        as_json=args.json,
    )


def _handle_deny(args: argparse.Namespace) -> int:
    client = _client(args)
    if client is None:
        return 2
    return deny_command(client, args.id, args.comment, sys.stdout, sys.stderr, as_json=args.json)
