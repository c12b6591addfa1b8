"""The gateway's exception tree.

Each error carries the SQLSTATE the client should see, so the I/O shell can turn any of
them into an ErrorResponse without guessing. A refused statement is *not* an exception:
it is a :class:`querywarden.hooks.Decision`.

::

    QuerywardenError
    ├── ProtocolViolation        the peer sent bytes that break the wire protocol (08P01)
    │   └── MessageTooLarge      (in codec) a message over the configured limit (54000)
    ├── AuthenticationFailed     the client's credentials were refused (28P01 / 28000)
    ├── EncodingRefused          (in encodings) text not read as the server would (0A000)
    └── UpstreamError            the database could not be reached or failed (08xxx)
"""

from __future__ import annotations


class QuerywardenError(Exception):
    """Base class: a message for the client and the SQLSTATE that goes with it."""

    default_sqlstate = "XX000"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate or self.default_sqlstate


class ProtocolViolation(QuerywardenError):
    """The remote peer broke the PostgreSQL wire protocol."""

    default_sqlstate = "08P01"


class TerminatedBeforeStartup(ProtocolViolation):
    """The client's first message was a Terminate: it ended before it started up.

    PostgreSQL reads those bytes as a start-up packet of an impossible length, logs that
    and hangs up without a word; a client that connects and ends at once (node-postgres)
    expects exactly that, and would raise an error it gets as unhandled. The gateway closes
    silently too. Any other bad first packet still gets a FATAL that says what is wrong.
    """


class AuthenticationFailed(QuerywardenError):
    """The client's credentials were refused. The message must never echo a secret."""

    default_sqlstate = "28P01"


class UpstreamError(QuerywardenError):
    """The upstream database could not be reached, refused the gateway, or went away."""

    default_sqlstate = "08006"
