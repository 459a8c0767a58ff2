"""Typed configuration for gateway.yaml and routing.yaml; every error names file, line and reason.

YAML is parsed with PyYAML's composer so each value keeps its line; pydantic checks types and
rejects unknown keys; cross-file references (a route naming a backend) are checked last.
"""
from __future__ import annotations

import math
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    def _exactly_one(self, what: str, first: str, second: str) -> None:
        """Refuse a section that sets both or neither of two alternative keys."""
        if (getattr(self, first) is None) == (getattr(self, second) is None):
            raise ValueError(f"{what} needs exactly one of '{first}' or '{second}'")


# ---------------------------------------------------------------- gateway.yaml


class Listener(Strict):
    host: str = "0.0.0.0"
    port: int = Field(ge=0, le=65535)


class Listeners(Strict):
    http: Listener = Listener(port=9000)
    grpc: Listener = Listener(port=9001)
    admin: Listener = Listener(port=9002)


def _host_port(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {v!r}")
    return v


class BackendTls(Strict):
    """TLS from the gateway to a backend: the CA that signs Triton's certificate (system roots
    when absent), an optional client certificate for mutual TLS, and the name to verify."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = Field(default=None, description="name in Triton's certificate, if not the url's host")

    @model_validator(mode="after")
    def _pair(self) -> "BackendTls":
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both 'cert' and 'key'")
        return self


class Backend(Strict):
    """A Triton server reached over gRPC: one `url`, or `urls` of replicas serving the same models."""

    url: str | None = Field(default=None, description="host:port of Triton's gRPC endpoint")
    urls: list[str] | None = Field(default=None, min_length=1, description="replicas: host:port each")
    transport: Literal["unary", "stream"] = "unary"
    channels: int = Field(default=1, ge=1, le=64)
    streams: int = Field(default=2, ge=1, le=64)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    request_timeout_s: float = Field(default=30.0, gt=0)
    keepalive_s: float = Field(default=30.0, gt=0)
    health_interval_s: float = Field(default=2.0, gt=0)
    metadata_ttl_s: float = Field(default=30.0, ge=0)
    eject_after: int = Field(default=3, ge=1, description="consecutive failures that eject a replica")
    eject_s: float = Field(default=5.0, gt=0, description="how long an ejected replica sits out")
    retries: int = Field(default=1, ge=0, le=5, description="extra attempts on another replica (UNAVAILABLE only)")
    retry_budget: float = Field(default=0.1, ge=0, le=1, description="retries as a fraction of requests, at most")
    retry_backoff_s: float = Field(default=0.005, ge=0, description="mean pause before a retry (jittered)")
    tls: BackendTls | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return v if v is None else _host_port(v)

    @field_validator("urls")
    @classmethod
    def _urls(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else [_host_port(u) for u in v]

    @model_validator(mode="after")
    def _one_form(self) -> "Backend":
        self._exactly_one("a backend", "url", "urls")
        return self

    def endpoints(self) -> list[str]:
        return [self.url] if self.url is not None else list(self.urls or [])


class ServerTls(Strict):
    """TLS on the gateway's listeners: the server certificate chain and key, and for mutual TLS
    the CA bundle client certificates must chain to. Files reload on change (polled)."""

    cert: str
    key: str
    client_ca: str | None = None
    client_auth: Literal["none", "optional", "require"] = "none"
    listeners: list[Literal["http", "grpc", "admin"]] = Field(default=["http", "grpc"], min_length=1)
    reload_s: float = Field(default=5.0, gt=0, description="how often the files are checked for change")

    @model_validator(mode="after")
    def _client_auth(self) -> "ServerTls":
        if self.client_auth != "none" and self.client_ca is None:
            raise ValueError(f"client_auth {self.client_auth!r} needs 'client_ca', the CA bundle client certificates chain to")
        if self.client_auth == "optional" and "grpc" in self.listeners:
            raise ValueError("client_auth 'optional' is not available on the gRPC listener (grpcio can only "
                             "require a client certificate or not ask for one): use 'require', or 'none' with JWTs, "
                             "or leave grpc out of tls.listeners")
        return self


class Jwt(Strict):
    """Bearer tokens from an OIDC issuer: signature checked against its JWKS (a file, or an HTTPS
    URL fetched and refreshed), then issuer, audience, expiry and not-before, with leeway."""

    issuer: str = Field(min_length=1)
    audience: list[str] = Field(min_length=1)
    jwks_file: str | None = None
    jwks_url: str | None = None
    jwks_ca: str | None = Field(default=None, description="CA bundle for the JWKS URL (system roots when absent)")
    algorithms: list[Literal["RS256", "ES256"]] = Field(default=["RS256", "ES256"], min_length=1)
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    refresh_s: float = Field(default=300.0, gt=0, description="JWKS refetch interval (sooner for an unknown key id)")
    principal_claim: str = "sub"
    groups_claim: str = "groups"

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("https://"):
            raise ValueError(f"jwks_url must be an https:// URL, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "Jwt":
        self._exactly_one("jwt", "jwks_file", "jwks_url")
        return self


class Auth(Strict):
    """Where caller identities come from besides client certificates."""

    jwt: Jwt | None = None


class RouteStateStore(Strict):
    """Where runtime overrides and rollout progress live: the state file (one gateway and its
    workers) or Redis (every replica), and the rollout leader lease that goes with Redis."""

    store: Literal["file", "redis"] = "file"
    lease_s: float = Field(default=5.0, ge=0.3, le=120, description="rollout leader lease (redis): a dead leader's successor takes over within it")
    check_interval_s: float = Field(default=1.0, gt=0, le=10, description="version check behind the pub/sub notice (redis)")


class Capture(Strict):
    """Payload capture: a sampled share of requests keep their tensors in the audit record, with
    the named inputs, outputs and request parameters redacted (their digests stay)."""

    rate: float = Field(default=0.0, ge=0, le=1)
    redact: list[str] = Field(default=[], description="tensor or parameter names whose values are never written")
    max_bytes: int = Field(default=65536, ge=0, description="tensors larger than this keep only their digest")


class Subject(Strict):
    """Where a request names the data subject it is about (what `audit purge --subject` removes)."""

    header: str | None = "x-subject-id"
    parameter: str | None = "subject_id"


class Audit(Strict):
    """The audit log: one hash-chained, signed stream of segment files per worker."""

    dir: str = Field(min_length=1, description="directory of the log (relative to gateway.yaml)")
    policy: Literal["drop", "fail_closed"] = Field(
        default="drop", description="queue full: drop the record (counted), or refuse requests with UNAVAILABLE")
    queue_size: int = Field(default=65536, ge=16)
    max_queue_bytes: int = Field(default=256 * 2**20, ge=2**20, description="request and answer bytes queued records may hold")
    fsync_interval_s: float = Field(default=1.0, gt=0, le=60)
    max_segment_bytes: int = Field(default=64 * 2**20, ge=4096)
    max_segment_age_s: float = Field(default=3600.0, gt=0)
    retention_days: float | None = Field(default=None, gt=0, description="sealed segments older than this are deleted")
    signing_key: str = Field(default="", description="Ed25519 private key (PEM); default: <dir>/signing-key.pem, created if missing")
    subject: Subject = Subject()
    capture: Capture = Capture()


class OutcomeStore(Strict):
    """Where predictions wait for their outcomes: an embedded SQLite file (one replica, its workers
    sharing it) or PostgreSQL (several replicas sharing one truth)."""

    url: str = Field(default="sqlite:///outcomes.db",
                     description="sqlite:///path (relative to gateway.yaml) or postgresql://user@host:port/db")
    queue_size: int = Field(default=65536, ge=16, description="predictions waiting for the writer; beyond: dropped, counted")
    batch_s: float = Field(default=0.05, gt=0, le=5, description="how long the writer gathers a batch")
    retention_days: float = Field(default=30.0, gt=0, description="joined records kept this long, for reports and A/B tests")
    expired_for_days: float = Field(default=1.0, gt=0,
                                    description="a prediction past its ttl_s is answered 'expired' this long, then 'unknown'")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"store url must start with sqlite:/// or postgresql://, got {v!r}")
        return v


class RedisSpec(Strict):
    """The Redis server gateway replicas share state through: global rate limits and drift counts.
    A call slower than timeout_s counts as Redis down; while down, one PING every retry_s."""

    url: str = Field(description="redis://[user:password@]host:port/db, rediss:// for TLS, or unix:///path")
    key_prefix: str = Field(default="infergate:", description="every key starts with this: one per deployment")
    connect_timeout_s: float = Field(default=0.5, gt=0)
    timeout_s: float = Field(default=0.2, gt=0)
    retry_s: float = Field(default=1.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {v!r}")
        return v


class GatewayConfig(Strict):
    listeners: Listeners = Listeners()
    tls: ServerTls | None = None
    auth: Auth = Auth()
    audit: Audit | None = None
    outcomes: OutcomeStore | None = None
    workers: int = Field(default=1, ge=1, le=64)
    drain_timeout_s: float = Field(default=10.0, ge=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    routing_file: str = "routing.yaml"
    redis: RedisSpec | None = None
    state_file: str = Field(default="", description="runtime overrides; default: <routing file>.state.json beside it")
    route_state: RouteStateStore = RouteStateStore()
    backends: dict[str, Backend] = Field(min_length=1)


# ---------------------------------------------------------------- routing.yaml


class Target(Strict):
    """Where a public model is served: a backend, the model's name there and an optional version."""

    backend: str
    model: str = Field(min_length=1)
    version: str = ""

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("version")
    @classmethod
    def _version_digits(cls, v: str) -> str:
        if v and not v.isdigit():
            raise ValueError(f"version must be a positive integer, got {v!r}")
        return v


class WeightedTarget(Target):
    """A target in a split; weights of a route's targets sum to 100."""

    weight: int = Field(default=0, ge=0, le=100)


class RateLimit(Strict):
    """`rate` requests per second on average, bursts of up to `burst`. Scope `local`: per gateway
    process; `global`: across every replica, through a shared bucket in Redis that each process
    takes `lease` tokens from at a time (the local bucket stays the first check)."""

    rate: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)
    scope: Literal["local", "global"] = "local"
    lease: int | None = Field(default=None, ge=1, description="global: tokens taken at a time (default: 20 ms of rate, "
                                                                   "at most burst); the error bound is processes x lease")
    on_redis_down: Literal["fail_open", "fail_closed"] | None = Field(
        default=None, description="global: Redis unreachable: the local limit alone (default), or UNAVAILABLE")

    @model_validator(mode="after")
    def _global_settings(self) -> "RateLimit":
        if self.scope == "local" and (self.lease is not None or self.on_redis_down is not None):
            raise ValueError("'lease' and 'on_redis_down' apply to scope: global only")
        if self.lease is not None and self.lease > self.burst:
            raise ValueError(f"lease {self.lease} exceeds burst {self.burst}: the shared bucket never holds more than burst")
        return self

    def lease_size(self) -> int:
        """Tokens a process takes from the shared bucket at a time."""
        return self.lease or max(1, min(self.burst, math.ceil(self.rate / 50)))


