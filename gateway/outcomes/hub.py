"""This worker's outcomes: the join store every route's recorder shares, and what a joined outcome
adds to the quality counters (per target and version, and per declared segment value)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gateway import config
from gateway.observability.metrics import OutcomeMetrics
from gateway.outcomes import quality
from gateway.outcomes.recorder import Recorder
from gateway.outcomes.records import Joined
from gateway.outcomes.sequential import Arm, Decision

if TYPE_CHECKING:
    from gateway.routing.table import Route

COMMIT_S = 0.2  # beyond its gathering pause (batch_s), how long another process's writer may take to commit


def store_url(spec: config.OutcomeStore, base: Path) -> str:
    """The store's URL with a relative SQLite path made relative to gateway.yaml's folder."""
    prefix = "sqlite:///"
    if spec.url.startswith(prefix) and not spec.url[len(prefix):].startswith("/"):
        return prefix + str((base / spec.url[len(prefix):]).absolute())
    return spec.url


class OutcomeHub:
    """Opens the store, makes each route's Recorder, and counts what joins."""

    def __init__(self, spec: config.OutcomeStore, base: Path, metrics: OutcomeMetrics) -> None:
        from gateway.outcomes.store import JoinStore  # the database drivers load only where outcomes are kept

        self.metrics = metrics
        # a join looks again for what it did not find once every other worker's and replica's
        # writer has had its gathering pause: an outcome posted right after its answer still joins
        self.store = JoinStore(store_url(spec, base), queue_size=spec.queue_size, batch_s=spec.batch_s,
                               settle_s=spec.batch_s + COMMIT_S, grace_s=spec.expired_for_days * 86400.0,
                               retention_s=spec.retention_days * 86400.0,
                               on_drop=lambda a, reason: metrics.drop(a.recorder.public, reason))

    def recorder(self, public: str, spec: config.Outcomes) -> Recorder:
        return Recorder(public, spec, self)

    def count(self, recorder: Recorder, joined: Joined) -> None:
        """Add one joined outcome to the counters of its target and version, overall and per segment."""
        p, f, m = joined.prediction, joined.feedback, self.metrics
        row = p.rows[f.row] if f.row < len(p.rows) else None
        classifier = recorder.spec.task == "classifier" and f.label is not None and row
        regressor = recorder.spec.task == "regressor" and f.label is not None and row
        if classifier:
            inc = quality.classifier_increments(row, f.label)  # type: ignore[arg-type]
            calibration = (p.model, p.target, p.version, str(inc.calib_bin))
            m.calibrated.labels(*calibration).inc()
            m.confidence.labels(*calibration).inc(inc.confidence)
            if inc.correct:
                m.calibrated_correct.labels(*calibration).inc()
        elif regressor:
            abs_err, sq_err = quality.regressor_increments(row[0], f.label)  # type: ignore[index, arg-type]
        for segment, value in (("", ""), *p.segments.items()):
            labels = (p.model, p.target, p.version, segment, value)
            m.joined.labels(*labels).inc()
            if classifier:
                m.labelled.labels(*labels).inc()
                m.log_loss.labels(*labels).inc(inc.log_loss)
                if inc.correct:
                    m.correct.labels(*labels).inc()
            elif regressor:
                m.labelled.labels(*labels).inc()
                m.abs_error.labels(*labels).inc(abs_err)
                m.sq_error.labels(*labels).inc(sq_err)
            for name, outcome in f.business.items():
                m.business.labels(*labels, name).inc(outcome)
                m.business_count.labels(*labels, name).inc()

    def arms(self, route: "Route", canary: str, primary: str, since: float) -> tuple[Arm, Arm] | None:
        """The A/B test's evidence: the test outcome over each target's answers since `since`
        (blocking SQL: the rollout controller calls it in a thread). None until both arms have some."""
        test = route.spec.outcomes.test if route.spec.outcomes is not None else None
        if test is None:
            return None
        a, b = (self.store.arm_stats(route.public, target, test.outcome, since) for target in (canary, primary))
        if not a.n or not b.n:
            return None
        return Arm(a.n, a.sum, a.sum_sq), Arm(b.n, b.sum, b.sum_sq)

    def reported(self, model: str, canary: str, outcome: str, decision: Decision) -> None:
        """Export one look of an A/B test: its confidence sequence and verdict."""
        verdict = {"not_worse": 1, "undecided": 0, "worse": -1}[decision.verdict]
        self.metrics.ab(model, canary, outcome, decision.lower, decision.estimate, decision.upper, verdict)

    def close(self) -> None:
        """Write every queued prediction, then stop the store's writer."""
        self.store.close()
