"""The retrain signal: when drift or quality decay persists past a declared duration, emit one
retrain event per window — a signed webhook call, a log line and an audit record.

Persistence (`PersistenceTracker`): a timer hands in one reading (`Evidence`) per model version
and kind. A condition that holds starts a window; once it has held for `for_s` an event fires
and the next window starts, so the next event for the same version and kind needs another full
`for_s` of persistence; a reading where it does not hold ends the window. A reading that cannot
judge (too few samples, drift not yet judged) neither extends nor ends it: a traffic lull is not
a recovery, and only a holding reading fires.

The webhook (`RetrainEmitter`): the body is the event as JSON with sorted keys, POSTed off the
request path with a timeout and retries (the same bytes and id each try), with
`X-Infergate-Signature: ed25519=<base64 signature of the exact body bytes>` and
`X-Infergate-Key-Id: <first 16 hex of sha256(raw public key)>`, the audit log's key id. A
receiver verifies the signature over the raw body before parsing it (`verify`, or `infergate
retrain verify`), then drops ids it has seen (retries resend the same id) and bodies whose
`emitted_at` is older than it tolerates (replays). Sign with an Ed25519 PEM key
(`infergate audit keygen --out keys/retrain.pem` writes one and its `.pub`).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import aiohttp
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.chain import canonical, iso_from_unix, key_id, load_public_keys
from gateway.outcomes.quality import METRICS

if TYPE_CHECKING:
    from gateway.observability.metrics import OutcomeMetrics

log = logging.getLogger(__name__)

Kind = Literal["drift", "quality"]
SIGNATURE_HEADER = "X-Infergate-Signature"
KEY_ID_HEADER = "X-Infergate-Key-Id"
EVENT_TYPE = "infergate.retrain"
_RETRY_STATUS = frozenset((408, 425, 429))   # and every 5xx: worth another try; other answers are final


# ---------------------------------------------------------------- evidence and persistence


@dataclass(frozen=True, slots=True)
class Evidence:
    """One reading of one condition for one model version: whether it holds (None: cannot be
    judged now), the numbers behind it, the thresholds it is judged by and a one-line summary."""

    kind: Kind
    holding: bool | None
    figures: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


def drift_evidence(crossed: Mapping[str, Mapping[str, float]] | None,
                   bounds: Mapping[str, Mapping[str, float]] | None = None,
                   window_requests: float | None = None) -> Evidence:
    """Drift of a version from the drift engine: crossed maps each alerting feature to its
    statistics past their bounds (empty: no alert; None: not judged yet); bounds the same
    features' thresholds."""
    if crossed is None:
        return Evidence("drift", None, summary="drift not judged yet")
    figures: dict[str, Any] = {"features": {f: dict(s) for f, s in crossed.items()}}
    if window_requests is not None:
        figures["window_requests"] = window_requests
    summary = "; ".join(f"{f}: " + ", ".join(f"{k}={v:.3g}" for k, v in s.items()) for f, s in crossed.items())
    return Evidence("drift", bool(crossed), figures, {f: dict(b) for f, b in (bounds or {}).items()},
                    summary or "no drift alert")


def quality_evidence(metric: str, value: float | None, n: int, *, floor: float | None = None,
                     baseline: float | None = None, max_drop: float | None = None, min_samples: int = 1,
                     higher_is_better: bool | None = None) -> Evidence:
    """Online quality decay of a version: the metric (over n labelled outcomes) worse than floor,
    or worse than baseline (e.g. the manifest's evaluation figure) by more than max_drop.
    Direction from quality.METRICS unless given; too few samples cannot be judged."""
    if higher_is_better is None:
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: say whether higher is better (known: {', '.join(METRICS)})")
        higher_is_better = METRICS[metric].higher_is_better
    sign = 1.0 if higher_is_better else -1.0
    thresholds = {k: v for k, v in (("floor", floor), ("baseline", baseline), ("max_drop", max_drop),
                                    ("min_samples", min_samples)) if v is not None}
    figures: dict[str, Any] = {"metric": metric, "value": value, "n": n}
    if value is None or n < min_samples:
        return Evidence("quality", None, figures, thresholds, f"{metric}: {n} labelled outcomes, {min_samples} needed")
    reasons = []
    if floor is not None and sign * (value - floor) < 0:
        reasons.append(f"{metric} {value:.4g} {'<' if higher_is_better else '>'} floor {floor:.4g}")
    if baseline is not None and max_drop is not None:
        figures["drop"] = drop = sign * (baseline - value)
        if drop > max_drop:
            reasons.append(f"{metric} {value:.4g} worse than baseline {baseline:.4g} by {drop:.4g} > {max_drop:.4g}")
    return Evidence("quality", bool(reasons), figures, thresholds,
                    ("; ".join(reasons) or f"{metric} {value:.4g} within bounds") + f" over {n} labelled outcomes")


