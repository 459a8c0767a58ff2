"""TLS on the listeners (reloaded from disk without restarts) and from the gateway to backends.

Certificates rotate by replacing files (cert-manager, a Kubernetes Secret's symlink swap): the
files are polled, and a set that loads cleanly replaces the old one for new handshakes only, so
established connections carry on. aiohttp gets a context whose SNI callback (OpenSSL runs it on
every ClientHello, with or without SNI) moves each new connection to the current context; gRPC
gets dynamic credentials whose fetcher core asks for before each handshake.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from cryptography import x509

from gateway.config import BackendTls, ServerTls
from gateway.routing.state import signature

log = logging.getLogger(__name__)

# TLS 1.2 with forward-secret AEAD suites only; TLS 1.3 suites are all modern and stay as OpenSSL has them.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class _Material:
    """One consistent read of the files: what both servers are built from."""

    http: ssl.SSLContext
    grpc: Any  # grpc.ServerCertificateConfiguration
    not_after: float  # the server certificate's expiry, seconds since the epoch


class ListenerTls:
    """Loads a ServerTls spec's files, serves them to both listeners and reloads them on change."""

    def __init__(self, spec: ServerTls, base: Path, on_reload: Callable[[str, float], None] = lambda result, expiry: None) -> None:
        self.spec = spec
        self.paths = [base / spec.cert, base / spec.key] + ([base / spec.client_ca] if spec.client_ca else [])
        self._on_reload = on_reload
        self._seen = [signature(p) for p in self.paths]
        self.current = self._load()
        self._given: Any = None
        on_reload("ok", self.current.not_after)

    def _load(self) -> _Material:
        cert, key = self.paths[0], self.paths[1]
        ca = self.paths[2] if len(self.paths) > 2 else None
        context = server_context(cert, key, ca, self.spec.client_auth)
        context.sni_callback = self._to_current
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
        grpc_config = grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=ca.read_bytes() if ca and self.spec.client_auth != "none" else None)
        not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return _Material(context, grpc_config, not_after)

    def _to_current(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if context is not self.current.http:
            connection.context = self.current.http

    def http_context(self) -> ssl.SSLContext:
        """The context to give aiohttp: new connections switch to the newest loaded one."""
        return self.current.http

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials: gRPC core asks `_fetch` for the newest configuration per handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self.current.grpc, self._fetch, require_client_authentication=self.spec.client_auth == "require")

    def _fetch(self) -> Any:
        """Called by gRPC core: the configuration if it changed since last asked, else None."""
        material = self.current
        if material.grpc is self._given:
            return None
        self._given = material.grpc
        return material.grpc

    def reload(self) -> bool:
        """Re-read the files if any changed; a set that fails to load leaves the current one serving."""
        seen = [signature(p) for p in self.paths]
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            material = self._load()
        except (OSError, ssl.SSLError, ValueError) as e:
            log.error("TLS files changed but do not load (%s); the previous certificate stays in use", e)
            self._on_reload("rejected", self.current.not_after)
            return False
        self.current = material
        log.info("TLS certificate reloaded; it expires %s",
                 datetime.datetime.fromtimestamp(material.not_after, datetime.timezone.utc).isoformat())
        self._on_reload("ok", material.not_after)
        return True

    async def watch(self) -> None:
        """Poll the files every reload_s for the life of the server."""
        while True:
            await asyncio.sleep(self.spec.reload_s)
            self.reload()


def server_context(cert: Path, key: Path, client_ca: Path | None, client_auth: str) -> ssl.SSLContext:
    """An HTTP server context: TLS 1.2 or later, forward-secret AEAD ciphers, the client CA when
    clients present certificates. Raises OSError / ssl.SSLError for files that do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    if client_ca is not None and client_auth != "none":
        context.load_verify_locations(cafile=client_ca)
    context.verify_mode = _VERIFY[client_auth]
    return context


def channel_credentials(spec: BackendTls, base: Path) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Credentials (and channel options) for TLS, or mutual TLS, from the gateway to a backend."""
    read = lambda name: (base / name).read_bytes() if name else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(spec.ca), read(spec.key), read(spec.cert))
    options = [("grpc.ssl_target_name_override", spec.server_name)] if spec.server_name else []
    return credentials, options
