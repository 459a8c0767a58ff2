"""The registry as a directory tree (a mounted volume, or a bucket synced to one): the only module
that knows its paths, behind a small interface another store (S3) could offer too.

    <root>/<model>/versions/<digest>/model/...                     the signed tree (version files, config.pbtxt, manifest.json)
    <root>/<model>/versions/<digest>/model.sig                     its OpenSSF model-signing bundle
    <root>/<model>/promotions/<stage>/<seq:06d>.json               a promotion of a digest to a stage
    <root>/<model>/promotions/<stage>/<seq:06d>.approvals/<key id>.json   approvers' signatures over it

Versions are written whole (copied beside, then renamed) and never changed; promotions are created
once (hard-linked into place, so two promoters cannot both take a seq). Symlinks are copied as
links, never followed: verification refuses them.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import orjson

from gateway.audit.chain import iso_now, write_atomic
from gateway.registry.signing import root_digest, tree_changes

TREE, SIGNATURE = "model", "model.sig"   # a version's signed tree and its signature, as fetch lays them out
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_PROMOTION = re.compile(r"([0-9]{6,})\.json")
_FIELDS = {"model": str, "stage": str, "version": str, "seq": int, "promoted_at": str, "requested_by": str}


@dataclass(frozen=True)
class Promotion:
    """A request that a stage serve a version, with the approvals found beside it."""

    model: str
    stage: str
    version: str                        # the digest
    seq: int                            # per model and stage, increasing: rollback protection compares it
    promoted_at: str
    requested_by: str
    approvals: list[dict[str, Any]]
    raw: dict[str, Any]                 # the promotion file as stored: what approvers sign


def _name(text: str, what: str) -> str:
    """text when it is a safe single path component for a model or stage; ValueError otherwise."""
    if not isinstance(text, str) or not _NAME.fullmatch(text):
        raise ValueError(f"not a {what} name: {text!r}")
    return text


def _copy(source: Path, target: Path) -> None:
    """Copy a file or tree; links are copied as links."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target, follow_symlinks=False)


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in a file; ValueError naming the file otherwise."""
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return doc


class DirectoryStore:
    """One registry directory: its models, their immutable signed versions and their promotions."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _model(self, model: str) -> Path:
        return self.root / _name(model, "model")

    def _version(self, model: str, digest: str) -> Path:
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a version digest: {digest!r}")
        return self._model(model) / "versions" / digest

    def _stage(self, model: str, stage: str) -> Path:
        return self._model(model) / "promotions" / _name(stage, "stage")

    def models(self) -> list[str]:
        """The models the registry holds anything for."""
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir())

    def versions(self, model: str) -> list[str]:
        """The digests of the model's stored versions."""
        directory = self._model(model) / "versions"
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir()
                      if _DIGEST.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

    def fetch(self, model: str, digest: str, into: Path) -> Path:
        """Copy a version's tree and signature (where present) to `into/model/` and `into/model.sig`;
        into. FileNotFoundError when the registry has no such version."""
        source = self._version(model, digest)
        if not source.is_dir() or source.is_symlink():
            raise FileNotFoundError(f"the registry has no version {digest} of {model}")
        into = Path(into)
        into.mkdir(parents=True, exist_ok=True)
        for name in (TREE, SIGNATURE):
            if os.path.lexists(source / name):
                _copy(source / name, into / name)
        return into

    def write_version(self, model: str, tree: Path, signature: Path) -> str:
        """Store a signed tree under its digest, whole (copied beside, then renamed in); the digest.
        Storing the same content again changes nothing (the stored signature stays); FileExistsError
        when that digest holds other content."""
        tree, signature = Path(tree), Path(signature)
        digest = root_digest(signature)
        target = self._version(model, digest)
        if not os.path.lexists(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
            try:
                _copy(tree, incoming / TREE)
                _copy(signature, incoming / SIGNATURE)
                os.rename(incoming, target)
                return digest
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise   # else another writer stored it first: compare below
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        changes = tree_changes(target / TREE, signature)
        if changes:
            raise FileExistsError(f"{target} holds other content than version {digest}: {'; '.join(changes)}")
        return digest

    def promotions(self, model: str, stage: str) -> list[Promotion]:
        """The stage's promotions with their approvals, by seq; ValueError naming a malformed file."""
        directory = self._stage(model, stage)
        if not directory.is_dir():
            return []
        seqs = (_PROMOTION.fullmatch(p.name) for p in directory.iterdir())
        return sorted((self._promotion(model, stage, int(m[1])) for m in seqs if m), key=lambda p: p.seq)

    def _promotion(self, model: str, stage: str, seq: int) -> Promotion:
        path = self._stage(model, stage) / f"{seq:06d}.json"
        raw = _read_object(path)
        for key, kind in _FIELDS.items():
            if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
                raise ValueError(f"{path}: {key!r} must be a {kind.__name__}")
        if (raw["model"], raw["stage"], raw["seq"]) != (model, stage, seq) or not _DIGEST.fullmatch(raw["version"]):
            raise ValueError(f"{path}: not the promotion its path names (model, stage, seq) or no version digest")
        approvals = path.with_suffix(".approvals")
        found = [_read_object(p) for p in sorted(approvals.glob("*.json")) if _KEY_ID.fullmatch(p.stem)] \
            if approvals.is_dir() else []
        return Promotion(model, stage, raw["version"], seq, raw["promoted_at"], raw["requested_by"], found, raw)

    def write_promotion(self, model: str, stage: str, version: str, requested_by: str = "") -> Promotion:
        """A new promotion of version to stage, numbered after the newest one."""
        self._version(model, version)   # validates the digest
        directory = self._stage(model, stage)
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            existing = self.promotions(model, stage)
            seq = existing[-1].seq + 1 if existing else 1
            raw = {"model": model, "stage": stage, "version": version, "seq": seq, "promoted_at": iso_now(),
                   "requested_by": requested_by}
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")
                os.link(tmp, directory / f"{seq:06d}.json")   # fails rather than replace a promotion
                return self._promotion(model, stage, seq)
            except FileExistsError:
                continue   # another promoter took this seq: number after it
            finally:
                os.unlink(tmp)

    def add_approval(self, model: str, stage: str, seq: int, approval: Mapping[str, Any]) -> Promotion:
        """Store an approval (from `sign_promotion`) beside promotion seq, replacing that key's
        earlier one; the promotion as it now stands."""
        kid = approval.get("key_id")
        if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
            raise ValueError(f"not an approval key id: {kid!r}")
        path = self._stage(model, stage) / f"{seq:06d}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no promotion {seq} of {model} to {stage}")
        directory = path.with_suffix(".approvals")
        directory.mkdir(exist_ok=True)
        write_atomic(directory / f"{kid}.json", orjson.dumps(dict(approval), option=orjson.OPT_SORT_KEYS) + b"\n")
        return self._promotion(model, stage, seq)
