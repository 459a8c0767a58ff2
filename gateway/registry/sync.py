"""registry-sync: a process of its own, never in the request path, that makes what Triton serves
equal what was signed and approved, and nothing else.

Each pass, under an exclusive lock on the state file: clear what a crash left (staging, version
dirs the state does not record), make Triton serve exactly the installed versions, then per model
take the newest promotion of its stage and, unless already acted on, fetch it into staging, verify
its signature against the trusted signers, its approvals against the manifest's risk tier and that
it rolls nothing back, rename it into the repository, rewrite the model config, load it and wait
for READY, drop versions beyond `keep` and propose the new version to a gateway canary. Anything
refused leaves Triton's repository and loaded models as they were. Every action is an Event:
logged, audited (stream "registry-sync") and counted.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from gateway.audit.chain import iso_from_unix, iso_now, load_or_create_key
from gateway.audit.log import AuditLog
from gateway.config import ConfigError
from gateway.registry.manifest import FILE as MANIFEST
from gateway.registry.manifest import Manifest
from gateway.registry.repository import Installed, ModelRepository, Pending, State, StateError, Trusted, remove_tree
from gateway.registry.settings import Settings, Synced, load
from gateway.registry.signing import RegistryRefusal, check_approvals, verify_tree
from gateway.registry.store import SIGNATURE, TREE, DirectoryStore, Promotion
from gateway.registry.triton import Repository, TritonError

log = logging.getLogger(__name__)

FAILPOINT_ENV = "INFERGATE_REGISTRY_FAILPOINT"
PROPOSE_TIMEOUT_S = 10.0
PROBLEMS = ("refused", "failed")   # actions a daemon reports once while they repeat


def _failpoint(name: str) -> None:
    """Test hook for the crash tests: exit at once, as a crash would, at the point named by
    INFERGATE_REGISTRY_FAILPOINT (fetched, verified, renamed, config_written, loaded)."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os._exit(137)


class SyncError(Exception):
    """A request registry-sync cannot carry out (e.g. a rollback with nothing to go back to)."""


@dataclass(frozen=True)
class Event:
    """One registry-sync action; also the audit entry for it. version is the registry digest,
    triton_version the version number in Triton's repository."""

    action: str
    model: str
    version: str = ""
    triton_version: str = ""
    reason: str = ""
    time: float = field(default_factory=time.time)

    def render(self) -> dict[str, Any]:
        return {"type": "registry", "time": iso_from_unix(self.time), "action": self.action, "model": self.model,
                "version": self.version, "triton_version": self.triton_version, "reason": self.reason}


