"""registry-sync's config file (registry-sync.yaml): where signed versions come from, which Triton
repository they go to, whose signatures and approvals count, and which models follow which stage.
Errors name file, line and reason, as the gateway's own config does; paths are relative to the file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from gateway.audit.chain import load_key
from gateway.config import Audit, ConfigError, Problem, Strict, _dotted, _host_port, parse_file
from gateway.registry.signing import key_id


class Source(Strict):
    """The registry: a directory tree as `gateway.registry.store.DirectoryStore` reads it."""

    path: str = Field(min_length=1)


class Canary(Strict):
    """After a version is READY, propose it to a gateway route's target (the gateway's admin API
    starts that target's rollout over on it)."""

    admin: str = Field(min_length=1, description="the gateway's admin URL, e.g. http://127.0.0.1:9002")
    route: str = Field(min_length=1)
    target: str = Field(min_length=1)
    token_env: str | None = Field(default=None, description="environment variable holding the admin bearer token")


class Synced(Strict):
    """One model kept equal to the newest approved promotion of its stage."""

    stage: Literal["production", "staging"] = "production"
    canary: Canary | None = None


class SyncConfig(Strict):
    registry: Source
    repository: str = Field(min_length=1, description="Triton's model repository (Triton runs with explicit model control)")
    staging: str = Field(default="", description="default: <repository>.staging; must be on the repository's filesystem")
    triton: str = Field(description="host:port of Triton's gRPC endpoint")
    keep: int = Field(default=3, ge=1, description="versions kept installed per model")
    state: str = Field(default="", description="default: <repository>.sync-state.json")
    signers: dict[str, str] = Field(min_length=1, description="trusted model-signing public keys (PEM), by name")
    approvers: dict[str, str] = Field(default={}, description="approvers' public keys (PEM), by name")
    approvals: dict[str, int] = Field(min_length=1, description="approvals required per manifest risk_tier; "
                                                                 "a tier not listed is refused")
    models: dict[str, Synced] = Field(min_length=1)
    interval_s: float = Field(default=30.0, gt=0)
    load_timeout_s: float = Field(default=120.0, gt=0, description="how long Triton may take to make a version READY")
    audit: Audit | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("triton")
    @classmethod
    def _address(cls, v: str) -> str:
        return _host_port(v)

    @field_validator("approvals")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        if any(k < 0 for k in v.values()):
            raise ValueError("approval counts must be >= 0")
        return v


@dataclass(frozen=True)
class Settings:
    """The validated config with every path made absolute."""

    config: SyncConfig
    path: Path

    def resolve(self, value: str) -> Path:
        """A path from the config, relative to the config file."""
        return (self.path.parent / value).absolute()

    @property
    def registry(self) -> Path:
        return self.resolve(self.config.registry.path)

    @property
    def repository(self) -> Path:
        return self.resolve(self.config.repository)

    @property
    def staging(self) -> Path:
        return self.resolve(self.config.staging) if self.config.staging else self.repository.with_name(
            self.repository.name + ".staging")

    @property
    def state(self) -> Path:
        return self.resolve(self.config.state) if self.config.state else self.repository.with_name(
            self.repository.name + ".sync-state.json")

    @property
    def signers(self) -> dict[str, Path]:
        return {name: self.resolve(p) for name, p in self.config.signers.items()}

    @property
    def approvers(self) -> dict[str, Path]:
        return {name: self.resolve(p) for name, p in self.config.approvers.items()}


def load(path: str | Path) -> Settings:
    """Read and check registry-sync.yaml: types, then keys that must load, approval counts the
    approvers can meet, and a staging directory on the repository's filesystem."""
    config, doc = parse_file(path, SyncConfig)
    settings = Settings(config, Path(path))
    problems: list[Problem] = []

    def problem(loc: tuple[str | int, ...], reason: str) -> None:
        problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: {reason}"))

    for section, keys in (("signers", settings.signers), ("approvers", settings.approvers)):
        for name, key in keys.items():
            reason = _key_problem(key)
            if reason:
                problem((section, name), reason)
    for tier, needed in config.approvals.items():
        if needed > len(config.approvers):
            problem(("approvals", tier), f"{needed} approvals required but only {len(config.approvers)} approvers configured")
    if config.audit is not None and config.audit.signing_key:
        try:
            load_key(settings.resolve(config.audit.signing_key))
        except (OSError, ValueError) as e:
            problem(("audit", "signing_key"), str(getattr(e, "strerror", None) or e))
    if not settings.repository.is_dir():
        problem(("repository",), f"no such directory {str(settings.repository)!r}")
    elif _device(settings.staging) != _device(settings.repository):
        problem(("staging",) if config.staging else ("repository",),
                f"staging {str(settings.staging)!r} is not on the repository's filesystem (installs rename across them)")
    if problems:
        raise ConfigError(problems)
    return settings


def _key_problem(path: Path) -> str | None:
    """Why a public key file does not load; None when it does."""
    try:
        key_id(path.read_bytes())
    except OSError as e:
        return f"cannot read {str(path)!r}: {e.strerror}"
    except ValueError as e:
        return f"{str(path)!r} is not a usable public key: {e}"
    return None


def _device(path: Path) -> int:
    """The filesystem holding path, or the one it would be created on."""
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev
