"""The Principal, the presented credentials, and the Authenticator protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from querywarden.errors import AuthenticationFailed

#: Longest password-slot value we look at; longer ones are refused before any parsing.
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified identity."""

    subject: str
    groups: frozenset[str] = frozenset()
    #: The name of the trusted issuer (from the policy) that vouched for it.
    issuer: str = ""
    display_name: str = ""
    #: POSIX time after which the connection must end; None if the credential never expires.
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client presented at start-up."""

    #: The ``user`` start-up parameter (informational: the token says who the client is).
    user: str
    #: The password-slot value.
    secret: bytes
    client_address: str
    #: The client's TLS certificate (DER), when it presented one.
    client_certificate: bytes | None = None


class Authenticator(Protocol):
    """Verifies a client's credentials."""

    async def authenticate(self, credentials: Credentials) -> Principal:
        """Return the Principal, or raise AuthenticationFailed with a reason that leaks nothing."""
        ...


def check_secret_shape(secret: bytes) -> None:
    """Refuse empty and oversized secrets before any verifier looks at them."""
    if not secret:
        raise AuthenticationFailed("empty password: present a token in the password field")
    if len(secret) > MAX_SECRET_BYTES:
        raise AuthenticationFailed(
            f"password field is {len(secret)} bytes, over the limit of {MAX_SECRET_BYTES}"
        )
