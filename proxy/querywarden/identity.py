"""Who is connecting: the Principal and the authenticators that produce one.

The client presents a secret in the password slot of the wire protocol. An
:class:`Authenticator` turns it into a :class:`Principal` or raises
:class:`querywarden.errors.AuthenticationFailed`. Everything downstream (policy, masking,
approvals, audit) keys off the Principal, never off the raw secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
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
    issuer: str = ""
    display_name: str = ""
    expires_at: float | None = None  # POSIX time; None for credentials that do not expire


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client presented: the startup ``user`` and the password-slot secret."""

    user: str
    secret: bytes
    client_address: str


class Authenticator(Protocol):
    """Verifies a client's credentials."""

    async def authenticate(self, credentials: Credentials) -> Principal:
        """Return the Principal, or raise AuthenticationFailed with a reason that leaks nothing."""
        ...


@dataclass(frozen=True, slots=True)
class DevUser:
    """A configured test credential for the development authenticator."""

    password: str
    groups: tuple[str, ...] = ()


class DevPasswordAuthenticator:
    """Accepts configured user/password pairs. For development and tests only.

    It compares in constant time and says only that the pair was not accepted, never
    which half was wrong.
    """

    def __init__(self, users: Mapping[str, DevUser]) -> None:
        self._users = dict(users)

    async def authenticate(self, credentials: Credentials) -> Principal:
        """Check the pair against the configured users."""
        check_secret_shape(credentials.secret)
        user = self._users.get(credentials.user)
        expected = user.password.encode() if user else b"\0invalid"
        if not hmac.compare_digest(credentials.secret, expected) or user is None:
            raise AuthenticationFailed(
                f'password authentication failed for user "{credentials.user}"'
            )
        return Principal(
            subject=credentials.user, groups=frozenset(user.groups), issuer="dev-password"
        )


def check_secret_shape(secret: bytes) -> None:
    """Refuse empty and oversized secrets before any verifier looks at them."""
    if not secret:
        raise AuthenticationFailed("empty password: present a credential in the password field")
    if len(secret) > MAX_SECRET_BYTES:
        raise AuthenticationFailed(
            f"password field is {len(secret)} bytes, over the limit of {MAX_SECRET_BYTES}"
        )
