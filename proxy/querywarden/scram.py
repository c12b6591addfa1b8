"""Sans-I/O client side of the upstream password exchanges: SCRAM-SHA-256 and md5.

SCRAM follows RFC 5802 with the SHA-256 hash of RFC 7677, as PostgreSQL implements it
(no channel binding: ``n,,`` as the GS2 header; the user name in the exchange is empty
because the server takes it from the StartupMessage).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from querywarden.errors import UpstreamError

MECHANISM = "SCRAM-SHA-256"


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The answer to AuthenticationMD5Password: 'md5' + md5(md5(password + user) + salt)."""
    # md5 is the protocol's own choice here, not ours.
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()  # noqa: S324
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()  # noqa: S324


class ScramClient:
    """One SCRAM-SHA-256 exchange: first message, final message, server signature check."""

    def __init__(self, password: str, nonce: str | None = None, username: str = "") -> None:
        self._password = password.encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = f"n={username},r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The client-first-message."""
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final-message for the server-first-message."""
        try:
            attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
            nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise UpstreamError("upstream sent a malformed SCRAM server-first-message") from exc
        if not nonce.startswith(self._nonce) or iterations < 1:
            raise UpstreamError("upstream SCRAM nonce or iteration count is invalid")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server's signature: proof that the server knows the password too."""
        text = server_final.decode(errors="replace")
        if not text.startswith("v="):
            raise UpstreamError("upstream SCRAM exchange failed")
        try:
            received = base64.b64decode(text[2:].split(",", 1)[0])
        except ValueError as exc:
            raise UpstreamError("upstream sent a malformed SCRAM server signature") from exc
        if not hmac.compare_digest(received, self._server_signature):
            raise UpstreamError("upstream SCRAM server signature does not match")
