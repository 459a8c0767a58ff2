"""The producer's side: `infergate registry publish` signs a model version into the registry
(its id is the signature's root digest, so versions are immutable), `infergate registry promote`
records a promotion to a stage and adds one approver's signature to it (k of n are needed)."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from gateway.registry.manifest import FILE as MANIFEST_FILE, Manifest
from gateway.registry.signing import generate_key, sign_promotion, sign_tree
from gateway.registry.store import DirectoryStore, Promotion

STAGES = ("staging", "production")


def publish(registry: Path, model: str, files: Path, config: Path, manifest: Manifest, key: Path) -> str:
    """Sign a version (Triton's version files, the model's config.pbtxt, the manifest) into the
    registry; its digest. Publishing the same content again changes nothing."""
    if manifest.model != model:
        raise ValueError(f"the manifest is for model {manifest.model!r}, not {model!r}")
    with tempfile.TemporaryDirectory(prefix="infergate-publish-") as tmp:
        tree = Path(tmp) / "model"
        shutil.copytree(files, tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(config, tree / "config.pbtxt")
        (tree / MANIFEST_FILE).write_bytes(manifest.to_json())
        digest = sign_tree(tree, Path(tmp) / "model.sig", key)
        DirectoryStore(registry).write_version(model, tree, Path(tmp) / "model.sig", digest)
    return digest


def promote(registry: Path, model: str, digest: str, stage: str, key: Path, requested_by: str = "") -> Promotion:
    """This key approves promoting digest to stage: its signature joins the stage's newest
    promotion when that is for digest, else a new promotion (the next seq) is made for it."""
    store = DirectoryStore(registry)
    if digest not in store.versions(model):
        raise ValueError(f"the registry has no version {digest} of {model}")
    promotions = store.promotions(model, stage)
    newest = promotions[-1] if promotions else None
    if newest is None or newest.version != digest:
        raw = {"model": model, "stage": stage, "version": digest, "seq": (newest.seq + 1) if newest else 1,
               "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
               "requested_by": requested_by}
        store.write_promotion(raw)
        newest = store.promotions(model, stage)[-1]
    approval = sign_promotion(newest.raw, key)
    approval["approved_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    store.add_approval(newest, approval)
    return store.promotions(model, stage)[-1]


def add_registry_arguments(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`infergate registry publish | promote | keygen`."""
    pub = subparsers.add_parser("publish", help="sign a model version into the registry; prints its digest")
    pub.add_argument("--registry", type=Path, required=True)
    pub.add_argument("--model", required=True)
    pub.add_argument("--files", type=Path, required=True, help="the Triton version directory (e.g. models/m/3)")
    pub.add_argument("--config", type=Path, required=True, help="the model's config.pbtxt")
    pub.add_argument("--key", type=Path, required=True, help="the producer's ECDSA P-256 private key (PEM)")
    pub.add_argument("--training-commit", required=True)
    pub.add_argument("--dataset-snapshot", required=True)
    pub.add_argument("--trained-at", required=True, metavar="ISO8601")
    pub.add_argument("--feature-schema-version", required=True)
    pub.add_argument("--hyperparameter", action="append", default=[], metavar="K=V")
    pub.add_argument("--metric", action="append", default=[], metavar="K=V", help="an evaluation metric (a number)")
    pub.add_argument("--risk-tier", default="standard")
    pub.add_argument("--intended-use", default="")
    pub.add_argument("--limitations", default="")
    pub.add_argument("--producer", default="")
    pro = subparsers.add_parser("promote", help="approve (and if new, request) a version's promotion to a stage")
    pro.add_argument("--registry", type=Path, required=True)
    pro.add_argument("--model", required=True)
    pro.add_argument("--version", required=True, help="the digest `publish` printed")
    pro.add_argument("--stage", choices=STAGES, required=True)
    pro.add_argument("--key", type=Path, required=True, help="this approver's ECDSA P-256 private key (PEM)")
    pro.add_argument("--requested-by", default="")
    gen = subparsers.add_parser("keygen", help="write an ECDSA P-256 key pair (PEM and .pub)")
    gen.add_argument("--out", type=Path, required=True)


def registry_command(args: argparse.Namespace) -> int:
    """Run publish, promote or keygen; 1 with the reason on stderr when it cannot."""
    try:
        if args.registry_command == "publish":
            manifest = Manifest(model=args.model, training_commit=args.training_commit,
                                dataset_snapshot=args.dataset_snapshot, trained_at=args.trained_at,
                                feature_schema_version=args.feature_schema_version,
                                hyperparameters=_pairs(args.hyperparameter, "--hyperparameter", str),
                                metrics=_pairs(args.metric, "--metric", float), risk_tier=args.risk_tier,
                                intended_use=args.intended_use, limitations=args.limitations, producer=args.producer)
            print(publish(args.registry, args.model, args.files, args.config, manifest, args.key))
        elif args.registry_command == "promote":
            promotion = promote(args.registry, args.model, args.version, args.stage, args.key, args.requested_by)
            print(f"{args.model} {args.stage} promotion {promotion.seq}: {promotion.version} "
                  f"({len(promotion.approvals)} approval(s))")
        else:
            generate_key(args.out)
            print(f"{args.out}, {args.out}.pub")
    except (OSError, ValueError) as e:
        print(f"infergate registry {args.registry_command}: {e}", file=sys.stderr)
        return 1
    return 0


def _pairs(items: list[str], option: str, kind: type) -> dict:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not (name and sep):
            raise ValueError(f"{option} expects K=V, got {item!r}")
        pairs[name] = kind(value)
    return pairs
