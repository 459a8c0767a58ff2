"""`infergate report segments` and `infergate model-card`: read the join store the gateway writes
(and, for the card, its admin API and the registry manifest) and print Markdown."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gateway import config


def add_report_arguments(report: argparse._SubParsersAction) -> None:
    segments = report.add_parser("segments", help="quality and business outcomes per segment, with a disparity check")
    segments.add_argument("--config", default="configs/gateway.yaml", help="gateway.yaml: the store and the route's outcomes")
    segments.add_argument("--model", required=True)
    segments.add_argument("--version", default="", help="only predictions of this backend version")
    segments.add_argument("--hours", type=float, default=None, help="only predictions of the last HOURS")
    segments.add_argument("--threshold", type=float, default=0.05, help="flag a segment worse than the rest by more")
    segments.add_argument("--alpha", type=float, default=0.05, help="significance (Bonferroni-corrected over segments)")
    segments.add_argument("--min-n", type=int, default=30, help="rows a segment needs to be tested")
    segments.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")


def report_command(args: argparse.Namespace) -> int:
    from gateway.outcomes.hub import store_url
    from gateway.outcomes.report import render, segment_reports
    from gateway.outcomes.store import JoinStore

    try:
        loaded = config.load(args.config)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    route = loaded.routing.models.get(args.model)
    if route is None or route.outcomes is None or loaded.gateway.outcomes is None:
        print(f"{args.model}: no such model with an 'outcomes' section in {loaded.routing_path}", file=sys.stderr)
        return 1
    store = JoinStore(store_url(loaded.gateway.outcomes, loaded.gateway_path.parent), writer=False)
    try:
        since = time.time() - args.hours * 3600 if args.hours else None
        joined = store.joined(args.model, args.version or None, since)
    finally:
        store.close()
    text = render(args.model, args.version, joined,
                  segment_reports(joined, route.outcomes, args.threshold, args.alpha, args.min_n))
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0
