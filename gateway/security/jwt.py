"""Bearer tokens (JWT) from any OIDC issuer: keys come from a JWKS file or HTTPS URL and are
refreshed in the background; `verify` is synchronous and caches each good token until it expires,
so the hot path pays a dict lookup, not a signature check."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import aiohttp
import jwt

from gateway.config import Jwt
from gateway.errors import Unauthenticated
from gateway.security.principal import Principal

log = logging.getLogger(__name__)

_CACHE_MAX = 10_000     # verified tokens kept; the oldest goes first
_KICK_S = 10.0          # unknown key ids trigger at most one early refetch per this many seconds
_RETRY_S = 5.0          # after a failed load, try again this soon (or refresh_s, if sooner)
_FETCH_TIMEOUT_S = 5.0

_REASONS: dict[type[jwt.PyJWTError], str] = {
    jwt.InvalidSignatureError: "bearer token signature is invalid",
    jwt.InvalidAudienceError: "bearer token audience is not accepted",
    jwt.InvalidIssuerError: "bearer token issuer is not accepted",
    jwt.InvalidAlgorithmError: "bearer token algorithm does not match its key",
    jwt.DecodeError: "bearer token is malformed",
}


def _reason(e: jwt.PyJWTError) -> str:
    """The client-facing reason a token failed PyJWT's checks."""
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"bearer token has no {e.claim!r} claim"
    return _REASONS.get(type(e), f"bearer token is invalid: {e}")


class JwtVerifier:
    """Turns a bearer token into a Principal, or refuses it with Unauthenticated and the reason."""

    def __init__(self, spec: Jwt, base: Path, clock: Callable[[], float] = time.time) -> None:
        self._spec = spec
        self._file = base / spec.jwks_file if spec.jwks_file else None
        self._ca = str(base / spec.jwks_ca) if spec.jwks_ca else None
        self._source = str(self._file or spec.jwks_url)
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._jwks: Any = None                           # the key set in force, as parsed JSON
        self._seen: tuple[int, int, int] | None = None   # the file's inode, mtime and size when read
        self._cache: dict[str, tuple[float, Principal]] = {}  # token -> (exp, principal)
        self._kicked = -math.inf
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the keys and start refreshing them. A JWKS file must load now; a URL may be down
        (tokens are refused until its keys arrive, and it is retried in the background)."""
        if self._file is not None:
            try:
                await self._load()
            except Exception as e:
                raise RuntimeError(f"JWKS file {self._file} cannot be loaded: {type(e).__name__}: {e}") from e
            ok = True
        else:
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=self._ca))
            self._session = aiohttp.ClientSession(connector=connector,
                                                  timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S))
            ok = await self._refresh()
        self._task = asyncio.create_task(self._run(ok))

    async def close(self) -> None:
        """Stop refreshing and close the HTTP session."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, ok: bool) -> None:
        """Refresh every refresh_s (sooner after a failure, or when an unknown key id asks)."""
        while True:
            delay = self._spec.refresh_s if ok else min(self._spec.refresh_s, _RETRY_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            ok = await self._refresh()

    async def _refresh(self) -> bool:
        """Load the key set; on any failure keep the one in force and say why."""
        try:
            await self._load()
            return True
        except Exception as e:  # noqa: BLE001 - the refresher must outlive any bad answer
            level = logging.WARNING if self._keys else logging.ERROR
            log.log(level, "JWKS from %s not loaded (%s: %s); %s", self._source, type(e).__name__, e,
                    "keeping the previous keys" if self._keys else "bearer tokens are refused until it loads")
            return False

    async def _load(self) -> None:
        """Read the file (when it changed) or fetch the URL; install the keys if they differ."""
        seen = None
        if self._file is not None:
            st = self._file.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen == self._seen:
                return
            data = json.loads(self._file.read_bytes())
        else:
            assert self._session is not None and self._spec.jwks_url is not None
            async with self._session.get(self._spec.jwks_url) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
        if data != self._jwks:
            keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(data).keys
                    if k.algorithm_name in self._spec.algorithms and k.public_key_use in (None, "sig")}
            if not keys:
                raise ValueError(f"no signing keys for {', '.join(self._spec.algorithms)}")
            self._keys, self._jwks = keys, data
            self._cache.clear()
            log.info("JWKS from %s: keys %s", self._source, ", ".join(repr(kid) for kid in keys))
        self._seen = seen

    def verify(self, token: str) -> Principal:
        """The caller a bearer token proves; Unauthenticated with the reason when it proves none."""
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            if hit[0] > now - self._spec.leeway_s:
                return hit[1]
            del self._cache[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("bearer token is malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._spec.algorithms:
            raise Unauthenticated(f"bearer token algorithm {alg!r} is not accepted")
        key = next(iter(self._keys.values())) if kid is None and len(self._keys) == 1 else self._keys.get(kid)
        if key is None:
            self._kick(now)
            raise Unauthenticated(f"bearer token signed by unknown key {kid!r}" if self._keys
                                  else "bearer token cannot be checked: the issuer's keys are not loaded yet")
        spec = self._spec
        try:
            claims = jwt.decode(token, key, algorithms=spec.algorithms, audience=spec.audience, issuer=spec.issuer,
                                options={"require": ["exp", "iss", "aud", spec.principal_claim],
                                         # times are checked below against our own clock
                                         "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.PyJWTError as e:
            raise Unauthenticated(_reason(e)) from None
        exp, nbf = claims["exp"], claims.get("nbf", -math.inf)
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (exp, nbf)):
            raise Unauthenticated("bearer token 'exp' and 'nbf' claims must be numbers")
        if exp <= now - spec.leeway_s:
            raise Unauthenticated("bearer token expired")
        if nbf > now + spec.leeway_s:
            raise Unauthenticated("bearer token is not valid yet")
        principal = Principal(self._name(claims), via="jwt", groups=self._groups(claims),
                              claims=MappingProxyType(claims))
        if len(self._cache) >= _CACHE_MAX:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = (exp, principal)
        return principal

    def _name(self, claims: dict[str, Any]) -> str:
        """The principal claim, which must be a non-empty string."""
        name = claims[self._spec.principal_claim]
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"bearer token {self._spec.principal_claim!r} claim must be a non-empty string")
        return name

    def _groups(self, claims: dict[str, Any]) -> frozenset[str]:
        """The groups claim: a list of strings or one string; none when absent."""
        groups = claims.get(self._spec.groups_claim, ())
        groups = (groups,) if isinstance(groups, str) else groups
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) for g in groups):
            raise Unauthenticated(f"bearer token {self._spec.groups_claim!r} claim must be a string or a list of strings")
        return frozenset(groups)

    def _kick(self, now: float) -> None:
        """Ask the refresher for the key set now, at most once per _KICK_S (a rotation may be under way)."""
        if now - self._kicked >= _KICK_S:
            self._kicked = now
            self._wake.set()

    @staticmethod
    def bearer(header_value: str | None) -> str | None:
        """The token in an `Authorization: Bearer <token>` value; None when there is no header."""
        if header_value is None:
            return None
        scheme, _, token = header_value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthenticated("Authorization header must be 'Bearer <token>'")
        return token