class Limits(Strict):
    """Limits across models: all traffic (through this gateway process, or every replica with
    scope global), and each client (its principal, else its address)."""

    global_: RateLimit | None = Field(default=None, alias="global")
    per_client: RateLimit | None = None


class BreakerSpec(Strict):
    """A circuit breaker on each target of a route: open after `failures` consecutive counted
    failures, or when `failure_ratio` of the calls in the last `window_s` failed (once there were
    `min_calls`); stay open `open_s`, then let `half_open_probes` trial calls decide."""

    failures: int = Field(default=5, ge=1)
    failure_ratio: float | None = Field(default=None, gt=0, le=1)
    window_s: float = Field(default=10.0, gt=0)
    min_calls: int = Field(default=20, ge=1)
    open_s: float = Field(default=10.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)


class CapSpec(Strict):
    """At most `max_in_flight` calls to each target of a route at once; others wait up to
    `max_wait_s`, and one whose deadline cannot cover the expected wait is refused at once."""

    max_in_flight: int = Field(ge=1)
    max_wait_s: float = Field(default=0.1, ge=0)


class Pin(Strict):
    """Requests whose header (gRPC metadata or HTTP header) equals value always go to target."""

    header: str = Field(min_length=1)
    value: str
    target: str


class Sticky(Strict):
    """Hash this header or request parameter so one key always lands on the same target."""

    header: str | None = None
    parameter: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "Sticky":
        self._exactly_one("sticky", "header", "parameter")
        return self


