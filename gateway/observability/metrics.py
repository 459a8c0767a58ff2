"""Prometheus metrics. With several workers, prometheus-client's multiprocess mode aggregates them
(the supervisor sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client)."""
from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

DIFF_BUCKETS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_PRINCIPALS = 1000  # distinct principal labels on the access counter
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(4, 14))  # 256 B .. 64 MiB


class Metrics:
    """The gateway's metric families, with label children cached so the request path only counts."""

    def __init__(self) -> None:
        labels = ["model", "target", "version", "protocol", "code"]
        self.requests = Counter("infergate_requests_total",
                                "Inference requests answered, by model, route target, version, protocol and status code", labels)
        self.latency = Histogram("infergate_request_duration_seconds", "Time from request decoded to answer ready",
                                 labels, buckets=LATENCY_BUCKETS)
        self.request_bytes = Histogram("infergate_request_bytes", "Serialized inference request size",
                                       ["model", "protocol"], buckets=BYTES_BUCKETS)
        self.response_bytes = Histogram("infergate_response_bytes", "Serialized inference response size",
                                        ["model", "protocol"], buckets=BYTES_BUCKETS)
        self.in_flight = Gauge("infergate_in_flight", "Inference requests being answered now", ["model"],
                               multiprocess_mode="livesum")
        self.backend_latency = Histogram("infergate_backend_duration_seconds",
                                         "Time in the backend call (concurrency cap wait, breaker, retries included)",
                                         ["backend", "model"], buckets=LATENCY_BUCKETS)
        self.rate_limited = Counter("infergate_rate_limited_total", "Requests refused by a rate limit, by its scope",
                                    ["model", "scope"])
        self.redis_errors = Counter("infergate_redis_errors_total",
                                    "Failed Redis calls (unreachable, timed out, refused), by what they were for: limits, drift",
                                    ["use"])
        self.limit_degraded = Counter("infergate_global_limit_degraded_total",
                                      "Requests a global rate limit decided without its shared bucket (Redis down): admitted "
                                      "on the local limit alone (fail_open) or refused with UNAVAILABLE (fail_closed)",
                                      ["scope", "decision"])
        self.rollout_events = Counter("infergate_rollout_events_total", "Rollout steps: started, advanced, held (before promotion, by the A/B test), promoted, rolled_back",
                                      ["model", "target", "event"])
        self.shadows = Counter("infergate_shadow_requests_total", "Shadow calls by outcome: agree, disagree, error, dropped",
                               ["model", "target", "result"])
        self.shadow_diff = Histogram("infergate_shadow_max_abs_diff", "Largest absolute output difference, shadow vs primary",
                                     ["model", "target"], buckets=DIFF_BUCKETS)
        self.weights = Gauge("infergate_route_weight", "Live weight (percent) of each route target",
                             ["model", "target"], multiprocess_mode="livemax")
        self.fallbacks = Counter("infergate_fallback_answers_total", "Answers from fallback rules, by rule and the backend failure",
                                 ["model", "rule", "cause"])
        self.breakers = Gauge("infergate_breaker_state", "Circuit breaker of each route target: 0 closed, 1 half-open, 2 open",
                              ["model", "target"], multiprocess_mode="livemax")
        self.retries = Counter("infergate_backend_retries_total", "Retries on another replica: sent, or refused as over the retry budget",
                               ["backend", "result"])
        self.reloads = Counter("infergate_config_reloads_total", "Routing reloads by result (ok, rejected)", ["result"])
        self.route_state_errors = Counter("infergate_route_state_errors_total",
                                          "Route state store failures: load (reads kept the last known state) or update "
                                          "(an admin change or rollout step refused)", ["op"])
        self.route_state_store_up = Gauge("infergate_route_state_store_up",
                                          "1 while the route state store (state file or Redis) answers, 0 while the last known state is kept",
                                          multiprocess_mode="livemin")
        self.rollout_leader = Gauge("infergate_rollout_leader",
                                    "1 in the process whose rollout controller decides (worker 0, holding the Redis lease if shared)",
                                    multiprocess_mode="livemax")
        self.decisions = Counter("infergate_access_decisions_total", "Access decisions by principal, model, action and result",
                                 ["principal", "model", "action", "decision"])
        self.violations = Counter("infergate_validation_violations_total",
                                  "Requests failing an edge check, by model, input, rule and mode (reject refuses, observe only counts)",
                                  ["model", "input", "rule", "mode"])
        self.tls_reloads = Counter("infergate_tls_reloads_total", "Listener certificate loads by result (ok, rejected)", ["result"])
        self.tls_expiry = Gauge("infergate_tls_certificate_expiry_timestamp_seconds",
                                "When the listener certificate in use expires (Unix time)", multiprocess_mode="livemin")
        self.drift_stats = Gauge("infergate_drift_statistic", "Drift statistic of a feature (or output) against its reference profile",
                                 ["model", "version", "feature", "statistic"], multiprocess_mode="livemax")
        self.drift_alerts = Gauge("infergate_drift_alert", "1 while a drift threshold is crossed",
                                  ["model", "version", "feature"], multiprocess_mode="livemax")
        self.drift_raised = Counter("infergate_drift_alerts_total", "Drift alerts raised", ["model", "version", "feature"])
        self.drift_requests = Gauge("infergate_drift_window_requests", "Requests in the judged drift window (all workers)",
                                    ["model", "version"], multiprocess_mode="livemax")
        self.model_age_s = Gauge("infergate_model_age_seconds", "Time since the version's training (from its profile)",
                                 ["model", "version"], multiprocess_mode="livemax")
        self.model_stale = Gauge("infergate_model_stale", "1 when the version is older than its stale_after_s",
                                 ["model", "version"], multiprocess_mode="livemax")
        self.audit_records = Counter("infergate_audit_records_written_total", "Audit records written to the log")
        self.audit_depth = Gauge("infergate_audit_queue_depth", "Audit records queued, not yet written",
                                 multiprocess_mode="livesum")
        self.audit_capacity_ = Gauge("infergate_audit_queue_capacity", "Audit records the queue holds at most",
                                     multiprocess_mode="livesum")
        self.audit_drops = Counter("infergate_audit_dropped_total", "Audit records dropped: the queue was full (policy drop)")
        self.audit_refusals = Counter("infergate_audit_refused_total",
                                      "Requests refused with UNAVAILABLE: the audit queue was full (policy fail_closed)")
        self.audit_failures = Counter("infergate_audit_failures_total",
                                      "Audit writer failures by stage (render, write, fsync, seal, recovery, retention)", ["stage"])
        self.audit_recoveries = Counter("infergate_audit_recoveries_total", "Audit streams recovered after an unclean stop")
        self.audit_seals = Counter("infergate_audit_seals_total", "Signed audit seals written: checkpoint or final", ["kind"])
        self.outcomes = OutcomeMetrics()
        for result in ("ok", "rejected"):  # series exist from the start: increase() sees the first event
            self.reloads.labels(result)
            self.tls_reloads.labels(result)
        for use in ("limits", "drift"):
            self.redis_errors.labels(use)
        for scope in ("model", "client", "global"):
            for decision in ("admitted", "refused"):
                self.limit_degraded.labels(scope, decision)
        self._principals: set[str] = set()
        self._decided: dict[tuple[str, str, str, bool], Any] = {}
        self._children: dict[tuple[str, str, str, str, str], tuple[Any, Any]] = {}
        self._sized: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._flying: dict[str, Any] = {}
        self._backends: dict[tuple[str, str], Any] = {}
        self._weighted: set[tuple[str, str]] = set()

    def observe(self, model: str, target: str, version: str, protocol: str, code: str, seconds: float) -> None:
        key = (model, target, version, protocol, code)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        pair[0].inc()
        pair[1].observe(seconds)

    def enter(self, model: str) -> Any:
        """Count one request in flight for model; the caller decrements what this returns."""
        gauge = self._flying.get(model)
        if gauge is None:
            gauge = self._flying[model] = self.in_flight.labels(model)
        gauge.inc()
        return gauge

    def backend(self, backend: str, model: str, seconds: float) -> None:
        child = self._backends.get((backend, model))
        if child is None:
            child = self._backends[(backend, model)] = self.backend_latency.labels(backend, model)
        child.observe(seconds)

    def sizes(self, model: str, protocol: str, request: int, response: int) -> None:
        pair = self._sized.get((model, protocol))
        if pair is None:
            pair = self._sized[(model, protocol)] = (self.request_bytes.labels(model, protocol),
                                                     self.response_bytes.labels(model, protocol))
        pair[0].observe(request)
        pair[1].observe(response)

    def shadow(self, model: str, target: str, result: str, diff: float | None = None) -> None:
        self.shadows.labels(model, target, result).inc()
        if diff is not None:
            self.shadow_diff.labels(model, target).observe(diff)

    def route_weights(self, table: Any) -> None:
        """Export what each target serves now; forget targets a new table no longer has. A route's
        rollout events exist at 0 from the start, so increase() sees the first one."""
        current = set()
        for route in table.routes.values():
            if route.spec.rollout is not None:
                for event in ("started", "advanced", "promoted", "rolled_back"):
                    self.rollout_events.labels(route.public, route.spec.rollout.target, event)
            for target in route.targets.values():
                self.weights.labels(route.public, target.name).set(route.serving(target))
                current.add((route.public, target.name))
        for gone in self._weighted - current:
            self.weights.remove(*gone)
        self._weighted = current

    def fallback(self, model: str, rules: str, cause: str) -> None:
        self.fallbacks.labels(model, rules, cause).inc()

    def breaker(self, model: str, target: str, state: str) -> None:
        self.breakers.labels(model, target).set({"closed": 0, "half-open": 1, "open": 2}.get(state, 0))

    def retry(self, backend: str, result: str) -> None:
        self.retries.labels(backend, result).inc()

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def limited(self, model: str, scope: str) -> None:
        self.rate_limited.labels(model, scope).inc()

    def redis_error(self, use: str) -> None:
        self.redis_errors.labels(use).inc()

    def limit_decided_without_redis(self, scope: str, decision: str) -> None:
        self.limit_degraded.labels(scope, decision).inc()
    def route_state_error(self, op: str) -> None:
        self.route_state_errors.labels(op).inc()

    def route_state_up(self, up: bool) -> None:
        self.route_state_store_up.set(1 if up else 0)

    def leading(self, leader: bool) -> None:
        self.rollout_leader.set(1 if leader else 0)

    def rollout(self, model: str, target: str, event: str) -> None:
        self.rollout_events.labels(model, target, event).inc()

    def access(self, principal: str, model: str, action: str, allowed: bool) -> None:
        """Count a decision per principal; past MAX_PRINCIPALS distinct ones (every user of an
        OIDC issuer, say) the rest are counted as `other`."""
        key = (principal, model, action, allowed)
        child = self._decided.get(key)
        if child is None:
            if principal not in self._principals:
                if len(self._principals) >= MAX_PRINCIPALS and principal != "other":
                    return self.access("other", model, action, allowed)
                self._principals.add(principal)
            child = self._decided[key] = self.decisions.labels(principal or "anonymous", model, action,
                                                               "allow" if allowed else "deny")
        child.inc()

    def drift_statistic(self, model: str, version: str, feature: str, statistic: str, value: float) -> None:
        self.drift_stats.labels(model, version, feature, statistic).set(value)

    def drift_alert(self, model: str, version: str, feature: str, firing: bool, raised: bool) -> None:
        self.drift_alerts.labels(model, version, feature).set(1 if firing else 0)
        if raised:
            self.drift_raised.labels(model, version, feature).inc()

    def drift_window(self, model: str, version: str, requests: float) -> None:
        self.drift_requests.labels(model, version).set(requests)

    def model_age(self, model: str, version: str, age_s: float, stale_after_s: float | None) -> None:
        self.model_age_s.labels(model, version).set(age_s)
        self.model_stale.labels(model, version).set(1 if stale_after_s is not None and age_s > stale_after_s else 0)

    def violation(self, model: str, input_name: str, rule: str, mode: str) -> None:
        self.violations.labels(model, input_name, rule, mode).inc()

    def audit_capacity(self, capacity: int) -> None:
        """The audit log is open: its capacity, and every failure stage at 0 for increase()."""
        self.audit_capacity_.set(capacity)
        for stage in ("render", "write", "fsync", "seal", "recovery", "retention"):
            self.audit_failures.labels(stage)

    def audit_written(self, records: int, depth: int) -> None:
        self.audit_records.inc(records)
        self.audit_depth.set(depth)

    def audit_dropped(self) -> None:
        self.audit_drops.inc()

    def audit_refused(self) -> None:
        self.audit_refusals.inc()

    def audit_failed(self, stage: str) -> None:
        self.audit_failures.labels(stage).inc()

    def audit_recovered(self) -> None:
        self.audit_recoveries.inc()

    def audit_sealed(self, final: bool) -> None:
        self.audit_seals.labels("final" if final else "checkpoint").inc()

    def tls_reload(self, result: str, expiry: float) -> None:
        self.tls_reloads.labels(result).inc()
        self.tls_expiry.set(expiry)


