"""The caller's identity: a bearer token when one is sent and an issuer is configured, else the
client certificate the TLS handshake verified, else nobody (anonymous)."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.errors import Unauthenticated
from gateway.security.principal import Principal

if TYPE_CHECKING:
    from gateway.security.jwt import JwtVerifier


@lru_cache(maxsize=4096)
def cert_principal(cert: bytes) -> Principal:
    """The principal a verified client certificate (PEM or DER) names: its first URI SAN (a
    SPIFFE id), else its first DNS SAN, else its subject CN, else the whole subject."""
    try:
        parsed = x509.load_pem_x509_certificate(cert) if cert.startswith(b"-----BEGIN") else x509.load_der_x509_certificate(cert)
    except ValueError as e:  # TLS verified it, but cryptography cannot read it: no usable identity
        raise Unauthenticated(f"client certificate cannot be read: {e}") from None
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    for kind in (x509.UniformResourceIdentifier, x509.DNSName):
        names = san.get_values_for_type(kind) if san is not None else []
        if names:
            return Principal(names[0], "cert")
    common = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Principal(str(common[0].value) if common else parsed.subject.rfc4514_string(), "cert")


class Authenticator:
    """Turns what a request carries into a Principal (or None for no credentials)."""

    def __init__(self, jwt: "JwtVerifier | None") -> None:
        self.jwt = jwt

    def identify(self, cert: bytes | None, authorization: str | None) -> Principal | None:
        """A bad token is refused (Unauthenticated) rather than falling back to the certificate.
        Without a configured issuer the Authorization header is not ours and is ignored."""
        if self.jwt is not None and authorization:
            token = self.jwt.bearer(authorization)
            if token:
                return self.jwt.verify(token)
        return cert_principal(cert) if cert else None