class Compare(Strict):
    """How shadow outputs are compared with the primary's: all outputs within atol, and/or the
    same argmax over the last axis (for classifiers)."""

    atol: float | None = Field(default=1e-5, ge=0)
    argmax: bool = False


class Shadow(Strict):
    target: str
    rate: float = Field(default=1.0, gt=0, le=1)
    compare: Compare = Compare()


class Rollout(Strict):
    """A canary that advances through weight steps while its gates hold, and rolls back when not."""

    target: str
    steps: list[int] = Field(min_length=1)
    dwell_s: float = Field(default=60.0, gt=0)
    min_requests: int = Field(default=50, ge=1)
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    max_p99_ratio: float = Field(default=2.0, gt=0)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(not 0 < x <= 100 for x in v) or v != sorted(set(v)):
            raise ValueError(f"steps must be strictly increasing percentages in 1..100, got {v}")
        return v


class Feature(Strict):
    """A named input feature for fallback rules: one column of an input tensor."""

    input: str
    index: int = Field(default=0, ge=0)


class Rule(Strict):
    """When `when` (a CEL expression over the features) holds, answer `outputs` (one row)."""

    name: str = Field(min_length=1)
    when: str = "true"
    outputs: dict[str, list[float | int | bool]]

    @field_validator("when")
    @classmethod
    def _compiles(cls, v: str) -> str:
        from gateway.fallback import compile_condition

        compile_condition(v)
        return v


