"""The model card of one served version (`infergate model-card`): what the producer declared in
the registry manifest (lineage, training data snapshot, evaluation metrics, intended use and
limits) beside what the gateway sees live (traffic share, online quality, segment disparities,
drift status, age). A part that cannot be filled says so and why; the card is always written."""
from __future__ import annotations

import math
import ssl
import time
from urllib.parse import quote
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.chain import iso_from_unix
from gateway.drift.profile import unix_time


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """A part of the card that could not be filled, and why."""

    reason: str


NOT_GATHERED = NotAvailable("not gathered")


@dataclass(frozen=True, slots=True)
class TrafficShare:
    """One target of the route: its version, file weight, the percentage it serves now (blue-green,
    overrides and rollout applied) and the requests it answered since the gateway started."""

    target: str
    version: str
    file_weight: int
    serving: int
    requests: float | None = None


@dataclass(frozen=True, slots=True)
class OnlineQuality:
    """Quality figures by metric name (accuracy, log_loss, calibration_error, mae, rmse,
    outcome:<name>), over n labelled outcomes, and what they are computed over."""

    figures: Mapping[str, float]
    n: int
    basis: str


@dataclass(frozen=True, slots=True)
class DriftStatus:
    """The drift engine's latest judgement of the version: statistics per feature, the features
    alerting, the judged window's size and whether the version is stale."""

    statistics: Mapping[str, Mapping[str, float]]
    alerting: Sequence[str] = ()
    window_requests: float | None = None
    stale: bool | None = None


@dataclass(frozen=True, slots=True)
class LiveFigures:
    """What the gateway sees of model (its public route name) version now."""

    model: str
    version: str
    now: float = field(default_factory=time.time)
    traffic: Sequence[TrafficShare] | NotAvailable = NOT_GATHERED
    quality: OnlineQuality | NotAvailable = NOT_GATHERED
    segments: str | NotAvailable = NOT_GATHERED      # Markdown: the disparity report, already rendered
    drift: DriftStatus | NotAvailable = NOT_GATHERED
    model_age_s: float | None = None                 # the gateway's own figure, when the manifest has no trained_at


# ---------------------------------------------------------------- rendering


def render_card(manifest: Mapping[str, Any] | NotAvailable, live: LiveFigures) -> str:
    """The card as Markdown: the registry manifest's declarations, then the live figures."""
    declared = manifest if isinstance(manifest, Mapping) else {}
    absent = manifest.reason if isinstance(manifest, NotAvailable) else "the registry manifest does not declare it"
    lines = [f"# Model card: {live.model} version {live.version or '(unversioned)'}", "",
             f"Generated {iso_from_unix(live.now)} from the registry manifest and the running gateway.", ""]
    lines += _section("Lineage", _lineage(declared, absent) if declared else [_missing(absent)])
    lines += _section("Training data snapshot", [f"`{declared['dataset_snapshot']}`"] if declared.get("dataset_snapshot")
                      else [_missing(absent)])
    metrics = declared.get("metrics") or {}
    lines += _section("Evaluation metrics (declared by the producer)",
                      _table(("metric", "value"), [(k, _number(v)) for k, v in sorted(metrics.items())])
                      if isinstance(metrics, Mapping) and metrics else [_missing(absent)])
    for title, key in (("Intended use", "intended_use"), ("Limitations", "limitations")):
        text = declared.get(key)
        lines += _section(title, [str(text).strip()] if text else [_missing(absent)])
    lines += _section("Traffic share", _traffic(live))
    lines += _section("Online quality", _quality(live.quality, metrics if isinstance(metrics, Mapping) else {}))
    lines += _section("Segment disparities", [_nested(live.segments)] if isinstance(live.segments, str) and live.segments.strip()
                      else [_missing(live.segments.reason if isinstance(live.segments, NotAvailable)
                                     else "the segment report is empty")])
    lines += _section("Drift status", _drift(live.drift))
    lines += _section("Age", _age(declared, absent, live))
    return "\n".join(lines).rstrip() + "\n"


