"""Signatures: OpenSSF model signing (the `model-signing` package, key-based ECDSA P-256) over a
version's file tree, and approvers' ECDSA signatures over promotions (k of n per risk tier)."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)


class RegistryRefusal(Exception):
    """A version (or promotion) that must not be installed, and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def generate_key(path: Path) -> None:
    """An ECDSA P-256 private key at path (PEM, 0600) and its public key at `<path>.pub`."""
    path, public = Path(path), Path(f"{path}.pub")
    for p in (path, public):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))


def key_id(public_key_pem: bytes) -> str:
    """16 hex digits naming a public key: of the SHA-256 of its DER SubjectPublicKeyInfo."""
    key = serialization.load_pem_public_key(public_key_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def sign_tree(tree: Path, signature: Path, private_key: Path) -> str:
    """Sign every file under tree into signature (a Sigstore bundle); the root digest."""
    from model_signing import signing

    signing.Config().use_elliptic_key_signer(private_key=str(private_key)).sign(str(tree), str(signature))
    return root_digest(signature)


def root_digest(signature: Path) -> str:
    """The version id: the signed statement's subject digest (over every file's digest)."""
    try:
        bundle = json.loads(Path(signature).read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        return str(statement["subject"][0]["digest"]["sha256"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RegistryRefusal(f"the signature file is not a model-signing bundle ({e!r})") from None


def verify_tree(tree: Path, signature: Path, trusted: Mapping[str, Path]) -> str:
    """Verify tree against signature with the trusted signers' public keys; the root digest, or
    RegistryRefusal naming the file or the key that does not check out."""
    from model_signing import verifying

    tree, signature = Path(tree), Path(signature)
    if not signature.is_file():
        raise RegistryRefusal("unsigned: no signature file")
    links = [p.relative_to(tree) for p in tree.rglob("*") if p.is_symlink()]
    if links:
        raise RegistryRefusal(f"symbolic link in the version: {links[0]}")
    digest = root_digest(signature)
    mismatch = None
    for name, public in trusted.items():
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=str(public)).verify(str(tree), str(signature))
            return digest
        except ValueError as e:
            message = str(e)
            if "Key mismatch" in message:
                continue
            mismatch = message
            break
        except Exception as e:  # noqa: BLE001 - the bundle library raises its own types for bad bundles
            raise RegistryRefusal(f"the signature does not verify: {type(e).__name__}: {e}") from None
    if mismatch is None:
        raise RegistryRefusal(f"signed by an unknown key (trusted: {', '.join(trusted) or 'none'})")
    raise RegistryRefusal(_mismatch_reason(mismatch))


def _mismatch_reason(message: str) -> str:
    """model-signing's mismatch message, said plainly with the file it names."""
    for marker, say in (("Missing files in model", "missing file"), ("Extra files found in model", "extra file")):
        if marker in message:
            return f"{say}: {message.split(':', 2)[-1].strip(' ]')}".replace("\"", "").replace("'", "")
    if "Hash mismatch for" in message:
        name = message.split("Hash mismatch for '", 1)[1].split("'", 1)[0]
        return f"file {name} does not match its signed digest (tampered)"
    return f"the signature does not verify: {message}"


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return orjson.dumps(dict(doc), option=orjson.OPT_SORT_KEYS)


def sign_promotion(promotion: Mapping[str, Any], private_key: Path) -> dict[str, Any]:
    """An approval: this key's ECDSA P-256 signature over the promotion's canonical JSON."""
    key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_key}: not an ECDSA private key")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign(_canonical(promotion), ec.ECDSA(hashes.SHA256()))
    return {"key_id": key_id(pem), "signature": base64.b64encode(signature).decode()}


def check_approvals(promotion: Mapping[str, Any], approvals: Iterable[Mapping[str, Any]],
                    approvers: Mapping[str, Path], required: int) -> list[str]:
    """The approvers (distinct keys) whose valid signatures the promotion carries; RegistryRefusal
    when fewer than required."""
    keys = {key_id(Path(p).read_bytes()): (name, serialization.load_pem_public_key(Path(p).read_bytes()))
            for name, p in approvers.items()}
    body, valid, ignored = _canonical(promotion), [], []
    for approval in approvals:
        known = keys.get(str(approval.get("key_id")))
        if known is None:
            ignored.append(f"unknown key {approval.get('key_id')}")
            continue
        name, public = known
        try:
            public.verify(base64.b64decode(str(approval.get("signature", ""))), body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            ignored.append(f"invalid signature by {name}")
            continue
        if name not in valid:
            valid.append(name)
    if len(valid) < required:
        extra = f"; ignored: {', '.join(ignored)}" if ignored else ""
        raise RegistryRefusal(f"k of n approvals: has {len(valid)} valid ({', '.join(valid) or 'none'}), "
                              f"needs {required} of {len(approvers)}{extra}")
    return valid
