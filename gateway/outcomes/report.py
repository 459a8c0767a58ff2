"""Segment reports over joined outcomes (`infergate report segments`): each declared segment
attribute, each quality metric the route's task has and each business outcome, per segment value,
with the disparity check ops run before promoting a version."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gateway import config
from gateway.outcomes import quality
from gateway.outcomes.records import Joined


@dataclass(frozen=True, slots=True)
class Column:
    """One metric's per-row terms over the joined rows that have them."""

    metric: str                 # a quality.METRICS name
    title: str                  # what the report calls it
    terms: np.ndarray
    keep: np.ndarray            # which joined rows the terms belong to


def columns(joined: list[Joined], spec: config.Outcomes) -> list[Column]:
    """The per-row terms of every metric this route has, in report order."""
    out = []
    labelled = [k for k, j in enumerate(joined) if j.feedback.label is not None and j.feedback.row < len(j.prediction.rows)]
    if labelled and spec.task != "none":
        rows = [joined[k].prediction.rows[joined[k].feedback.row] for k in labelled]
        labels = [joined[k].feedback.label for k in labelled]
        keep = np.asarray(labelled, np.int64)
        if spec.task == "classifier":
            terms = quality.classifier_terms(rows, labels)
            out += [Column("accuracy", "accuracy", terms.correct.astype(np.float64), keep),
                    Column("log_loss", "log-loss", terms.log_loss, keep)]
        else:
            terms_r = quality.regressor_terms([r[0] for r in rows], labels)
            out += [Column("mae", "MAE", terms_r.abs_err, keep), Column("rmse", "RMSE", terms_r.sq_err, keep)]
    for name, kind in spec.business.items():
        having = [k for k, j in enumerate(joined) if name in j.feedback.business]
        if having:
            out.append(Column(kind, name, np.asarray([joined[k].feedback.business[name] for k in having]),
                              np.asarray(having, np.int64)))
    return out


def segment_reports(joined: list[Joined], spec: config.Outcomes, threshold: float = 0.05, alpha: float = 0.05,
                    min_n: int = 30) -> list[quality.DisparityReport]:
    """A disparity report per (segment attribute, metric)."""
    reports = []
    for column in columns(joined, spec):
        for attribute in spec.segments:
            values = [joined[k].prediction.segments.get(attribute, "other") for k in column.keep]
            report = quality.disparity(values, column.terms, column.metric, attribute=attribute,
                                       threshold=threshold, alpha=alpha, min_n=min_n)
            reports.append(_titled(report, column.title))
    return reports


def render(model: str, version: str, joined: list[Joined], reports: list[quality.DisparityReport]) -> str:
    """The whole report as Markdown; a flagged segment is listed first."""
    flagged = [f"{r.metric} for {r.attribute}={s}" for r in reports for s in r.flagged]
    head = [f"# Segments: {model}" + (f" version {version}" if version else ""), "",
            f"{len(joined)} joined outcomes.", ""]
    if not reports:
        head.append("No segment attribute or no metric with joined outcomes: nothing to compare.")
    else:
        head.append(("**Disparities flagged:** " + "; ".join(flagged)) if flagged else "No disparity flagged.")
    return "\n".join(head) + "\n\n" + "\n".join(quality.render_markdown(r) for r in reports)


def _titled(report: quality.DisparityReport, title: str) -> quality.DisparityReport:
    """The report named after the business outcome it measures, not its kind (rate or mean)."""
    return replace(report, metric=title)
