"""`infergate serve | check-config | routes | registry publish|promote|keygen|sync|rollback |
audit verify|query|purge|keygen | drift profile | report segments | model-card | retrain verify`: argument parsing only; the work lives in the rooms."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from gateway import __version__
from gateway.observability.trace import install_log_filter
from gateway.supervisor import LEADER_ENV, WORKER_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate", description="A fast gateway in front of Triton Inference Server.")
    parser.add_argument("--version", action="version", version=f"infergate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default="configs/gateway.yaml", help="gateway.yaml (it names the routing file)")
    serve.add_argument("--workers", type=int, help="override the config's worker count")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor
    check = sub.add_parser("check-config", help="validate config files without starting; exit 0 or list errors")
    check.add_argument("--config", default="configs/gateway.yaml")
    routes = sub.add_parser("routes", help="print the live route table of a running gateway")
    routes.add_argument("--admin", default="http://127.0.0.1:9002", help="the gateway's admin URL")
    routes.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")
    routes.add_argument("--token", default=os.environ.get("INFERGATE_TOKEN"),
                        help="bearer token for the admin API (default: $INFERGATE_TOKEN)")
    registry = sub.add_parser("registry", help="signed model versions: publish, promote, keygen, sync, rollback")
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["registry"]:  # model-signing takes half a second to import: only for this command
        from gateway.registry.publish import add_registry_arguments
        from gateway.registry.sync import add_sync_arguments

        registry_commands = registry.add_subparsers(dest="registry_command", required=True)
        add_registry_arguments(registry_commands)
        add_sync_arguments(registry_commands)
    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_command", required=True)
    from gateway.audit.tools import add_audit_arguments, audit_command

    add_audit_arguments(audit)
    drift = sub.add_parser("drift", help="drift tools").add_subparsers(dest="drift_command", required=True)
    profile = drift.add_parser("profile", help="build a model version's reference profile from a sample")
    from gateway.drift.profile import add_profile_arguments, profile_command

    add_profile_arguments(profile)
    report = sub.add_parser("report", help="reports over joined outcomes").add_subparsers(dest="report_command", required=True)
    from gateway.outcomes.tools import add_card_arguments, add_report_arguments, card_command, report_command

    add_report_arguments(report)
    add_card_arguments(sub.add_parser("model-card", help="a version's model card: registry manifest and live figures"))
    retrain = sub.add_parser("retrain", help="retrain signal tools").add_subparsers(dest="retrain_command", required=True)
    from gateway.outcomes.retrain import add_retrain_arguments, retrain_command

    add_retrain_arguments(retrain)
    args = parser.parse_args(argv)

    if args.command == "report":
        return report_command(args)
    if args.command == "model-card":
        return card_command(args)
    if args.command == "retrain":
        return retrain_command(args)
    if args.command == "drift":
        return profile_command(args)
    if args.command == "audit":
        return audit_command(args)
    if args.command == "registry":
        from gateway.registry.publish import registry_command
        from gateway.registry.sync import sync_command

        return sync_command(args) if args.registry_command in ("sync", "rollback") else registry_command(args)
    if args.command == "routes":
        from gateway.routing.report import print_routes

        return print_routes(args.admin, args.json, args.token)

    from gateway import config

    try:
        loaded = config.load(args.config)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"{loaded.gateway_path}: ok ({len(loaded.gateway.backends)} backends)\n"
              f"{loaded.routing_path}: ok ({len(loaded.routing.models)} models)")
        return 0

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s [trace=%(trace_id)s]: %(message)s")
    install_log_filter()
    workers = args.workers or loaded.gateway.workers
    if workers > 1 and not args.worker:
        from gateway.supervisor import supervise

        return supervise(sys.argv[1:] if argv is None else argv, workers)

    import uvloop

    from gateway.worker import serve as run

    uvloop.run(run(loaded, reuse_port=args.worker, leader=os.environ.get(LEADER_ENV, "1") == "1",
                   index=int(os.environ.get(WORKER_ENV, "0"))))
    return 0