class Syncer:
    """One registry-sync process: `run_once` for a pass, `run_forever` for the daemon, `rollback`."""

    def __init__(self, settings: Settings, stream: str = "registry-sync") -> None:
        self.settings = settings
        self.config = settings.config
        self.store = DirectoryStore(settings.registry)
        self.repository = ModelRepository(settings.repository, settings.staging)
        self.triton = Repository(self.config.triton)
        self.state = State()
        self.metrics = CollectorRegistry()
        self._actions = Counter("infergate_registry_actions_total", "registry-sync actions by model and action",
                                ["model", "action"], registry=self.metrics)
        self._installed = Gauge("infergate_registry_installed_version",
                                "The newest version registry-sync installed, by model", ["model"], registry=self.metrics)
        self._audit: AuditLog | None = None
        audit = self.config.audit
        if audit is not None:
            directory = settings.resolve(audit.dir)
            key = settings.resolve(audit.signing_key) if audit.signing_key else directory / "signing-key.pem"
            self._audit = AuditLog(directory, stream, load_or_create_key(key), fsync_interval_s=audit.fsync_interval_s,
                                   max_segment_bytes=audit.max_segment_bytes, max_segment_age_s=audit.max_segment_age_s,
                                   retention_s=audit.retention_days * 86400.0 if audit.retention_days else None)
            self._audit.open()
        self._events: list[Event] = []
        self._reported: dict[str, tuple[str, str, str]] = {}   # model -> its last refusal or failure, not repeated
        self._stop = threading.Event()

    # ------------------------------------------------------------ entry points

    def run_once(self) -> list[Event]:
        """One pass over every configured model; the events it caused."""
        self._events = []
        with self._locked():
            for path in self.repository.clean_staging():
                log.warning("removed %s, left in staging by an interrupted install", path)
            for model, spec in self.config.models.items():
                if self._stop.is_set():
                    break
                start = len(self._events)
                try:
                    self._recover(model, spec)
                    self._reconcile(model)
                    self._sync(model, spec)
                except (TritonError, OSError, ValueError, KeyError) as e:
                    self._emit("failed", model, reason=str(e))
                if not any(e.action in PROBLEMS for e in self._events[start:]):
                    self._reported.pop(model, None)
        return self._events

    def run_forever(self) -> None:
        """A pass every interval_s until SIGTERM or SIGINT (which stop between steps)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stop.set())
        if self.config.metrics_port is not None:
            start_http_server(self.config.metrics_port, registry=self.metrics)
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.config.interval_s)

    def rollback(self, model: str) -> list[Event]:
        """Serve the previous installed version again: drop the newest from the version policy,
        reload, wait READY, then delete it. Its promotion stays acted on, so only a newer
        promotion installs anything again."""
        self._events = []
        with self._locked():
            state = self.state.model(model)
            if len(state.installed) < 2:
                raise SyncError(f"{model}: nothing to roll back to ({len(state.installed)} version(s) installed)")
            newest, *rest = sorted(state.installed, reverse=True)
            kept = {n: v for n, v in state.installed.items() if n != newest}
            self.repository.write_config(model, kept)
            self.triton.load(model)
            self.triton.wait_ready(model, str(rest[0]), self.config.load_timeout_s)
            digest = state.installed[newest].digest
            state.installed = kept
            self._save()
            self.repository.remove(model, newest)
            self._emit("rolled_back", model, digest, newest, f"version {rest[0]} serves again")
            self._installed.labels(model).set(rest[0])
            spec = self.config.models.get(model)
            if spec is not None:
                self._propose(model, spec, rest[0], state.installed[rest[0]].digest)
        return self._events

    def close(self) -> None:
        self.triton.close()
        if self._audit is not None:
            self._audit.close()

    # ------------------------------------------------------------ one pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the state file's lock (one registry-sync at a time) with the state read fresh."""
        path = self.settings.state
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.state = State.load(path)
            yield
        finally:
            os.close(fd)

    def _save(self) -> None:
        self.state.save(self.settings.state)

    def _recover(self, model: str, spec: Synced) -> None:
        """Undo what an interrupted pass left of model: version dirs the state does not record,
        unless one is the pending install and still verifies (then it is adopted)."""
        state = self.state.model(model)
        pending, state.pending = state.pending, None
        for n in self.repository.versions(model):
            if n in state.installed:
                continue
            reason = "not recorded as installed (left by an interrupted install)"
            if pending is not None and pending.version == n:
                problem = self._in_place_problem(model, n, pending.digest)
                if problem is None:
                    self._save()
                    self._emit("verified", model, pending.digest, n, "adopted: the install was interrupted after the rename")
                    self._activate(model, spec, pending)
                    continue
                reason = f"the interrupted install of {pending.digest} does not verify in place: {problem}"
            self.repository.remove(model, n)
            self._emit("removed", model, "", n, reason)
        if pending is not None:
            self._save()

    def _in_place_problem(self, model: str, n: int, digest: str) -> str | None:
        """Why repository version n is not exactly the signed tree of digest (its signature fetched
        anew); None when it is."""
        staged = self.repository.stage_dir(model, digest)
        try:
            self.store.fetch(model, digest, staged)
            self.repository.drop_caches(model, n)
            signed = verify_tree(self.repository.version_dir(model, n), staged / SIGNATURE, self.settings.signers)
            return None if signed == digest else f"it is {signed}"
        except (RegistryRefusal, OSError) as e:
            return str(e)
        finally:
            remove_tree(staged)

    def _reconcile(self, model: str) -> None:
        """Make Triton serve exactly the installed versions (after a Triton restart, a manual load,
        an interrupted pass): rewrite the config if it differs, and (re)load or unload."""
        installed = self.state.model(model).installed
        changed = self.repository.write_config(model, installed)
        if not changed and self.triton.loaded_versions(model) == {str(n) for n in installed}:
            return
        if installed:
            self.triton.load(model)
            self._emit("loaded", model, installed[max(installed)].digest, max(installed),
                       "Triton now serves exactly the installed versions")
        else:
            self.triton.unload(model)
            self._emit("unloaded", model, reason="no version is installed")

    def _sync(self, model: str, spec: Synced) -> None:
        """Install the newest promotion of the model's stage, unless already acted on or refused."""
        state = self.state.model(model)
        promotions = self.store.promotions(model, spec.stage)
        if not promotions:
            return
        promotion = promotions[-1]
        if state.handled(spec.stage, promotion.seq, promotion.version):
            return
        reason = state.rollback_reason(spec.stage, promotion.seq)
        if reason is not None:
            self._emit("refused", model, promotion.version, reason=reason)
            return
        staged = self.repository.stage_dir(model, promotion.version)
        try:
            pending = self._stage(model, spec, promotion, staged)
            if pending is None:
                return
            state.pending, state.next_version = pending, pending.version + 1
            self._save()
            self.repository.place(staged / TREE, model, pending.version)
            _failpoint("renamed")
        finally:
            remove_tree(staged)
        self._activate(model, spec, pending)

    def _stage(self, model: str, spec: Synced, promotion: Promotion, staged: Path) -> Pending | None:
        """Fetch the promotion's version into staged and check it; the install to make, or None
        when it is refused (the event says why)."""
        digest = promotion.version
        self.store.fetch(model, digest, staged)
        self._emit("fetched", model, digest, reason=f"promotion {spec.stage} seq {promotion.seq}")
        _failpoint("fetched")
        try:
            signed = verify_tree(staged / TREE, staged / SIGNATURE, self.settings.signers)
            if signed != digest:
                raise RegistryRefusal(f"the signed tree's digest {signed} is not the promoted version {digest}")
            try:
                manifest = Manifest.load(staged / TREE / MANIFEST)
            except (OSError, ValueError) as e:
                raise RegistryRefusal(f"{MANIFEST}: {getattr(e, 'strerror', None) or e}") from None
            if manifest.model != model:
                raise RegistryRefusal(f"the manifest is for model {manifest.model!r}, not {model!r}")
            required = self.config.approvals.get(manifest.risk_tier)
            if required is None:
                raise RegistryRefusal(f"risk tier {manifest.risk_tier!r} has no approval rule "
                                      f"(configured: {', '.join(sorted(self.config.approvals))})")
            approvers = check_approvals(promotion.raw, promotion.approvals, self.settings.approvers, required)
            reason = self.state.model(model).rollback_reason(spec.stage, promotion.seq, manifest.trained_at)
            if reason is not None:
                raise RegistryRefusal(reason)
        except RegistryRefusal as e:
            self._emit("refused", model, digest, reason=str(e))
            return None
        self._emit("verified", model, digest, reason=f"risk tier {manifest.risk_tier}, approved by "
                                                     f"{', '.join(approvers) or 'nobody (none required)'}")
        _failpoint("verified")
        n = max([self.state.model(model).next_version, *[v + 1 for v in self.repository.versions(model)]])
        return Pending(digest, n, spec.stage, promotion.seq, manifest.trained_at)

    def _activate(self, model: str, spec: Synced, pending: Pending) -> None:
        """Serve a version placed in the repository: config, load, READY, record it; then drop the
        versions beyond keep and propose it to the canary. On failure the repository goes back to
        what the state records."""
        state, n = self.state.model(model), pending.version
        installed = {**state.installed, n: Installed(pending.digest, pending.promotion_seq, pending.trained_at, iso_now())}
        try:
            self.repository.write_config(model, installed)
            _failpoint("config_written")
            self.triton.load(model)
            self.triton.wait_ready(model, str(n), self.config.load_timeout_s)
            _failpoint("loaded")
        except (TritonError, OSError, ValueError) as e:
            state.pending = None
            self._save()   # from here on a crash leaves a dir the next pass removes
            self.repository.write_config(model, state.installed)
            self.repository.remove(model, n)
            self._emit("failed", model, pending.digest, n, f"not installed: {e}")
            return
        state.installed = installed
        state.trusted[pending.stage] = Trusted(pending.promotion_seq, pending.digest)
        state.pending = None
        self._save()
        self._emit("installed", model, pending.digest, n)
        self._emit("loaded", model, pending.digest, n, "READY")
        self._installed.labels(model).set(n)
        self._trim(model)
        self._propose(model, spec, n, pending.digest)

    def _trim(self, model: str) -> None:
        """Remove the oldest versions beyond keep: Triton stops serving them first."""
        state = self.state.model(model)
        old = sorted(state.installed)[:-self.config.keep]
        if not old:
            return
        gone = {n: state.installed[n] for n in old}
        state.installed = {n: v for n, v in state.installed.items() if n not in gone}
        self.repository.write_config(model, state.installed)
        self.triton.load(model)
        self._save()
        for n, version in gone.items():
            self.repository.remove(model, n)
            self._emit("removed", model, version.digest, n, f"beyond keep={self.config.keep}")

    def _propose(self, model: str, spec: Synced, n: int, digest: str) -> None:
        """Hand the version to the gateway: POST <admin>/admin/routes/<route>/propose. A failure is
        an event, not a failed install."""
        canary = spec.canary
        if canary is None:
            return
        where = f"route {canary.route} target {canary.target}"
        headers = {"Content-Type": "application/json"}
        if canary.token_env:
            token = os.environ.get(canary.token_env)
            if not token:
                self._emit("proposal_failed", model, digest, n, f"{where}: ${canary.token_env} is not set")
                return
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"{canary.admin.rstrip('/')}/admin/routes/{canary.route}/propose",
                                         data=json.dumps({"target": canary.target, "version": str(n)}).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=PROPOSE_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as e:
            self._emit("proposal_failed", model, digest, n, f"{where}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}")
        except OSError as e:
            self._emit("proposal_failed", model, digest, n, f"{where}: {e}")
        else:
            self._emit("proposed", model, digest, n, where)

    def _emit(self, action: str, model: str, version: str = "", triton_version: int | str = "", reason: str = "") -> None:
        event = Event(action, model, version, str(triton_version), reason)
        self._events.append(event)
        if action in PROBLEMS:   # a daemon meets the same refusal every pass: record it once
            if self._reported.get(model) == (action, version, reason):
                return
            self._reported[model] = (action, version, reason)
        level = logging.WARNING if action in ("refused", "failed", "proposal_failed") else logging.INFO
        log.log(level, "%s %s %s%s%s", action, model, version[:16] or "-",
                f" as version {event.triton_version}" if event.triton_version else "", f": {reason}" if reason else "")
        self._actions.labels(model, action).inc()
        if self._audit is not None and not self._audit.append(event):
            log.error("audit queue full: the %s event of %s is not in the audit log", action, model)


