"""Who is connecting: the Principal, and the verifiers that produce one from a token.

The client presents a short-lived token in the password slot of the wire protocol: an
OIDC JWT, a Kubernetes service-account token, a base64 SAML assertion, or a token of the
local development issuer. :class:`TokenAuthenticator` picks the trusted issuer the token
names, verifies it, and returns a :class:`Principal`. Everything downstream (policy,
masking, approvals, audit) keys off the Principal, never off the raw token.
"""

from querywarden.identity.principal import (
    MAX_SECRET_BYTES,
    Authenticator,
    Credentials,
    Principal,
    check_secret_shape,
)

__all__ = ["MAX_SECRET_BYTES", "Authenticator", "Credentials", "Principal", "check_secret_shape"]
