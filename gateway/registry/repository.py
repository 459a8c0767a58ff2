"""Triton's model repository as registry-sync keeps it, and the state file that says what it holds.

Installed layout: `<repository>/<model>/<n>/` is a verified signed tree (the version's files, its
config.pbtxt and manifest.json; Triton ignores the extras), moved in whole by one rename from the
staging directory on the same filesystem, so the repository never holds a partial version.
`<repository>/<model>/config.pbtxt` is the newest version's config with a version_policy naming
exactly the installed versions and each version's registry manifest as a parameter (what the
gateway's `registry_manifest` reads); it is replaced atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.audit.chain import fsync_dir, iso_time, write_atomic
from gateway.backends.triton import MANIFEST_PARAMETER
from gateway.registry.manifest import FILE as MANIFEST

FORMAT = 1
CONFIG = "config.pbtxt"
HEADER = "# Written by `infergate registry sync` from the newest installed version's config; do not edit.\n"


class StateError(Exception):
    """The state file cannot be read; a person decides (registry-sync never guesses what is installed)."""


# ---------------------------------------------------------------- the state file


@dataclass
class Installed:
    """A version in the repository: the registry digest it was installed from and why it was trusted."""

    digest: str
    promotion_seq: int
    trained_at: str
    installed_at: str


@dataclass
class Pending:
    """An install between the rename into the repository and the state write that records it: after
    a crash, the version dir is adopted only if it is this digest and still verifies."""

    digest: str
    version: int
    stage: str
    promotion_seq: int
    trained_at: str


@dataclass
class Trusted:
    """The newest promotion acted on for a stage: installed, or installed and then rolled back."""

    seq: int
    digest: str


@dataclass
class ModelState:
    """One model's record: its installed versions by number, the promotion trusted per stage, an
    install in flight, and the next version number (never reused, so a number names one digest)."""

    installed: dict[int, Installed] = field(default_factory=dict)
    trusted: dict[str, Trusted] = field(default_factory=dict)
    pending: Pending | None = None
    next_version: int = 1

    def newest(self) -> int | None:
        """The highest installed version number."""
        return max(self.installed, default=None)

    def handled(self, stage: str, seq: int, digest: str) -> bool:
        """Whether this promotion was already acted on (installed, or installed and rolled back)."""
        trusted = self.trusted.get(stage)
        return (trusted is not None and (trusted.seq, trusted.digest) == (seq, digest)) or \
            any(v.digest == digest for v in self.installed.values())

    def rollback_reason(self, stage: str, seq: int, trained_at: str | None = None) -> str | None:
        """Why a promotion would roll the model back (None when it would not): its seq is not above
        the one already trusted for the stage, or (once its manifest is read) it was trained before
        the newest installed version."""
        trusted = self.trusted.get(stage)
        if trusted is not None and seq <= trusted.seq:
            return f"rollback: promotion seq {seq} is not newer than seq {trusted.seq} already trusted for stage {stage}"
        newest = self.newest()
        if trained_at is not None and newest is not None and \
                iso_time(trained_at) < iso_time(self.installed[newest].trained_at):
            return (f"rollback: trained_at {trained_at} is older than installed version {newest}'s "
                    f"{self.installed[newest].trained_at}")
        return None


@dataclass
class State:
    """What registry-sync installed, per model; written atomically after every change."""

    models: dict[str, ModelState] = field(default_factory=dict)

    def model(self, name: str) -> ModelState:
        return self.models.setdefault(name, ModelState())

    @classmethod
    def load(cls, path: Path) -> "State":
        """The state at path; an empty State when there is no file yet."""
        try:
            doc = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise StateError(f"{path}: cannot read the sync state: {e}") from e
        try:
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            return cls({name: ModelState(
                installed={int(n): Installed(**v) for n, v in m["installed"].items()},
                trusted={stage: Trusted(**t) for stage, t in m["trusted"].items()},
                pending=Pending(**m["pending"]) if m["pending"] else None,
                next_version=int(m["next_version"]),
            ) for name, m in doc["models"].items()})
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StateError(f"{path}: not a sync state file: {e!r}") from e

    def save(self, path: Path) -> None:
        """Replace the state file so that a crash leaves the old state or the new, durably."""
        doc = {"format": FORMAT, "models": {name: {
            "installed": {str(n): asdict(v) for n, v in sorted(m.installed.items())},
            "trusted": {stage: asdict(t) for stage, t in m.trusted.items()},
            "pending": asdict(m.pending) if m.pending else None,
            "next_version": m.next_version,
        } for name, m in self.models.items()}}
        write_atomic(Path(path), json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")


# ---------------------------------------------------------------- config.pbtxt


def render_config(text: str, model: str, manifests: Mapping[int, Mapping[str, Any]]) -> str:
    """The model config Triton loads: text (the newest version's config.pbtxt) named model, with a
    version_policy of exactly the manifests' versions, `trained_at` from the newest manifest and
    `infergate_manifest_<n>` (the manifest as JSON) per version; other parameters are kept."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(f"{CONFIG} does not parse: {e}") from None
    config.name = model
    config.version_policy.specific.versions[:] = sorted(manifests)
    for key in [k for k in config.parameters if k.startswith(MANIFEST_PARAMETER)]:
        del config.parameters[key]
    for n, manifest in manifests.items():
        config.parameters[f"{MANIFEST_PARAMETER}{n}"].string_value = json.dumps(manifest, sort_keys=True)
    if manifests:
        config.parameters["trained_at"].string_value = str(manifests[max(manifests)]["trained_at"])
    return HEADER + text_format.MessageToString(config)


# ---------------------------------------------------------------- the repository


class ModelRepository:
    """Triton's model repository and the staging directory beside it (same filesystem)."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = Path(root)
        self.staging = Path(staging)

    def versions(self, model: str) -> list[int]:
        """The version directories present for model, in order."""
        directory = self.root / model
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")

    def version_dir(self, model: str, n: int) -> Path:
        return self.root / model / str(n)

    def stage_dir(self, model: str, digest: str) -> Path:
        """A fresh directory under staging for one fetch."""
        self.staging.mkdir(parents=True, exist_ok=True)
        directory = self.staging / f"{model}-{digest}-{os.getpid()}"
        remove_tree(directory)
        return directory

    def clean_staging(self) -> list[Path]:
        """Remove everything an earlier run left under staging; what was removed."""
        if not self.staging.is_dir():
            return []
        leftovers = sorted(self.staging.iterdir())
        for path in leftovers:
            remove_tree(path)
        return leftovers

    def place(self, tree: Path, model: str, n: int) -> Path:
        """Move a verified staged tree in as version n with one rename (never a copy)."""
        target = self.version_dir(model, n)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tree, target)   # fails rather than merge when target exists
        fsync_dir(target.parent)
        return target

    def drop_caches(self, model: str, n: int) -> None:
        """Delete the bytecode caches (`__pycache__`) Triton's Python backend writes into a version
        it loads: they are no part of the signed tree, and Python makes them again."""
        for cache in sorted(self.version_dir(model, n).rglob("__pycache__"), reverse=True):
            remove_tree(cache)

    def manifest(self, model: str, n: int, digest: str) -> dict[str, Any]:
        """Version n's registry manifest as the model config carries it: the signed manifest.json plus the digest."""
        return {**json.loads((self.version_dir(model, n) / MANIFEST).read_bytes()), "digest": digest}

    def write_config(self, model: str, installed: Mapping[int, Installed]) -> bool:
        """Make `<model>/config.pbtxt` serve exactly the installed versions (no file when there are
        none); whether it changed."""
        path = self.root / model / CONFIG
        old = path.read_text() if path.exists() else None
        if not installed:
            if old is not None:
                path.unlink()
                fsync_dir(path.parent)
            return old is not None
        newest = max(installed)
        new = render_config((self.version_dir(model, newest) / CONFIG).read_text(), model,
                            {n: self.manifest(model, n, v.digest) for n, v in installed.items()})
        if new == old:
            return False
        write_atomic(path, new.encode())
        return True

    def remove(self, model: str, n: int) -> None:
        """Delete version n's directory (after Triton stopped serving it)."""
        remove_tree(self.version_dir(model, n))
        fsync_dir(self.root / model)


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