@dataclass(frozen=True, slots=True)
class RetrainEvent:
    """A request to retrain one model version: why (kind, evidence) and over which window."""

    id: str
    model: str
    version: str
    kind: Kind
    evidence: Evidence
    window_start: float     # unix seconds: when the condition started to hold (or the last event's end)
    window_end: float       # unix seconds: when it had held for for_s
    for_s: float

    def document(self, emitted_at: float) -> dict[str, Any]:
        """The event as the webhook body, log and audit carry it."""
        return {"type": EVENT_TYPE, "id": self.id, "model": self.model, "version": self.version, "kind": self.kind,
                "summary": self.evidence.summary,
                "evidence": {"figures": dict(self.evidence.figures), "thresholds": dict(self.evidence.thresholds)},
                "window": {"start": iso_from_unix(self.window_start), "end": iso_from_unix(self.window_end),
                           "for_s": self.for_s},
                "emitted_at": iso_from_unix(emitted_at)}


class PersistenceTracker:
    """Per (model, version, kind): since when the condition has held; fires once per full window."""

    def __init__(self, for_s: Mapping[Kind, float], clock: Callable[[], float] = time.time) -> None:
        if not for_s or any(s <= 0 for s in for_s.values()):
            raise ValueError("for_s needs a positive duration per kind")
        self.for_s = dict(for_s)
        self._clock = clock
        self._since: dict[tuple[str, str, Kind], float] = {}

    def observe(self, model: str, version: str, evidence: Evidence) -> RetrainEvent | None:
        """Take one reading; the event when the condition has now held for a full window."""
        key = (model, version, evidence.kind)
        for_s = self.for_s.get(evidence.kind)
        if for_s is None:
            raise ValueError(f"no for_s declared for {evidence.kind} evidence")
        if evidence.holding is None:
            return None
        now = self._clock()
        if not evidence.holding:
            self._since.pop(key, None)
            return None
        since = self._since.setdefault(key, now)
        if now - since < for_s:
            return None
        self._since[key] = now  # the next event needs another full window
        return RetrainEvent(uuid.uuid4().hex, model, version, evidence.kind, evidence, since, now, for_s)

    def holding_since(self, model: str, version: str, kind: Kind) -> float | None:
        """When the current window of (model, version, kind) started; None when it is not holding."""
        return self._since.get((model, version, kind))


# ---------------------------------------------------------------- signing and verifying


