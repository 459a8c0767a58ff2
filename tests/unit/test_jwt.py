"""JwtVerifier: real keys (RSA, EC P-256), tokens made with PyJWT, a JWKS file or an HTTPS JWKS
server whose certificate comes from a test CA; time from an injected clock."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import jwt
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import Jwt
from gateway.errors import Unauthenticated
from gateway.security.jwt import JwtVerifier

ISS = "https://idp.example"
AUD = "infergate"
T0 = 1_700_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Private keys by kid: 'r1', 'r2' and an impostor RSA key, and 'e1' on P-256."""
    return {"r1": rsa.generate_private_key(65537, 2048), "r2": rsa.generate_private_key(65537, 2048),
            "evil": rsa.generate_private_key(65537, 2048), "e1": ec.generate_private_key(ec.SECP256R1())}


def jwks(keys: dict[str, Any], *kids: str) -> dict[str, Any]:
    """The public JWKS for these kids."""
    def jwk(kid: str) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if kid.startswith("r") else jwt.algorithms.ECAlgorithm
        return {**algorithm.to_jwk(keys[kid].public_key(), as_dict=True), "kid": kid}
    return {"keys": [jwk(kid) for kid in kids]}


def token(key: Any, kid: str | None = "r1", alg: str = "RS256", drop: tuple[str, ...] = (), **claims: Any) -> str:
    """A token valid at T0 for 5 minutes, with these claims changed and `drop` removed."""
    payload = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(T0), "exp": int(T0) + 300, **claims}
    for name in drop:
        del payload[name]
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def spec(**kw: Any) -> Jwt:
    return Jwt(issuer=ISS, audience=[AUD], **({"jwks_file": "jwks.json"} | kw))


Started = Callable[..., Awaitable[JwtVerifier]]


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Started]:
    """Starts verifiers (with a fresh Clock unless given one) and closes them after the test."""
    made: list[JwtVerifier] = []

    async def start(config: Jwt | None = None, clock: Clock | None = None) -> JwtVerifier:
        verifier = JwtVerifier(config or spec(), tmp_path, clock or Clock())
        await verifier.start()
        made.append(verifier)
        return verifier

    yield start
    for verifier in made:
        await verifier.close()


@pytest.fixture
def jwks_file(tmp_path: Path, keys: dict[str, Any]) -> Callable[..., None]:
    """Writes jwks.json with the public keys of these kids."""
    return lambda *kids: (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys, *kids)))


def refused(verifier: JwtVerifier, tok: str, reason: str) -> None:
    with pytest.raises(Unauthenticated) as e:
        verifier.verify(tok)
    assert reason in e.value.message


async def eventually(check: Callable[[], Any], timeout: float = 3.0) -> Any:
    """check()'s first true value, asked again while it is false or raises Unauthenticated."""
    for _ in range(int(timeout / 0.02)):
        with contextlib.suppress(Unauthenticated):
            if value := check():
                return value
        await asyncio.sleep(0.02)
    return check()


async def test_rs256_and_es256_tokens_verify(started: Started, jwks_file, keys) -> None:
    jwks_file("r1", "e1")
    verifier = await started()
    who = verifier.verify(token(keys["r1"], groups=["ops"]))
    assert (who.name, who.via, who.groups, who.claims["iss"]) == ("alice", "jwt", {"ops"}, ISS)
    assert verifier.verify(token(keys["e1"], kid="e1", alg="ES256", sub="bob")).name == "bob"


@pytest.mark.parametrize("changes, reason", [
    ({"aud": "someone-else"}, "audience is not accepted"),
    ({"iss": "https://evil.example"}, "issuer is not accepted"),
    ({"exp": int(T0) - 31}, "bearer token expired"),
    ({"nbf": int(T0) + 31}, "not valid yet"),
    ({"sub": ""}, "'sub' claim must be a non-empty string"),
    ({"groups": 7}, "'groups' claim must be a string or a list of strings"),
    ({"exp": "tomorrow"}, "'exp' and 'nbf' claims must be numbers"),
])
async def test_claims_are_checked(started: Started, jwks_file, keys, changes, reason) -> None:
    jwks_file("r1")
    refused(await started(), token(keys["r1"], **changes), reason)


async def test_leeway_accepts_small_clock_skew(started: Started, jwks_file, keys) -> None:
    jwks_file("r1")
    verifier = await started()
    assert verifier.verify(token(keys["r1"], exp=int(T0) - 29, nbf=int(T0) + 29)).name == "alice"


@pytest.mark.parametrize("claim", ["sub", "exp", "iss", "aud"])
async def test_required_claims(started: Started, jwks_file, keys, claim) -> None:
    jwks_file("r1")
    refused(await started(), token(keys["r1"], drop=(claim,)), f"bearer token has no {claim!r} claim")


async def test_signature_and_algorithm_are_checked(started: Started, jwks_file, keys) -> None:
    jwks_file("r1", "e1")
    verifier = await started()
    refused(verifier, token(keys["evil"]), "signature is invalid")
    refused(verifier, token(None, alg="none"), "algorithm 'none' is not accepted")
    refused(verifier, token("s" * 32, alg="HS256"), "algorithm 'HS256' is not accepted")
    refused(verifier, token(keys["e1"], kid="r1", alg="ES256"), "algorithm does not match its key")
    refused(verifier, "not.a.jwt", "bearer token is malformed")


