"""Signatures: OpenSSF model signing (the `model-signing` package, key-based ECDSA P-256) over a
version's file tree, and approvers' ECDSA P-256 signatures over promotions (k of n per risk tier).

The registry takes per-file signatures only (serialization method "files", what `sign_tree`
makes): then the signed statement lists every file with its digest, and a refusal can name the
file that does not match. A version's id is the statement's root digest (`root_digest`)."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from model_signing import hashing, signing, verifying

from gateway.audit.chain import canonical, iso_now, public_key_path


class RegistryRefusal(Exception):
    """A version or promotion that must not be installed; reason says why, naming the file or key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- keys


def generate_key(path: Path) -> None:
    """Write a new ECDSA P-256 private key to path (PEM PKCS8, mode 0600) and its public key to
    `<path>.pub`; FileExistsError rather than overwrite either."""
    path = Path(path)
    public = public_key_path(path)
    if public.exists():
        raise FileExistsError(f"{public} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(public, "xb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """The ECDSA P-256 public key in PEM bytes; ValueError when they hold anything else."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key")
    return key


def _key_id(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def key_id(public_key_pem: bytes) -> str:
    """The first 16 hex digits of sha256 of the key's DER SubjectPublicKeyInfo: names an approver's
    key in approval files; ValueError when the PEM is not an ECDSA P-256 public key."""
    return _key_id(_public_key(public_key_pem))


def _private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The unencrypted ECDSA P-256 private key at path; ValueError naming the file otherwise."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path}: not an ECDSA P-256 private key")
    return key


# ---------------------------------------------------------------- signed trees


def _statement(signature: Path) -> dict[str, Any]:
    """The in-toto statement a model-signing bundle signs (its signature not checked); ValueError
    when the file is not such a bundle of a per-file signature."""
    try:
        bundle = orjson.loads(Path(signature).read_bytes())
        statement = orjson.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        digest = statement["subject"][0]["digest"]["sha256"]
        method = statement["predicate"]["serialization"]["method"]
        resources = statement["predicate"]["resources"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a model-signing bundle ({type(e).__name__}: {e})") from None
    if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
        raise ValueError(f"not a model-signing bundle (root digest {digest!r})")
    if method != "files" or not isinstance(resources, list):
        raise ValueError(f"not a per-file model signature (serialization method {method!r})")
    return statement


def root_digest(signature: Path) -> str:
    """The version id a signature names: its statement's subject digest (over every file's digest);
    ValueError when the file is not a model-signing bundle."""
    return _statement(signature)["subject"][0]["digest"]["sha256"]


def sign_tree(tree: Path, signature: Path, private_key: Path) -> str:
    """Sign every file under tree (no symlinks) into signature, a Sigstore bundle; the root digest."""
    signing.Config().use_elliptic_key_signer(private_key=Path(private_key)).sign(Path(tree), Path(signature))
    return root_digest(signature)


def tree_changes(tree: Path, signature: Path) -> list[str]:
    """How tree differs from the files signature lists, one phrase per file, hashed as the
    signature says (its signature not checked); empty when tree is exactly what was signed."""
    statement = _statement(signature)
    serialization_ = statement["predicate"]["serialization"]
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    config = hashing.Config().set_ignored_paths(paths=serialization_.get("ignore_paths", []), ignore_git_paths=False)
    actual = {d.identifier: d.digest.digest_hex for d in config.use_file_serialization(
        hashing_algorithm=serialization_["hash_type"]).hash(Path(tree)).resource_descriptors()}
    return ([f"file {n} does not match its signed digest (tampered)"
             for n in sorted(signed.keys() & actual.keys()) if signed[n] != actual[n]]
            + [f"missing file: {n}" for n in sorted(signed.keys() - actual.keys())]
            + [f"extra file: {n}" for n in sorted(actual.keys() - signed.keys())])


def _refuse_links(tree: Path, signature: Path) -> None:
    """RegistryRefusal for a missing tree or signature, or a symlink in or as either: verification
    must read the files it names, not what a link points at."""
    if signature.is_symlink():
        raise RegistryRefusal(f"symbolic link as the signature: {signature.name}")
    if not signature.is_file():
        raise RegistryRefusal("unsigned: no signature file")
    if tree.is_symlink():
        raise RegistryRefusal(f"symbolic link as the version: {tree.name}")
    if not tree.is_dir():
        raise RegistryRefusal(f"no version tree at {tree}")
    for directory, dirs, files in os.walk(tree):
        for name in sorted(dirs + files):
            path = Path(directory, name)
            if path.is_symlink():
                raise RegistryRefusal(f"symbolic link in the version: {path.relative_to(tree)}")


def verify_tree(tree: Path, signature: Path, trusted: Mapping[str, Path]) -> str:
    """The root digest of tree when signature verifies under one of the trusted public keys (name ->
    PEM path) and tree is exactly the signed files; RegistryRefusal naming the file or key otherwise."""
    tree, signature = Path(tree), Path(signature)
    _refuse_links(tree, signature)
    try:
        digest = root_digest(signature)
    except ValueError as e:
        raise RegistryRefusal(f"the signature file is {e}") from None
    for name, public_key in trusted.items():
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key)).verify(tree, signature)
        except ValueError as e:
            if str(e).startswith("Key mismatch"):
                continue   # signed by another key: try the next trusted one
            if str(e).startswith("Signature mismatch"):
                raise RegistryRefusal("; ".join(tree_changes(tree, signature)) or str(e)) from None
            raise RegistryRefusal(f"the signature does not verify: {e}") from None
        except (InvalidSignature, KeyError, TypeError) as e:
            raise RegistryRefusal(f"the signature does not verify under {name}'s key (the bundle was altered: "
                                  f"{type(e).__name__})") from None
        return digest
    raise RegistryRefusal(f"signed by an unknown key (trusted: {', '.join(trusted) or 'none'})")


# ---------------------------------------------------------------- promotions


def sign_promotion(promotion: Mapping[str, Any], private_key: Path) -> dict[str, Any]:
    """An approval of promotion: {"key_id", "signature": base64 ECDSA P-256 SHA-256 over the
    promotion's canonical JSON, "approved_at"}. The signature covers model, stage, version and
    seq, so it approves exactly that promotion."""
    key = _private_key(private_key)
    signature = key.sign(canonical(promotion), ec.ECDSA(hashes.SHA256()))
    return {"key_id": _key_id(key.public_key()), "signature": base64.b64encode(signature).decode(),
            "approved_at": iso_now()}


def check_approvals(promotion: Mapping[str, Any], approvals: Iterable[Mapping[str, Any]],
                    approvers: Mapping[str, Path], required: int) -> list[str]:
    """The names (sorted) of the approvers (name -> public key PEM path) with a valid signature over
    promotion among approvals, each key counted once; RegistryRefusal when fewer than required.
    Approvals by unknown keys or with bad signatures count for nothing; the refusal names them."""
    keys = {}
    for name, path in approvers.items():
        public = _public_key(Path(path).read_bytes())
        keys[_key_id(public)] = (name, public)
    message, valid, ignored = canonical(promotion), set(), []
    for approval in approvals:
        kid = approval.get("key_id")
        known = keys.get(kid) if isinstance(kid, str) else None
        if known is None:
            ignored.append(f"unknown key {kid}")
            continue
        name, public = known
        try:
            public.verify(base64.b64decode(approval.get("signature", ""), validate=True), message,
                          ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            ignored.append(f"invalid signature by {name}")
            continue
        valid.add(name)
    if len(valid) < required:
        raise RegistryRefusal(f"k of n approvals: has {len(valid)} valid ({', '.join(sorted(valid)) or 'none'}), "
                              f"needs {required} of {len(approvers)}"
                              + (f"; ignored: {', '.join(ignored)}" if ignored else ""))
    return sorted(valid)