class Fallback(Strict):
    """Ordered rules answering for the model when its backend cannot (unavailable, not ready,
    missing, or past the deadline); the first rule whose condition holds wins, else `default`."""

    features: dict[str, Feature] = Field(min_length=1)
    outputs: dict[str, Literal["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "FP16", "FP32", "FP64"]] = Field(min_length=1)
    rules: list[Rule] = []
    default: Rule

    @model_validator(mode="after")
    def _references(self) -> "Fallback":
        from gateway.fallback import compile_condition

        for rule in [*self.rules, self.default]:
            unknown = set(compile_condition(rule.when).variables()) - set(self.features)
            if unknown:
                raise ValueError(f"rule {rule.name!r} uses unknown features: {', '.join(sorted(unknown))}")
            if set(rule.outputs) != set(self.outputs):
                raise ValueError(f"rule {rule.name!r} must give exactly the outputs {', '.join(self.outputs)}")
        return self


class Bounds(Strict):
    """Value rules for a tensor or one feature (a column of its last axis)."""

    min: float | None = None
    max: float | None = None
    allowed: list[int | float] | None = Field(default=None, min_length=1, description="category codes")

    @model_validator(mode="after")
    def _order(self) -> "Bounds":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class InputRule(Bounds):
    """Rules for one input tensor; `features` hold rules for single columns of its last axis."""

    finite: bool | None = Field(default=None, description="NaN and infinity refused (default: the route's 'finite')")
    features: dict[int, Bounds] = {}

    @field_validator("features")
    @classmethod
    def _columns(cls, v: dict[int, Bounds]) -> dict[int, Bounds]:
        if any(k < 0 for k in v):
            raise ValueError("feature columns are indexes from 0")
        return v


class Validation(Strict):
    """Checks at the edge, compiled per target from Triton's model metadata and config (input
    names, datatypes, shapes, max batch size) plus these rules. `observe` counts violations and
    lets the request through, to see schema drift before enforcing."""

    mode: Literal["reject", "observe"] = "reject"
    schema_: bool = Field(default=True, alias="schema", description="check names, datatypes and shapes against Triton's")
    finite: bool = Field(default=True, description="floating-point inputs must be finite")
    max_request_bytes: int | None = Field(default=None, ge=1)
    max_batch: int | None = Field(default=None, ge=1)
    inputs: dict[str, InputRule] = {}


class DriftWindow(Strict):
    """Which requests the live counts cover: the last `size` requests (tumbling by count), the
    last `seconds` (tumbling by time), or all of them decayed with `half_life_s`."""

    kind: Literal["count", "time", "decay"] = "count"
    size: int = Field(default=1000, ge=10)
    seconds: float = Field(default=300.0, gt=0)
    half_life_s: float = Field(default=600.0, gt=0)


class DriftThresholds(Strict):
    """Alert when a statistic crosses its bound (None: not checked)."""

    psi: float | None = Field(default=0.2, gt=0)
    js: float | None = Field(default=None, gt=0, le=1)
    ks: float | None = Field(default=None, gt=0, le=1)
    chi2_p: float | None = Field(default=0.01, gt=0, lt=1, description="categorical features: alert below this p-value")
    output_js: float | None = Field(default=0.1, gt=0, le=1, description="argmax and class-probability distributions")


class Drift(Strict):
    """Inline drift statistics against reference profiles (`infergate drift profile`), one per
    model version, matched to the route's targets by model and version."""

    profiles: list[str] = Field(min_length=1, description="profile files, relative to the routing file")
    window: DriftWindow = DriftWindow()
    interval_s: float = Field(default=5.0, gt=0, description="how often statistics are computed (off the request path)")
    min_count: int = Field(default=200, ge=1, description="requests a window needs before it is judged")
    thresholds: DriftThresholds = DriftThresholds()
    features: dict[str, DriftThresholds] = Field(default={}, description="per-feature overrides, by feature name")
    stale_after_s: float | None = Field(default=None, gt=0, description="alert when the version's training time is older")
    max_distribution_js: float | None = Field(default=None, gt=0, le=1,
                                              description="rollout gate: a canary whose argmax distribution is this far "
                                                          "(Jensen-Shannon distance) from the primary's is rolled back")


class Segment(Strict):
    """A segment attribute: a request header (its declared values, anything else is 'other') or
    one feature of an input tensor cut into bands at `bins` edges."""

    header: str | None = None
    values: list[str] = []
    input: str | None = None
    index: int = Field(default=0, ge=0)
    bins: list[float] = []

    @model_validator(mode="after")
    def _one_source(self) -> "Segment":
        self._exactly_one("a segment", "header", "input")
        if self.header is not None and not self.values:
            raise ValueError("a header segment needs its 'values' (anything else counts as 'other')")
        if self.input is not None and (len(self.bins) < 1 or self.bins != sorted(set(self.bins))):
            raise ValueError("an input segment needs strictly increasing 'bins' edges")
        return self


class OutcomeTest(Strict):
    """The rollout's sequential A/B test on one outcome: promote only when the candidate is not
    worse than the primary by more than `margin` (with `confidence`), roll back when it is
    significantly worse."""

    outcome: str = Field(min_length=1, description="'label' (correctness or error) or a declared business outcome")
    margin: float = Field(default=0.0, ge=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    higher_is_better: bool = True
    min_samples: int = Field(default=100, ge=10, description="joined outcomes each arm needs before any decision")


class RetrainQuality(Strict):
    """Quality decay that asks for a retrain: the metric worse than `floor`, or worse than
    `baseline` (e.g. the evaluation figure of the registry manifest) by more than `max_drop`."""

    metric: Literal["accuracy", "log_loss", "mae", "rmse"] = "accuracy"
    floor: float | None = None
    baseline: float | None = None
    max_drop: float | None = Field(default=None, gt=0)
    window_s: float = Field(default=3600.0, gt=0, description="the sliding window the metric is computed over")
    min_samples: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _judged(self) -> "RetrainQuality":
        if (self.baseline is None) != (self.max_drop is None):
            raise ValueError("baseline and max_drop go together")
        if self.floor is None and self.baseline is None:
            raise ValueError("quality decay needs a floor, or a baseline and max_drop")
        return self


class Retrain(Strict):
    """When drift or quality decay persists past `for_s`, a signed webhook (and a log line and an
    audit event) asks for a retrain, once per window."""

    for_s: float = Field(default=3600.0, gt=0)
    drift: bool = Field(default=True, description="a drift alert on the version counts as evidence")
    quality: RetrainQuality | None = None
    webhook: str | None = Field(default=None, description="http(s) URL the signed event is POSTed to")
    signing_key: str = Field(default="", description="Ed25519 private key (PEM), relative to the routing file")
    interval_s: float = Field(default=10.0, gt=0, description="how often the evidence is read")

    @model_validator(mode="after")
    def _signed(self) -> "Retrain":
        if self.webhook is not None and not self.signing_key:
            raise ValueError("a retrain webhook needs a signing_key (receivers verify the body with its public key)")
        if not self.drift and self.quality is None:
            raise ValueError("retrain needs evidence: drift: true, a quality section, or both")
        return self


class Outcomes(Strict):
    """Remember each answer so that outcomes posted later join to it: online quality, business
    metrics, segments, the rollout's A/B test and retrain signals."""

    task: Literal["classifier", "regressor", "none"] = "classifier"
    output: str | None = Field(default=None, description="the output tensor holding the prediction (default: the first)")
    ttl_s: float = Field(default=86400.0, gt=0, description="how long a prediction waits for its outcome")
    business: dict[str, Literal["rate", "mean"]] = {}
    segments: dict[str, Segment] = {}
    test: OutcomeTest | None = None
    retrain: Retrain | None = None

    @model_validator(mode="after")
    def _known_outcome(self) -> "Outcomes":
        if self.test is not None and self.test.outcome != "label" and self.test.outcome not in self.business:
            raise ValueError(f"test.outcome {self.test.outcome!r} is neither 'label' nor a declared business outcome "
                             f"({', '.join(self.business) or 'none declared'})")
        if self.test is not None and self.test.outcome == "label" and self.task == "none":
            raise ValueError("test.outcome 'label' needs a task (classifier or regressor)")
        quality = self.retrain.quality if self.retrain is not None else None
        fits = {"classifier": ("accuracy", "log_loss"), "regressor": ("mae", "rmse"), "none": ()}[self.task]
        if quality is not None and quality.metric not in fits:
            raise ValueError(f"retrain.quality.metric {quality.metric!r} does not apply to task {self.task!r} "
                             f"(it takes: {', '.join(fits) or 'none'})")
        if self.test is not None and self.test.outcome == "label" and self.task == "regressor" and self.test.higher_is_better:
            raise ValueError("a regressor's 'label' test compares absolute errors: set test.higher_is_better: false")
        return self


class AccessRule(Strict):
    """Who may do what: callers matching any of principals (globs), groups or claims (all must
    hold) may take `actions` on `models` (globs); `anonymous: true` admits every caller, even one
    without credentials."""

    name: str = Field(min_length=1)
    principals: list[str] = []
    groups: list[str] = []
    claims: dict[str, str | list[str]] = {}
    anonymous: bool = False
    models: list[str] = Field(default=["*"], min_length=1)
    actions: list[Literal["infer", "metadata", "admin", "feedback"]] = Field(min_length=1)

    @model_validator(mode="after")
    def _someone(self) -> "AccessRule":
        if not (self.principals or self.groups or self.claims or self.anonymous):
            raise ValueError(f"rule {self.name!r} names nobody: give principals, groups, claims or anonymous: true")
        return self


class Route(Strict):
    """One public model: a single `target`, or named `targets` with weights, pins, stickiness,
    a blue-green `active` switch, shadows, a rollout and fallback rules."""

    target: Target | None = None
    targets: dict[str, WeightedTarget] | None = None
    match: list[Pin] = []
    sticky: Sticky | None = None
    active: str | None = None
    shadows: list[Shadow] = []
    rollout: Rollout | None = None
    fallback: Fallback | None = None
    rate_limit: RateLimit | None = None
    breaker: BreakerSpec | None = None
    concurrency: CapSpec | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    validation: Validation | None = None
    drift: Drift | None = None
    outcomes: Outcomes | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "Route":
        self._exactly_one("a route", "target", "targets")
        if self.targets is not None:
            if not self.targets:
                raise ValueError("'targets' is empty")
            total = sum(t.weight for t in self.targets.values())
            if total != 100 and not (self.active and total == 0):
                raise ValueError(f"target weights sum to {total}, not 100")
        return self

    def named_targets(self) -> dict[str, WeightedTarget]:
        """The targets by name; a single `target` is named 'primary' with weight 100."""
        if self.targets is not None:
            return self.targets
        assert self.target is not None
        return {"primary": WeightedTarget(**self.target.model_dump(), weight=100)}


class RoutingConfig(Strict):
    models: dict[str, Route] = Field(min_length=1)
    limits: Limits = Limits()
    access: list[AccessRule] | None = Field(default=None, description="absent: inference and metadata open to all, admin closed")


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class ConfigError(Exception):
    """One or more problems in config files; str() lists them as file:line: reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Loaded:
    """Both files, validated, with where they came from."""

    gateway: GatewayConfig
    routing: RoutingConfig
    gateway_path: Path
    routing_path: Path

    @property
    def state_path(self) -> Path:
        """Where runtime overrides live: state_file (relative to gateway.yaml) or beside the routing file."""
        if self.gateway.state_file:
            return (self.gateway_path.parent / self.gateway.state_file).absolute()
        return self.routing_path.with_name(self.routing_path.name + ".state.json")


class _Document:
    """A YAML file's plain data plus the line of every value and key, by path."""

    def __init__(self, path: Path, text: str) -> None:
        self.file = str(path)
        self.lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else 1
            reason = " ".join(x for x in (e.context, e.problem) if x)
            raise ConfigError([Problem(self.file, line, f"YAML syntax: {reason}")]) from None
        except yaml.YAMLError as e:
            raise ConfigError([Problem(self.file, 1, f"YAML: {e}")]) from None
        self.data = {} if node is None else self._build(node, ())
        if self.problems:
            raise ConfigError(self.problems)

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._build(key_node, loc + ("<key>",))
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    self.problems.append(Problem(self.file, key_node.start_mark.line + 1,
                                                 f"{_dotted(loc)}: a key must be a plain value, got {type(key).__name__}"))
                    continue
                if key in out:
                    self.problems.append(Problem(self.file, key_node.start_mark.line + 1,
                                                 f"{_dotted(loc + (key,))}: duplicate key {key!r}"))
                self.lines[loc + (key, "<key>")] = key_node.start_mark.line + 1
                out[key] = self._build(value_node, loc + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, loc + (i,)) for i, item in enumerate(node.value)]
        try:
            return _SCALARS.construct_object(node)  # int, float, bool, str, null by YAML 1.1 rules
        except (ValueError, TypeError, yaml.YAMLError) as e:
            self.problems.append(Problem(self.file, node.start_mark.line + 1, f"{_dotted(loc)}: cannot read value: {e}"))
            return None

    def line(self, loc: Loc, key: bool = False) -> int:
        """Line of the deepest known part of loc (the key itself for unknown-key errors)."""
        if key and loc + ("<key>",) in self.lines:
            return self.lines[loc + ("<key>",)]
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return 1

    def parse(self, model: Type[M]) -> M:
        try:
            return model.model_validate(self.data)
        except ValidationError as e:
            raise ConfigError([self._problem(err) for err in e.errors()]) from None

    def _problem(self, err: Any) -> Problem:
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            return Problem(self.file, self.line(loc, key=True), f"{_dotted(loc)}: unknown key")
        if err["type"] == "missing":
            return Problem(self.file, self.line(loc[:-1]), f"{_dotted(loc)}: required key is missing")
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) or repr(value) in msg else f" (got {value!r})"
        return Problem(self.file, self.line(loc), f"{_dotted(loc)}: {msg}{shown}")


_SCALARS = yaml.SafeLoader("")


def _route_problems(doc: _Document, name: str, route: Route, gateway: GatewayConfig) -> list[Problem]:
    """References inside one route: backends declared, target names known, versions unique."""
    where = ("models", name)
    problems = []
    targets = route.named_targets()
    for key, target in targets.items():
        loc = where + (("target",) if route.target is not None else ("targets", key)) + ("backend",)
        if target.backend not in gateway.backends:
            problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: unknown backend {target.backend!r} "
                                    f"(gateway config declares: {', '.join(sorted(gateway.backends))})"))
    versions = [(t.backend, t.model, t.version) for t in targets.values()]
    if len(set(versions)) != len(versions):
        problems.append(Problem(doc.file, doc.line(where + ("targets",)),
                                f"{_dotted(where + ('targets',))}: two targets name the same backend, model and version"))
    refs: list[tuple[Loc, str]] = [(where + ("match", i, "target"), pin.target) for i, pin in enumerate(route.match)]
    refs += [(where + ("shadows", i, "target"), shadow.target) for i, shadow in enumerate(route.shadows)]
    if route.active is not None:
        refs.append((where + ("active",), route.active))
    if route.rollout is not None:
        refs.append((where + ("rollout", "target"), route.rollout.target))
    for loc, ref in refs:
        if ref not in targets:
            problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: no target named {ref!r} "
                                    f"(targets: {', '.join(targets)})"))
    if route.drift is not None:
        from gateway.drift.profile import Profile  # only routing files with drift need the drift room

        for i, name_ in enumerate(route.drift.profiles):
            loc = where + ("drift", "profiles", i)
            try:
                Profile.load(Path(doc.file).parent / name_)
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: profile {name_!r} does not load: "
                                        f"{getattr(e, 'strerror', None) or e}"))
    if route.outcomes is not None:
        if gateway.outcomes is None:
            loc = where + ("outcomes",)
            problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: the gateway config has no 'outcomes' "
                                    "section naming the store predictions are kept in"))
        if route.outcomes.retrain is not None and route.outcomes.retrain.signing_key:
            from gateway.audit.chain import load_key

            loc = where + ("outcomes", "retrain", "signing_key")
            try:
                load_key(Path(doc.file).parent / route.outcomes.retrain.signing_key)
            except (OSError, ValueError, TypeError) as e:
                problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: {getattr(e, 'strerror', None) or e}"))
    if route.rollout is not None and len(targets) < 2:
        loc = where + ("rollout",)
        problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: a rollout needs a second target to move traffic from"))
    return problems


