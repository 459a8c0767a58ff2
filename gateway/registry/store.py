"""The registry as a directory tree (a mounted volume, or a bucket synced to one): the only
module that knows its paths.

    <root>/<model>/versions/<digest>/model/...       the signed tree (version files, config.pbtxt, manifest.json)
    <root>/<model>/versions/<digest>/model.sig       its OpenSSF model-signing bundle
    <root>/<model>/promotions/<stage>/<seq>.json     a promotion of a digest to a stage
    <root>/<model>/promotions/<stage>/<seq>.approvals/<key id>.json   approvers' signatures over it
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TREE, SIGNATURE = "model", "model.sig"


@dataclass(frozen=True)
class Promotion:
    """A request that a stage serve a version, with the approvals it has gathered."""

    model: str
    stage: str
    version: str            # the digest
    seq: int                # per model and stage, increasing: rollback protection compares it
    promoted_at: str
    requested_by: str
    approvals: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)   # exactly what approvers signed


class DirectoryStore:
    """Reads and writes one registry directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def versions(self, model: str) -> list[str]:
        versions = self.root / model / "versions"
        return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if versions.is_dir() else []

    def fetch(self, model: str, digest: str, into: Path) -> Path:
        """Copy a version's tree and signature into `into/model/` and `into/model.sig` (links are
        copied as links, never followed: verification refuses them)."""
        source = self.root / model / "versions" / digest
        if not source.is_dir():
            raise FileNotFoundError(f"the registry has no version {digest} of {model}")
        into.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / TREE, into / TREE, symlinks=True)
        if (source / SIGNATURE).is_file():
            shutil.copy2(source / SIGNATURE, into / SIGNATURE)
        return into

    def write_version(self, model: str, tree: Path, signature: Path, digest: str) -> bool:
        """Store a signed tree under its digest, atomically (copied beside, then renamed); False
        when that digest is already there (versions are immutable)."""
        versions = self.root / model / "versions"
        target = versions / digest
        if target.exists():
            return False
        versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=versions))
        shutil.copytree(tree, staging / TREE, symlinks=True)
        shutil.copy2(signature, staging / SIGNATURE)
        os.rename(staging, target)
        return True

    def promotions(self, model: str, stage: str) -> list[Promotion]:
        """A stage's promotions, oldest first."""
        directory = self.root / model / "promotions" / stage
        found = []
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            raw = json.loads(path.read_text())
            approvals_dir = path.with_suffix(".approvals")
            approvals = [json.loads(p.read_text()) for p in sorted(approvals_dir.glob("*.json"))] \
                if approvals_dir.is_dir() else []
            found.append(Promotion(raw["model"], raw["stage"], raw["version"], int(raw["seq"]), raw["promoted_at"],
                                   raw.get("requested_by", ""), approvals, raw))
        return sorted(found, key=lambda p: p.seq)

    def write_promotion(self, raw: dict[str, Any]) -> None:
        directory = self.root / raw["model"] / "promotions" / raw["stage"]
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{raw['seq']:06d}.json"
        if path.exists():
            raise FileExistsError(f"promotion {path} exists")
        _write(path, json.dumps(raw, sort_keys=True, indent=2).encode())

    def add_approval(self, promotion: Promotion, approval: dict[str, Any]) -> None:
        directory = self.root / promotion.model / "promotions" / promotion.stage / f"{promotion.seq:06d}.approvals"
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / f"{approval['key_id']}.json", json.dumps(approval, sort_keys=True).encode())


def _write(path: Path, data: bytes) -> None:
    """Write a small file whole (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