class OutcomeMetrics:
    """Online quality from joined outcomes, as counters: PromQL's rate() over them is the sliding
    window, and sums over workers and replicas are exact. Quality series carry the segment
    attribute and value ("" and "" for all traffic); their values are bounded by the declaration."""

    QUALITY = ["model", "target", "version", "segment", "value"]

    def __init__(self) -> None:
        q = self.QUALITY
        self.feedback = Counter("infergate_outcome_feedback_total",
                                "Posted outcomes by fate: joined, unknown, expired, duplicate, invalid", ["model", "status"])
        self.dropped = Counter("infergate_outcome_predictions_dropped_total",
                               "Predictions not remembered: the join store's queue was full, or the answer could not be read",
                               ["model", "reason"])
        self.joined = Counter("infergate_outcome_joined_total", "Outcomes joined to their prediction", q)
        self.labelled = Counter("infergate_outcome_labelled_total", "Joined outcomes carrying a ground-truth label", q)
        self.correct = Counter("infergate_outcome_correct_total", "Labelled predictions whose top class was the label", q)
        self.log_loss = Counter("infergate_outcome_log_loss_total", "Sum of the log-loss of labelled predictions", q)
        self.abs_error = Counter("infergate_outcome_abs_error_total", "Sum of absolute errors of labelled predictions", q)
        self.sq_error = Counter("infergate_outcome_squared_error_total", "Sum of squared errors of labelled predictions", q)
        calibration = ["model", "target", "version", "bin"]
        self.calibrated = Counter("infergate_outcome_calibration_total",
                                  "Labelled predictions by confidence bin (top-class probability, tenths)", calibration)
        self.calibrated_correct = Counter("infergate_outcome_calibration_correct_total",
                                          "Labelled predictions by confidence bin whose top class was the label", calibration)
        self.confidence = Counter("infergate_outcome_confidence_total",
                                  "Sum of top-class probabilities by confidence bin", calibration)
        self.business = Counter("infergate_outcome_business_total", "Sum of a business outcome's values", q + ["outcome"])
        self.business_count = Counter("infergate_outcome_business_observed_total",
                                      "Joined outcomes reporting a business outcome", q + ["outcome"])
        self.ab_bound = Gauge("infergate_ab_difference", "The A/B test's confidence sequence for candidate minus primary: "
                              "bound is low, estimate or high", ["model", "candidate", "outcome", "bound"],
                              multiprocess_mode="livemax")
        self.ab_decision = Gauge("infergate_ab_decision", "The A/B test's verdict: 1 not worse, 0 undecided, -1 worse",
                                 ["model", "candidate", "outcome"], multiprocess_mode="livemax")
        self.retrains = Counter("infergate_retrain_events_total", "Retrain events emitted, by evidence kind",
                                ["model", "version", "kind"])
        self.webhook_failures = Counter("infergate_retrain_webhook_failures_total",
                                        "Retrain webhook deliveries that failed after their retries", ["model"])

    def posted(self, model: str, status: str) -> None:
        self.feedback.labels(model, status).inc()

    def drop(self, model: str, reason: str) -> None:
        self.dropped.labels(model, reason).inc()

    def ab(self, model: str, candidate: str, outcome: str, low: float, estimate: float, high: float, verdict: int) -> None:
        for bound, value in (("low", low), ("estimate", estimate), ("high", high)):
            self.ab_bound.labels(model, candidate, outcome, bound).set(value)
        self.ab_decision.labels(model, candidate, outcome).set(verdict)


def exposition() -> bytes:
    """The text format for /metrics: this process's registry, or all workers' in multiprocess mode."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
