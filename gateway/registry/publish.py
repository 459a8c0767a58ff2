"""The producer's side: `infergate registry publish` signs a model version into the registry (its
id is the signature's root digest, so a version is immutable and publishing it again changes
nothing), `infergate registry promote` requests a version for a stage and adds one approver's
signature to that promotion (registry-sync needs k of n), `infergate registry keygen` makes keys."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import orjson

from gateway.audit.chain import public_key_path
from gateway.registry.manifest import FILE as MANIFEST, Manifest
from gateway.registry.signing import RegistryRefusal, generate_key, key_id, sign_promotion, sign_tree
from gateway.registry.store import SIGNATURE, TREE, DirectoryStore, Promotion

CONFIG = "config.pbtxt"
STAGES = ("staging", "production")


def publish(registry: Path, model: str, files: Path, config: Path, manifest: Manifest, key: Path) -> str:
    """Sign a version into the registry: the Triton version files in files (links followed, so the
    tree holds what they point at; no `__pycache__`), the model's config.pbtxt and the manifest,
    as one tree; its digest."""
    if manifest.model != model:
        raise ValueError(f"the manifest is for model {manifest.model!r}, not {model!r}")
    with tempfile.TemporaryDirectory(prefix="infergate-publish-") as scratch:
        tree, signature = Path(scratch) / TREE, Path(scratch) / SIGNATURE
        shutil.copytree(files, tree, ignore=shutil.ignore_patterns("__pycache__"))
        for name, data in ((CONFIG, Path(config).read_bytes()), (MANIFEST, manifest.to_json())):
            if os.path.lexists(tree / name):
                raise ValueError(f"{files} holds a {name} of its own; publish writes it from --config and the manifest")
            (tree / name).write_bytes(data)
        sign_tree(tree, signature, key)
        return DirectoryStore(registry).write_version(model, tree, signature)


def promote(registry: Path, model: str, digest: str, stage: str, key: Path, requested_by: str = "") -> Promotion:
    """Approve digest for stage with key: the approval joins the stage's newest promotion when that
    is of digest, else a new promotion (the next seq) is made for it; the promotion as it now stands."""
    store = DirectoryStore(registry)
    if digest not in store.versions(model):
        raise RegistryRefusal(f"the registry has no version {digest} of {model}")
    promotions = store.promotions(model, stage)
    if promotions and promotions[-1].version == digest:
        promotion = promotions[-1]
    else:
        promotion = store.write_promotion(model, stage, digest, requested_by)
    return store.add_approval(model, stage, promotion.seq, sign_promotion(promotion.raw, key))


# ---------------------------------------------------------------- CLI


def _pair(parse: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    """An argparse type for K=V, V parsed by parse."""
    def pair(text: str) -> tuple[str, Any]:
        name, sep, value = text.partition("=")
        if not (name and sep):
            raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
        try:
            return name, parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the value is not a number") from None
    return pair


def _json_or_text(value: str) -> Any:
    """A hyperparameter value: JSON when it parses (0.01, 3, true, [1, 2]), else the text itself."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


def add_registry_arguments(subparsers: argparse._SubParsersAction) -> None:
    """`publish`, `promote` and `keygen` under `infergate registry`."""
    pub = subparsers.add_parser("publish", help="sign a model version into the registry; prints its digest")
    pub.add_argument("--registry", type=Path, required=True, help="the registry directory")
    pub.add_argument("--model", required=True)
    pub.add_argument("--files", type=Path, required=True, help="the Triton version directory, e.g. models/m/3")
    pub.add_argument("--config", type=Path, required=True, help="the model's config.pbtxt")
    pub.add_argument("--key", type=Path, required=True, help="the producer's ECDSA P-256 private key (PEM)")
    pub.add_argument("--training-commit", required=True)
    pub.add_argument("--dataset-snapshot", required=True)
    pub.add_argument("--hyperparameter", type=_pair(_json_or_text), action="append", default=[], metavar="K=V",
                     help="repeatable; V is JSON when it parses, else text")
    pub.add_argument("--metric", type=_pair(float), action="append", default=[], metavar="K=V",
                     help="an evaluation metric (a number); repeatable")
    pub.add_argument("--trained-at", required=True, metavar="ISO8601", help="in UTC, e.g. 2026-01-01T00:00:00Z")
    pub.add_argument("--feature-schema-version", required=True)
    pub.add_argument("--risk-tier", default="standard", help="names the approval rule promotions need")
    pub.add_argument("--intended-use", default="")
    pub.add_argument("--limitations", default="")
    pub.add_argument("--producer", default="")
    pro = subparsers.add_parser("promote", help="approve (and when new, request) a version's promotion to a stage")
    pro.add_argument("--registry", type=Path, required=True, help="the registry directory")
    pro.add_argument("--model", required=True)
    pro.add_argument("--version", required=True, metavar="DIGEST", help="the digest `publish` printed")
    pro.add_argument("--stage", choices=STAGES, required=True)
    pro.add_argument("--key", type=Path, required=True, help="this approver's ECDSA P-256 private key (PEM)")
    pro.add_argument("--requested-by", default="")
    gen = subparsers.add_parser("keygen", help="write an ECDSA P-256 key pair: PEM private key and PEM.pub")
    gen.add_argument("--out", type=Path, required=True, metavar="PEM")


def registry_command(args: argparse.Namespace) -> int:
    """Run `publish`, `promote` or `keygen` as parsed by add_registry_arguments: 0, or 1 with the
    reason on stderr."""
    try:
        if args.registry_command == "publish":
            manifest = Manifest(
                model=args.model, training_commit=args.training_commit, dataset_snapshot=args.dataset_snapshot,
                trained_at=args.trained_at, feature_schema_version=args.feature_schema_version,
                hyperparameters=dict(args.hyperparameter), metrics=dict(args.metric), risk_tier=args.risk_tier,
                intended_use=args.intended_use, limitations=args.limitations, producer=args.producer)
            print(publish(args.registry, args.model, args.files, args.config, manifest, args.key))
        elif args.registry_command == "promote":
            promotion = promote(args.registry, args.model, args.version, args.stage, args.key, args.requested_by)
            print(orjson.dumps({**promotion.raw, "approvals": sorted(a["key_id"] for a in promotion.approvals)}).decode())
        else:
            generate_key(args.out)
            public = public_key_path(args.out)
            print(f"{args.out} (public key {public}, key id {key_id(public.read_bytes())})")
    except (RegistryRefusal, ValueError, OSError) as e:
        print(f"infergate registry {args.registry_command}: {e}", file=sys.stderr)
        return 1
    return 0
