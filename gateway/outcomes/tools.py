"""`infergate report segments`, `infergate model-card` and `infergate retrain verify`: read the
join store the gateway writes (and, for the card, its admin API and the registry manifest) and
print Markdown; check a retrain webhook's signature."""
from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import time
from pathlib import Path

from gateway import config


def add_report_arguments(report: argparse._SubParsersAction) -> None:
    segments = report.add_parser("segments", help="quality and business outcomes per segment, with a disparity check")
    segments.add_argument("--model", required=True)
    segments.add_argument("--version", default="", help="only predictions of this backend version")
    _store_arguments(segments)
    segments.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")


def add_card_arguments(card: argparse.ArgumentParser) -> None:
    card.add_argument("--model", required=True, help="the public model name (its route)")
    card.add_argument("--version", required=True, help="the backend version the card is about")
    card.add_argument("--admin", default="http://127.0.0.1:9002", help="the running gateway's admin URL")
    card.add_argument("--token", default=os.environ.get("INFERGATE_TOKEN"),
                      help="bearer token for the admin API (default: $INFERGATE_TOKEN)")
    card.add_argument("--ca-cert", type=Path, help="CA bundle (PEM) that signed an https admin listener's certificate")
    _store_arguments(card)
    card.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/gateway.yaml", help="gateway.yaml: the store and the route's outcomes")
    parser.add_argument("--hours", type=float, default=None, help="only predictions of the last HOURS")
    parser.add_argument("--threshold", type=float, default=0.05, help="flag a segment worse than the rest by more")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance (Bonferroni-corrected over segments)")
    parser.add_argument("--min-n", type=int, default=30, help="rows a segment needs to be tested")


def segments_markdown(args: argparse.Namespace) -> str:
    """The segment report of args.model (and args.version) from the join store gateway.yaml names;
    ValueError saying why there is none."""
    from gateway.outcomes.hub import store_url
    from gateway.outcomes.report import render, segment_reports
    from gateway.outcomes.store import JoinStore

    try:
        loaded = config.load(args.config)
    except config.ConfigError as e:
        raise ValueError(str(e)) from None
    route = loaded.routing.models.get(args.model)
    if route is None or route.outcomes is None or loaded.gateway.outcomes is None:
        raise ValueError(f"{args.model}: no such model with an 'outcomes' section in {loaded.routing_path}")
    store = JoinStore(store_url(loaded.gateway.outcomes, loaded.gateway_path.parent), writer=False)
    try:
        since = time.time() - args.hours * 3600 if args.hours else None
        joined = store.joined(args.model, args.version or None, since)
    finally:
        store.close()
    return render(args.model, args.version, joined, segment_reports(joined, route.outcomes, args.threshold, args.alpha,
                                                                    args.min_n))


def report_command(args: argparse.Namespace) -> int:
    try:
        text = segments_markdown(args)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    _write(text, args.out)
    return 0


def card_command(args: argparse.Namespace) -> int:
    """The card is always written: a part that cannot be filled (no store, gateway down) says why."""
    from gateway.outcomes.card import NotAvailable, gather_live, render_card

    try:
        segments: str | NotAvailable = segments_markdown(args)
    except Exception as e:  # noqa: BLE001 - a missing store leaves one section empty, not the card
        segments = NotAvailable(f"the segment report could not be read: {e}")
    trust = ssl.create_default_context(cafile=str(args.ca_cert)) if args.ca_cert else None
    manifest, live = asyncio.run(gather_live(args.admin, args.model, args.version, token=args.token, segments=segments,
                                             ssl_context=trust))
    _write(render_card(manifest, live), args.out)
    return 0


def _write(text: str, out: Path | None) -> None:
    if out:
        out.write_text(text)
    else:
        print(text)