async def test_token_without_kid_needs_a_single_key(started: Started, jwks_file, keys, tmp_path) -> None:
    jwks_file("r1")
    assert (await started()).verify(token(keys["r1"], kid=None)).name == "alice"
    jwks_file("r1", "r2")
    refused(await started(), token(keys["r1"], kid=None), "unknown key None")


@pytest.mark.parametrize("groups, expected", [(["a", "b"], {"a", "b"}), ("a", {"a"}), (None, set())])
async def test_groups_claim_forms(started: Started, jwks_file, keys, groups, expected) -> None:
    jwks_file("r1")
    tok = token(keys["r1"], **({} if groups is None else {"groups": groups}))
    assert (await started()).verify(tok).groups == frozenset(expected)


async def test_cache_hit_is_the_same_principal_until_the_token_expires(started: Started, jwks_file, keys,
                                                                       monkeypatch) -> None:
    jwks_file("r1")
    clock = Clock()
    verifier = await started(clock=clock)
    tok = token(keys["r1"])
    first = verifier.verify(tok)
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: pytest.fail("a cache hit re-verified the token"))
    clock.now = T0 + 300 + 29          # past exp, within leeway
    assert verifier.verify(tok) is first
    monkeypatch.undo()
    clock.now = T0 + 300 + 30
    refused(verifier, tok, "bearer token expired")


async def test_file_rotation_is_picked_up_and_clears_the_cache(started: Started, jwks_file, keys, tmp_path,
                                                               caplog) -> None:
    jwks_file("r1")
    verifier = await started(spec(refresh_s=0.02))
    old, new = token(keys["r1"]), token(keys["r2"], kid="r2")
    verifier.verify(old)
    refused(verifier, new, "signed by unknown key 'r2'")
    jwks_file("r2")
    assert (await eventually(lambda: verifier.verify(new))).name == "alice"
    refused(verifier, old, "signed by unknown key 'r1'")
    (tmp_path / "jwks.json").write_text("{not json")
    await asyncio.sleep(0.1)
    assert verifier.verify(new).name == "alice"
    assert any(r.levelno == logging.WARNING and "keeping the previous keys" in r.message for r in caplog.records)


async def test_start_fails_when_the_file_cannot_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="jwks.json cannot be loaded"):
        await JwtVerifier(spec(), tmp_path).start()
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    with pytest.raises(RuntimeError, match="jwks.json cannot be loaded"):
        await JwtVerifier(spec(), tmp_path).start()


class JwksServer:
    """An HTTPS JWKS endpoint on 127.0.0.1 with a certificate from a test CA; counts fetches."""

    def __init__(self, tmp_path: Path, document: dict[str, Any]) -> None:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self.tls)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.document, self.fetches = document, 0
        self.runner: web.AppRunner | None = None

    async def _jwks(self, _: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.document)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.tls).start()

    def spec(self, **kw: Any) -> Jwt:
        return spec(jwks_file=None, jwks_url=f"https://127.0.0.1:{self.port}/jwks", jwks_ca="ca.pem", **kw)


@pytest.fixture
async def server(tmp_path: Path, keys) -> AsyncIterator[JwksServer]:
    served = JwksServer(tmp_path, jwks(keys, "r1"))
    yield served
    if served.runner is not None:
        await served.runner.cleanup()


async def test_https_jwks_rotation_via_unknown_kid(started: Started, server: JwksServer, keys) -> None:
    await server.start()
    clock = Clock()
    verifier = await started(server.spec(), clock)
    assert verifier.verify(token(keys["r1"])).name == "alice"
    server.document = jwks(keys, "r1", "r2")
    refused(verifier, token(keys["r2"], kid="r2"), "signed by unknown key 'r2'")
    assert (await eventually(lambda: verifier.verify(token(keys["r2"], kid="r2")))).name == "alice"
    assert server.fetches == 2
    refused(verifier, token(keys["r1"], kid="x"), "unknown key 'x'")   # within 10 s of the last ask: no fetch
    clock.now += 10
    refused(verifier, token(keys["r1"], kid="y"), "unknown key 'y'")   # one more fetch...
    refused(verifier, token(keys["r1"], kid="z"), "unknown key 'z'")   # ...not two
    assert await eventually(lambda: server.fetches == 3)
    await asyncio.sleep(0.1)
    assert server.fetches == 3


async def test_https_jwks_down_at_start(started: Started, server: JwksServer, keys, caplog) -> None:
    verifier = await started(server.spec(refresh_s=0.02))
    assert any(r.levelno == logging.ERROR and "refused until it loads" in r.message for r in caplog.records)
    tok = token(keys["r1"])
    refused(verifier, tok, "the issuer's keys are not loaded yet")
    await server.start()
    assert (await eventually(lambda: verifier.verify(tok))).name == "alice"


async def test_https_jwks_must_chain_to_the_given_ca(started: Started, server: JwksServer, keys, tmp_path) -> None:
    await server.start()
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    verifier = await started(server.spec())
    refused(verifier, token(keys["r1"]), "not loaded yet")
    assert server.fetches == 0


@pytest.mark.parametrize("value, expected", [(None, None), ("Bearer abc", "abc"), ("bearer  a.b.c ", "a.b.c")])
def test_bearer_header(value: str | None, expected: str | None) -> None:
    assert JwtVerifier.bearer(value) == expected


@pytest.mark.parametrize("value", ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "Bearer a b", "abc", ""])
def test_bearer_header_malformed(value: str) -> None:
    with pytest.raises(Unauthenticated, match="Bearer <token>"):
        JwtVerifier.bearer(value)