def _limit_problems(doc: _Document, routing: RoutingConfig, gateway: GatewayConfig) -> list[Problem]:
    """A global rate limit needs the Redis its shared bucket lives in."""
    limits: list[tuple[Loc, RateLimit | None]] = [(("limits", "global"), routing.limits.global_),
                                                  (("limits", "per_client"), routing.limits.per_client)]
    limits += [(("models", name, "rate_limit"), route.rate_limit) for name, route in routing.models.items()]
    return [Problem(doc.file, doc.line(loc + ("scope",)), f"{_dotted(loc + ('scope',))}: scope 'global' needs a "
                    "'redis' section in the gateway config (the shared bucket lives there)")
            for loc, limit in limits if limit is not None and limit.scope == "global" and gateway.redis is None]


def _file_problems(doc: _Document, gateway: GatewayConfig, base: Path) -> list[Problem]:
    """Every certificate, key, CA bundle, JWKS and audit signing key the config names must be there and load."""
    pairs: list[tuple[Loc, str | None, str | None]] = []   # (where, certificate chain, its key)
    bundles: list[tuple[Loc, str | None]] = []             # CA bundles
    if gateway.tls is not None:
        pairs.append((("tls",), gateway.tls.cert, gateway.tls.key))
        bundles.append((("tls", "client_ca"), gateway.tls.client_ca))
    for name, backend in gateway.backends.items():
        if backend.tls is not None:
            pairs.append((("backends", name, "tls"), backend.tls.cert, backend.tls.key))
            bundles.append((("backends", name, "tls", "ca"), backend.tls.ca))
    jwt = gateway.auth.jwt
    if jwt is not None:
        bundles.append((("auth", "jwt", "jwks_ca"), jwt.jwks_ca))
    problems = []

    def check(loc: Loc, attempt: Callable[[], object]) -> None:
        try:
            attempt()
        except (OSError, ssl.SSLError, ValueError, TypeError) as e:
            problems.append(Problem(doc.file, doc.line(loc), f"{_dotted(loc)}: {getattr(e, 'strerror', None) or e}"))

    for loc, cert, key in pairs:
        if cert and key:
            check(loc + ("cert",), lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(base / cert, base / key))
    for loc, bundle in bundles:
        if bundle:
            check(loc, lambda: ssl.create_default_context(cafile=base / bundle))
    if jwt is not None and jwt.jwks_file:
        check(("auth", "jwt", "jwks_file"), lambda: _key_set(base / jwt.jwks_file))
    if gateway.audit is not None and gateway.audit.signing_key:
        from gateway.audit.chain import load_key  # only configs with an audit key need the audit room

        check(("audit", "signing_key"), lambda: load_key(base / gateway.audit.signing_key))
    return problems