# ---------------------------------------------------------------- CLI


def add_sync_arguments(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`sync --config FILE [--once]` and `rollback --config FILE --model M`."""
    sync = subparsers.add_parser("sync", help="keep Triton's model repository equal to the registry's signed, "
                                              "approved promotions (a daemon; --once for one pass)")
    sync.add_argument("--config", required=True, help="registry-sync.yaml")
    sync.add_argument("--once", action="store_true", help="one pass, events printed as JSON lines; exit 1 if any "
                                                          "was refused or failed")
    sync.add_argument("--log-level", default="INFO")
    sync.set_defaults(sync_action="sync")
    rollback = subparsers.add_parser("rollback", help="serve a model's previous installed version again")
    rollback.add_argument("--config", required=True, help="registry-sync.yaml")
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--log-level", default="INFO")
    rollback.set_defaults(sync_action="rollback")


def sync_command(args: argparse.Namespace) -> int:
    """Run `sync` or `rollback` as parsed by add_sync_arguments."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    rollback = args.sync_action == "rollback"
    try:
        syncer = Syncer(load(args.config), stream="registry-rollback" if rollback else "registry-sync")
    except (ConfigError, OSError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    try:
        if rollback:
            events = syncer.rollback(args.model)
        elif args.once:
            events = syncer.run_once()
        else:
            syncer.run_forever()
            return 0
    except (SyncError, StateError, TritonError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        syncer.close()
    for event in events:
        print(json.dumps(event.render()), flush=True)
    return 1 if any(e.action in PROBLEMS for e in events) else 0
