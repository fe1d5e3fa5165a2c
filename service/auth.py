"""Who is calling the jobs API: an API key (the service's operators: every job), a Supabase
user (a verified user JWT: only the jobs that user created), or nobody when no credential
is configured at all (local work).

Supabase signs a user's access token with the project's JWT secret (HS256; legacy and
still common) or with an asymmetric signing key whose public half is published at
SUPABASE_URL/auth/v1/.well-known/jwks.json (RS256 or ES256). Each algorithm is accepted
only with its own kind of key, so a token cannot pick the HMAC secret-as-public-key trick.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from service.errors import ConfigError, ServiceError

logger = logging.getLogger(__name__)

ASYMMETRIC = ("RS256", "ES256")
LEEWAY_SECONDS = 30
JWKS_REFRESH_SECONDS = 60
MAX_TOKEN_BYTES = 8192


class Unauthorized(ServiceError):
    """Send Authorization: Bearer <API key or Supabase user access token>."""

    code = "unauthorized"
    status = 401


class KeysUnavailable(ServiceError):
    """The project's signing keys (JWKS) could not be fetched; try again shortly."""

    code = "keys_unavailable"
    status = 503


@dataclass(frozen=True)
class Caller:
    """user_id is the Supabase user; None for an API key (or an open API)."""

    user_id: str | None = None


def bearer(headers: Any) -> str:
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def key_matches(headers: Any, keys: tuple[str, ...]) -> bool:
    """Whether the bearer token is one of the keys, comparing with every key in constant time."""
    given = bearer(headers).encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched and bool(given)


class UserTokens:
    """Verifies Supabase user access tokens with the JWT secret and/or the project's JWKS."""

    def __init__(self, secret: str | None, jwks_url: str | None, issuer: str | None) -> None:
        self.secret = secret
        self.issuer = issuer
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=600, timeout=5) if jwks_url else None
        self.refreshed_at = -math.inf

    @classmethod
    def from_config(cls, config: dict) -> UserTokens | None:
        secret, jwks_url = config.get("SUPABASE_JWT_SECRET"), config.get("SUPABASE_JWKS_URL")
        if not secret and not jwks_url:
            return None
        if secret and len(secret) < 32:
            raise ConfigError("SUPABASE_JWT_SECRET is too short (Supabase's are at least 32 characters)")
        base = config.get("SUPABASE_URL")
        return cls(secret, jwks_url, f"{base.rstrip('/')}/auth/v1" if base else None)

    def verify(self, token: str) -> str:
        """The user id (sub) of a valid user access token; Unauthorized saying why otherwise."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("the access token is too long")
        header = _header(token)
        algorithms = self._algorithms(header)
        try:
            claims = jwt.decode(token, self._key(header), algorithms=algorithms,
                                audience="authenticated", issuer=self.issuer, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the access token has expired") from None
        except jwt.PyJWKClientConnectionError as exc:
            logger.warning("JWKS unreachable: %s", exc, extra={"action": "verify_user_token"})
            raise KeysUnavailable() from None
        except jwt.PyJWKClientError as exc:
            raise Unauthorized(f"the access token's signing key is unknown: {exc}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the access token is not valid: {exc}") from None
        return _user_id(claims)

    def _algorithms(self, header: dict[str, Any]) -> list[str]:
        alg = header.get("alg")
        if alg == "HS256" and self.secret:
            return ["HS256"]
        if alg in ASYMMETRIC and self.jwks:
            return [alg]
        raise Unauthorized(f"access tokens signed with {alg!r} are not accepted here")

    def _key(self, header: dict[str, Any]) -> Any:
        if header.get("alg") == "HS256":
            return self.secret
        if self.jwks is None:
            raise Unauthorized("asymmetric access tokens are not accepted here")
        return self._signing_key(str(header.get("kid")))

    def _signing_key(self, kid: str) -> Any:
        """The key for kid from the cached JWKS. An unknown kid refetches the set (the project
        may have rotated its keys), but at most once a minute: a stream of made-up kids must
        not turn into a stream of requests to Supabase."""
        keys = {k.key_id: k for k in self.jwks.get_signing_keys()}
        if kid not in keys and time.monotonic() - self.refreshed_at > JWKS_REFRESH_SECONDS:
            self.refreshed_at = time.monotonic()
            keys = {k.key_id: k for k in self.jwks.get_signing_keys(refresh=True)}
        if kid not in keys:
            raise Unauthorized(f"the access token's signing key is unknown: {kid}")
        return keys[kid].key


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"the access token is not valid: {exc}") from None


def _user_id(claims: dict[str, Any]) -> str:
    if claims.get("role") != "authenticated":
        raise Unauthorized("the token is not a signed-in user's (role must be authenticated)")
    try:
        return str(uuid.UUID(str(claims["sub"])))
    except ValueError:
        raise Unauthorized("the token's subject is not a user id") from None


def credential_configured(config: Any) -> bool:
    """Whether the jobs API asks callers for anything: API keys, or Supabase user tokens
    (the same settings UserTokens.from_config reads)."""
    return any(config.get(name) for name in ("API_KEYS", "SUPABASE_JWT_SECRET", "SUPABASE_JWKS_URL"))


def authenticate(headers: Any, keys: tuple[str, ...], users: UserTokens | None) -> Caller:
    """The caller of a request; Unauthorized when a credential is configured and none fits."""
    if not keys and users is None:
        return Caller()
    if keys and key_matches(headers, keys):
        return Caller()
    token = bearer(headers)
    if users is not None and token.count(".") == 2:
        return Caller(users.verify(token))
    raise Unauthorized()