def sign_body(body: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature headers for body: Ed25519 over its exact bytes, and the key's id."""
    return {SIGNATURE_HEADER: "ed25519=" + base64.b64encode(key.sign(body)).decode(),
            KEY_ID_HEADER: key_id(key.public_key())}


class SignatureError(ValueError):
    """A webhook body whose signature is missing, malformed, by another key or wrong."""


def verify(body: bytes, headers: Mapping[str, str],
           public_key: Ed25519PublicKey | Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The event in a received webhook body once its signature holds under public_key (or the
    key the Key-Id header names among several, by key id); SignatureError saying why otherwise.
    Pass the raw body bytes as received: re-encoded JSON does not verify."""
    lower = {k.lower(): v for k, v in headers.items()}
    value = lower.get(SIGNATURE_HEADER.lower(), "")
    scheme, _, encoded = value.partition("=")
    if scheme != "ed25519" or not encoded:
        raise SignatureError(f"no '{SIGNATURE_HEADER}: ed25519=<base64>' header")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise SignatureError("the signature is not base64") from None
    kid = lower.get(KEY_ID_HEADER.lower())
    if isinstance(public_key, Ed25519PublicKey):
        public = public_key
        if kid is not None and kid != key_id(public):
            raise SignatureError(f"signed by key {kid}, not by key {key_id(public)}")
    elif kid is None and len(public_key) == 1:
        public = next(iter(public_key.values()))
    elif kid is None:
        raise SignatureError(f"no '{KEY_ID_HEADER}' header to choose among {len(public_key)} public keys")
    else:
        public = public_key.get(kid)
        if public is None:
            raise SignatureError(f"signed by unknown key {kid!r}")
    try:
        public.verify(signature, body)
    except InvalidSignature:
        raise SignatureError(f"bad signature (key {key_id(public)}): the body or the signature was changed") from None
    doc = orjson.loads(body)
    if not isinstance(doc, dict) or doc.get("type") != EVENT_TYPE:
        raise SignatureError(f"signed, but not an {EVENT_TYPE} event")
    return doc


def add_retrain_arguments(retrain: argparse._SubParsersAction) -> None:
    """`verify` under `infergate retrain`: check a received webhook body against public keys."""
    check = retrain.add_parser("verify", help="verify a retrain webhook body's signature; prints the event")
    check.add_argument("--body", type=Path, required=True, help="the raw body as received ('-': stdin)")
    check.add_argument("--signature", required=True, help=f"the {SIGNATURE_HEADER} header, ed25519=<base64>")
    check.add_argument("--key-id", help=f"the {KEY_ID_HEADER} header (picks among several --public-key)")
    check.add_argument("--public-key", type=Path, action="append", required=True,
                       help="the signer's Ed25519 public key (PEM); repeatable")


def retrain_command(args: argparse.Namespace) -> int:
    """Run `infergate retrain verify` as parsed by add_retrain_arguments: 0 and the event on
    stdout when the signature holds, else 1 with the reason on stderr."""
    try:
        body = sys.stdin.buffer.read() if str(args.body) == "-" else args.body.read_bytes()
        headers = {SIGNATURE_HEADER: args.signature, **({KEY_ID_HEADER: args.key_id} if args.key_id else {})}
        event = verify(body, headers, load_public_keys(args.public_key))
    except (SignatureError, ValueError, OSError) as e:
        print(f"infergate retrain verify: {e}", file=sys.stderr)
        return 1
    print(orjson.dumps(event, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    return 0


# ---------------------------------------------------------------- emitting


class RetrainEmitter:
    """Sends each event three ways: a log line, the audit hook, and (with a URL) a signed webhook
    POST on a task of its own, retried with exponential backoff; a delivery that fails every try
    is logged and counted, never raised."""

    def __init__(self, url: str | None, key: Ed25519PrivateKey | None, *,
                 audit: Callable[[dict[str, Any]], None] | None = None, metrics: OutcomeMetrics | None = None,
                 timeout_s: float = 5.0, attempts: int = 4, backoff_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        if url is not None and key is None:
            raise ValueError("a retrain webhook needs a signing key")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url, self.key = url, key
        self.audit, self.metrics = audit, metrics
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.attempts, self.backoff_s = attempts, backoff_s
        self._clock = clock
        self.delivered = 0      # events the webhook accepted (2xx)
        self.failed = 0         # events it did not accept after every try
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def emit(self, event: RetrainEvent) -> None:
        """Log, audit, count and (on the running loop) start the webhook delivery; returns at once."""
        doc = event.document(self._clock())
        log.warning("retrain event %s: model %s version %s: %s persisted %g s (%s to %s): %s", event.id, event.model,
                    event.version, event.kind, event.for_s, doc["window"]["start"], doc["window"]["end"],
                    event.evidence.summary)
        if self.metrics is not None:
            self.metrics.retrains.labels(event.model, event.version, event.kind).inc()
        if self.audit is not None:
            try:
                self.audit(doc)
            except Exception:  # noqa: BLE001 - an audit hook's failure must not stop the signal
                log.exception("retrain event %s: the audit hook failed", event.id)
        if self.url is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.deliver(event.model, canonical(doc)))
        except RuntimeError:
            self._failed(event.model, "no running event loop to send it from")
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, model: str, body: bytes) -> bool:
        """POST the signed body until the webhook answers 2xx or the tries run out; whether it did."""
        assert self.url is not None and self.key is not None
        headers = {"Content-Type": "application/json", **sign_body(body, self.key)}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with self._session.post(self.url, data=body, headers=headers) as answer:
                    if 200 <= answer.status < 300:
                        self.delivered += 1
                        return True
                    problem = f"HTTP {answer.status}"
                    if answer.status < 500 and answer.status not in _RETRY_STATUS:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.info("retrain webhook %s: try %d of %d failed: %s", self.url, attempt + 1, self.attempts, problem)
        self._failed(model, problem)
        return False

    def _failed(self, model: str, problem: str) -> None:
        self.failed += 1
        if self.metrics is not None:
            self.metrics.webhook_failures.labels(model).inc()
        log.warning("retrain webhook %s: event for model %s not delivered: %s", self.url, model, problem)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let deliveries under way finish for up to timeout_s, cancel the rest, close the client."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