def _key_set(path: Path) -> object:
    """Parse a JWKS file as the verifier will (PyJWT), its errors as ValueError."""
    import jwt

    try:
        return jwt.PyJWKSet.from_json(path.read_text())
    except jwt.PyJWTError as e:
        raise ValueError(f"not a usable JWKS: {e}") from None


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "<document>"


def _read(path: Path) -> _Document:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(path), 0, f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(str(path), 1, f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None
    return _Document(path, text)


def parse_file(path: str | Path, model: Type[M]) -> tuple[M, "_Document"]:
    """Any other YAML config file (registry-sync's) read into a Strict model: errors with file:line;
    the document's `line(loc)` and `file` let the caller report its own checks the same way."""
    doc = _read(Path(path))
    return doc.parse(model), doc


def load(gateway_path: str | Path) -> Loaded:
    """Read, validate and cross-check gateway.yaml and the routing file it names."""
    gateway_path = Path(gateway_path)
    gateway_doc = _read(gateway_path)
    gateway = gateway_doc.parse(GatewayConfig)
    problems = _file_problems(gateway_doc, gateway, gateway_path.parent)
    if gateway.route_state.store == "redis" and gateway.redis is None:
        problems.append(Problem(gateway_doc.file, gateway_doc.line(("route_state", "store")),
                                "route_state.store: 'redis' needs a 'redis' section (url)"))
    if problems:
        raise ConfigError(problems)
    # absolute, not resolved: a Kubernetes ConfigMap swaps a symlink, and the link is what to watch
    routing_path = (gateway_path.parent / gateway.routing_file).absolute()
    if not routing_path.is_file():
        line = gateway_doc.line(("routing_file",))
        raise ConfigError([Problem(gateway_doc.file, line, f"routing_file: no such file {str(routing_path)!r}")])
    routing = load_routing(routing_path, gateway)
    return Loaded(gateway, routing, gateway_path, routing_path)


def load_routing(path: Path, gateway: GatewayConfig) -> RoutingConfig:
    """Validate a routing file against the backends the gateway config declares."""
    doc = _read(path)
    routing = doc.parse(RoutingConfig)
    problems = [p for name, route in routing.models.items() for p in _route_problems(doc, name, route, gateway)]
    problems += _limit_problems(doc, routing, gateway)
    if problems:
        raise ConfigError(problems)
    return routing