def _lineage(declared: Mapping[str, Any], absent: str) -> list[str]:
    rows = [(title, str(declared[key]) if declared.get(key) not in (None, "") else f"not available: {absent}")
            for title, key in (("registry model", "model"), ("digest", "digest"), ("training commit", "training_commit"),
                               ("trained at", "trained_at"), ("feature schema version", "feature_schema_version"),
                               ("risk tier", "risk_tier"), ("producer", "producer"))]
    params = declared.get("hyperparameters")
    if isinstance(params, Mapping) and params:
        rows.append(("hyperparameters", ", ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in sorted(params.items()))))
    return _table(("field", "value"), rows)


def _traffic(live: LiveFigures) -> list[str]:
    if isinstance(live.traffic, NotAvailable):
        return [_missing(live.traffic.reason)]
    total = sum(t.requests for t in live.traffic if t.requests is not None)
    rows = [(t.target + (" (this version)" if t.version == live.version else ""), t.version or "*", f"{t.file_weight}%",
             f"{t.serving}%", "—" if t.requests is None else f"{t.requests:.0f}",
             f"{t.requests / total:.1%}" if t.requests is not None and total else "—") for t in live.traffic]
    lines = _table(("target", "version", "file weight", "serving now", "requests since start", "share of requests"), rows)
    if not any(t.version == live.version for t in live.traffic):
        lines += ["", f"No target of {live.model} serves version {live.version} now: it takes no traffic."]
    return lines


def _quality(quality: OnlineQuality | NotAvailable, evaluation: Mapping[str, Any]) -> list[str]:
    if isinstance(quality, NotAvailable):
        return [_missing(quality.reason)]
    if not quality.figures:
        return [_missing(f"no figure over {quality.basis}")]
    rows = [(name, _number(value), _number(evaluation[name]) if name in evaluation else "—")
            for name, value in quality.figures.items()]
    return [f"Over {quality.n} labelled outcomes: {quality.basis}.", "",
            *_table(("metric", "online", "at evaluation"), rows)]


def _drift(drift: DriftStatus | NotAvailable) -> list[str]:
    if isinstance(drift, NotAvailable):
        return [_missing(drift.reason)]
    alerting = [f for f in drift.statistics if f in drift.alerting] + [f for f in drift.alerting if f not in drift.statistics]
    head = (f"**Alerting** on {len(alerting)} of {len(drift.statistics)} monitored features: {', '.join(alerting)}."
            if alerting else f"No drift alert on {len(drift.statistics)} monitored features.")
    if drift.window_requests is not None:
        head += f" Judged window: {drift.window_requests:.0f} requests."
    if drift.stale is not None:
        head += " The version is **stale** (older than stale_after_s)." if drift.stale else " Not stale."
    rows = [(feature + (" (alert)" if feature in drift.alerting else ""),
             ", ".join(f"{k}={_number(v)}" for k, v in sorted(stats.items())))
            for feature, stats in drift.statistics.items()]
    return [head, "", *_table(("feature", "statistics"), rows)] if rows else [head]


def _age(declared: Mapping[str, Any], absent: str, live: LiveFigures) -> list[str]:
    trained_at = declared.get("trained_at")
    if trained_at:
        try:
            age = live.now - unix_time(str(trained_at))
        except ValueError as e:
            return [_missing(f"trained_at {trained_at!r} unreadable: {e}")]
        return [f"{_duration(age)} (trained at {trained_at})."]
    if live.model_age_s is not None:
        return [f"{_duration(live.model_age_s)} (the gateway's figure: no trained_at in the registry manifest)."]
    return [_missing(f"no training time: {absent}, and the gateway exports no model age for this version")]


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


def _nested(markdown: str) -> str:
    """Another report's Markdown inside a section: its headings two levels down."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.strip().splitlines())


def _section(title: str, body: list[str]) -> list[str]:
    return [f"## {title}", "", *body, ""]


def _missing(reason: str) -> str:
    return f"_Not available: {reason}._"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _cell(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"
    return [line(head), "|" + "|".join("---" for _ in head) + "|", *(line(r) for r in rows)]


# ---------------------------------------------------------------- reading the gateway


Samples = list[tuple[str, dict[str, str], float]]   # metric sample name, labels, value


def parse_metrics(text: str) -> Samples:
    """The samples of a Prometheus text exposition (the admin listener's /metrics)."""
    return [(s.name, s.labels, float(s.value)) for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples: Samples, name: str, **match: str) -> float | None:
    """The sum of name's samples whose labels include match; None when there is none."""
    values = [v for n, labels, v in samples if n == name and all(labels.get(k) == m for k, m in match.items())]
    return sum(values) if values else None


def traffic_from(routes: list[dict[str, Any]], model: str, samples: Samples | None) -> list[TrafficShare] | NotAvailable:
    """Each target of model's route from `GET /admin/routes`, with its answered requests from /metrics."""
    route = next((r for r in routes if r.get("model") == model), None)
    if route is None:
        return NotAvailable(f"the gateway has no route {model!r}, or the caller may not administer it")
    return [TrafficShare(t["name"], t["version"], t["file_weight"], t["serving"], None if samples is None else
                         _total(samples, "infergate_requests_total", model=model, target=t["name"]) or 0.0)
            for t in route["targets"]]


def manifest_from(manifests: list[dict[str, Any]], model: str, version: str) -> Mapping[str, Any] | NotAvailable:
    """Version's registry manifest from `GET /admin/routes/{model}/manifests`."""
    entries = [m for m in manifests if m.get("version") == version]
    if not entries:
        return NotAvailable(f"no target of {model} serves version {version}, so the gateway cannot read its manifest")
    found = next((m["manifest"] for m in entries if m.get("manifest")), None)
    if found is None:
        return NotAvailable(f"version {version} was not installed by registry-sync: its model config carries no manifest")
    return found


def drift_from(samples: Samples, model: str, version: str) -> DriftStatus | NotAvailable:
    """The drift engine's exported judgement of model version (infergate_drift_* gauges)."""
    statistics: dict[str, dict[str, float]] = {}
    alerting = []
    for name, labels, value in samples:
        if labels.get("model") != model or labels.get("version") != version:
            continue
        if name == "infergate_drift_statistic":
            statistics.setdefault(labels["feature"], {})[labels["statistic"]] = value
        elif name == "infergate_drift_alert" and value >= 1:
            alerting.append(labels["feature"])
    if not statistics and not alerting:
        return NotAvailable(f"the gateway exports no drift statistics for {model} version {version}: it has no drift "
                            "profile, or its window has not reached min_count yet")
    stale = _total(samples, "infergate_model_stale", model=model, version=version)
    return DriftStatus(statistics, sorted(alerting), _total(samples, "infergate_drift_window_requests", model=model,
                                                            version=version),
                       None if stale is None else stale >= 1)


def quality_from(samples: Samples, model: str, version: str) -> OnlineQuality | NotAvailable:
    """Online quality from the outcome counters (infergate_outcome_*, every target serving the
    version, all segments together), since the gateway's workers started."""
    overall = {"model": model, "version": version, "segment": ""}
    labelled = _total(samples, "infergate_outcome_labelled_total", **overall) or 0.0
    figures: dict[str, float] = {}
    log_loss = _total(samples, "infergate_outcome_log_loss_total", **overall)
    abs_error = _total(samples, "infergate_outcome_abs_error_total", **overall)
    if labelled and log_loss is not None:
        figures["accuracy"] = (_total(samples, "infergate_outcome_correct_total", **overall) or 0.0) / labelled
        figures["log_loss"] = log_loss / labelled
        bins = {labels["bin"] for n, labels, _ in samples if n == "infergate_outcome_calibration_total"
                and labels.get("model") == model and labels.get("version") == version}
        if bins:
            gap = sum(abs((_total(samples, "infergate_outcome_calibration_correct_total", model=model, version=version, bin=b) or 0.0)
                          - (_total(samples, "infergate_outcome_confidence_total", model=model, version=version, bin=b) or 0.0))
                      for b in bins)
            figures["calibration_error"] = gap / labelled
    elif labelled and abs_error is not None:
        figures["mae"] = abs_error / labelled
        figures["rmse"] = math.sqrt((_total(samples, "infergate_outcome_squared_error_total", **overall) or 0.0) / labelled)
    outcomes = sorted({labels["outcome"] for n, labels, _ in samples if n == "infergate_outcome_business_observed_total"
                       and all(labels.get(k) == v for k, v in overall.items())})
    for outcome in outcomes:
        count = _total(samples, "infergate_outcome_business_observed_total", **overall, outcome=outcome)
        if count:
            figures[f"outcome:{outcome}"] = (_total(samples, "infergate_outcome_business_total", **overall,
                                                    outcome=outcome) or 0.0) / count
    if not figures:
        return NotAvailable(f"no outcome joined to a prediction of {model} version {version} since the gateway started")
    return OnlineQuality(figures, int(labelled), "the gateway's outcome counters since its workers started "
                         "(all targets serving this version; business outcomes are means over the outcomes reporting them)")


async def gather_live(admin_url: str, model: str, version: str, *, token: str | None = None,
                      quality: OnlineQuality | NotAvailable | None = None, segments: str | NotAvailable | None = None,
                      ssl_context: ssl.SSLContext | None = None, timeout_s: float = 10.0,
                      now: float | None = None) -> tuple[Mapping[str, Any] | NotAvailable, LiveFigures]:
    """The registry manifest and live figures of model version from a running gateway's admin
    listener: `GET /admin/routes` (traffic share), `GET /admin/routes/{model}/manifests` (the
    manifest), `GET /metrics` (requests, drift, age and, unless quality is given, online
    quality). segments: the disparity report's Markdown (the join store has it, not the API)."""
    base = admin_url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers) as session:
        routes = await _get(session, f"{base}/admin/routes", ssl_context)
        manifests = await _get(session, f"{base}/admin/routes/{quote(model, safe='')}/manifests", ssl_context)
        text = await _get(session, f"{base}/metrics", ssl_context)
    samples = None
    if not isinstance(text, NotAvailable):
        try:
            samples = parse_metrics(text.decode(errors="replace"))
        except ValueError as e:
            text = NotAvailable(f"GET /metrics answered something other than a Prometheus exposition: {e}")

    def unless_missing(got: bytes | NotAvailable, what: str, use: Callable[[Any], Any]) -> Any:
        if isinstance(got, NotAvailable):
            return got
        try:
            return use(orjson.loads(got))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            return NotAvailable(f"{what} answered something other than the admin API's JSON: {type(e).__name__}: {e}")

    no_metrics = text if isinstance(text, NotAvailable) else None
    live = LiveFigures(
        model, version, time.time() if now is None else now,
        traffic=unless_missing(routes, "GET /admin/routes", lambda doc: traffic_from(doc, model, samples)),
        quality=quality if quality is not None else no_metrics or quality_from(samples, model, version),
        segments=segments if segments is not None else NotAvailable("the segment report was not run for this card"),
        drift=no_metrics or drift_from(samples, model, version),
        model_age_s=_total(samples, "infergate_model_age_seconds", model=model, version=version) if samples else None)
    return unless_missing(manifests, f"GET /admin/routes/{model}/manifests", lambda doc: manifest_from(doc, model, version)), live


async def _get(session: aiohttp.ClientSession, url: str, ssl_context: ssl.SSLContext | None) -> bytes | NotAvailable:
    """The body of a 200 answer to GET url, else why there is none."""
    try:
        async with session.get(url, ssl=ssl_context if ssl_context is not None else True) as answer:
            body = await answer.read()
            if answer.status != 200:
                return NotAvailable(f"GET {url} answered HTTP {answer.status}: {body[:200].decode(errors='replace').strip()}")
            return body
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return NotAvailable(f"cannot read {url}: {type(e).__name__}: {e}")
