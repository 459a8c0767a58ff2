"""Audit tools for people: verify a log directory end to end, query its records, purge a data
subject's records (leaving stubs a signed purge record lists), and the `infergate audit` commands."""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.chain import (ZERO_HASH, Record, canonical, check_chain, create_key, first_seq_of, fsync_dir,
                                 iso_now, iso_time, key_id, load_key, load_public_keys, parse_line, public_key_path,
                                 read_seal, seal_mismatch, seal_path, segment_paths, sign, signature_problem, stub_line,
                                 try_lock, write_atomic, write_synced)

PURGES = "purges.jsonl"   # beside the stream directories


def _streams(directory: Path) -> list[Path]:
    """The stream directories under an audit directory: those holding segments."""
    return sorted(d for d in Path(directory).iterdir() if d.is_dir() and segment_paths(d))


# ---------------------------------------------------------------- verify


@dataclass
class Report:
    """What verify found. Problems fail it, the first naming the first broken place as
    "<file>:<line>: seq N: <reason>"; notes (a running writer's unsealed tail) do not."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    segments: int = 0
    streams: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(directory: Path, public_keys: Mapping[str, Ed25519PublicKey]) -> Report:
    """Check the purge records' signatures, then each stream: its hash chain across segments, each
    segment against its signed seal, every stub against the purge records, and a start past seq 0
    against the retention records."""
    return _Verifier(Path(directory), public_keys).run()


class _Verifier:
    def __init__(self, directory: Path, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.directory = directory
        self.keys = keys
        self.report = Report()
        self.purged: dict[tuple[str, int], str] = {}     # (stream, seq) -> digest a valid purge record lists
        self.vouched: set[tuple[Any, Any]] = set()        # (through_seq, head) of the stream's sealed retention records

    def run(self) -> Report:
        self.purge_records()
        for stream_dir in _streams(self.directory):
            self.stream(stream_dir)
        if not self.report.streams:
            self.report.problems.append(f"{self.directory}: no audit segments")
        return self.report

    def problem(self, where: str, reason: str) -> None:
        self.report.problems.append(f"{where}: {reason}")

    def purge_records(self) -> None:
        path = self.directory / PURGES
        if not path.exists():
            return
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                doc = orjson.loads(raw)
                problem = signature_problem(doc, self.keys) if isinstance(doc, dict) else "not a JSON object"
            except ValueError as e:
                problem = f"not JSON: {e}"
            if problem:
                self.problem(f"{PURGES}:{n}", problem)
            else:
                self.purged.update(((r["stream"], r["seq"]), r["digest"]) for r in doc["removed"])

    def stream(self, stream_dir: Path) -> None:
        """Walk one stream's chain through its segments, oldest first."""
        paths = segment_paths(stream_dir)
        self.report.streams += 1
        self.report.segments += len(paths)
        self.vouched = set()
        start, first = len(self.report.problems), first_seq_of(paths[0])
        seq, prev = first, (ZERO_HASH if first == 0 else None)
        opening: Record | None = None
        for path in paths:
            walk = self.segment(stream_dir.name, path, path == paths[-1], seq, prev)
            if walk and path == paths[0]:
                opening = walk[0][1]
            if walk:
                seq, last, _ = walk[-1]
                seq, prev = seq + 1, last.hash if last else None
        if first and (opening is None or (first - 1, opening.prev) not in self.vouched):
            self.report.problems.insert(start, f"{stream_dir.name}/{paths[0].name}:1: seq {first}: the stream starts "
                                               f"at seq {first} and no retention record vouches for the records before")

    def segment(self, stream: str, path: Path, newest: bool, seq: int,
                prev: str | None) -> list[tuple[int, Record | None, str | None]]:
        """Check one segment's lines and seal; its chain walk."""
        where = f"{stream}/{path.name}"
        seal, seal_problem = self.seal(stream, path)   # before the lines: a running writer seals what it wrote
        *lines, tail = path.read_bytes().split(b"\n")
        walk = list(check_chain(lines, seq, prev))
        self.report.records += len(walk)
        if walk and not walk[0][2] and walk[0][0] != first_seq_of(path):
            self.problem(f"{where}:1: seq {walk[0][0]}", "the file name says the segment starts at seq "
                                                         f"{first_seq_of(path)}")
        retention = []   # (line, (through_seq, head)): vouches once a seal covers it
        for n, (s, record, reason) in enumerate(walk, 1):
            if reason is None and record is not None and record.body is None \
                    and self.purged.get((stream, s)) != record.digest.hex():
                reason = "a purge stub no validly signed purge record lists (a hidden record?)"
            if reason:
                self.problem(f"{where}:{n}: seq {s}", reason)
            elif record is not None and record.body is not None and record.body.get("type") == "retention":
                retention.append((n, (record.body.get("through_seq"), record.body.get("head"))))
        after = walk[-1][0] + 1 if walk else seq
        end = f"{where}:{len(walk)}: seq {after - 1}"
        if tail and newest:
            self.report.notes.append(f"{where}:{len(lines) + 1}: torn last line of {len(tail)} bytes: a writer is "
                                     "writing it or crashed; its next open cuts it")
        elif tail:
            self.problem(f"{where}:{len(lines) + 1}: seq {after}", "a line without its newline, not in the newest segment")
        if seal_problem:
            self.problem(f"{stream}/{seal_path(path).name}", seal_problem)
        elif seal is None:
            if newest:
                self.report.notes.append(f"{where}: not sealed yet ({len(walk)} records): a writer is running or stopped "
                                         "without closing; its next open seals it")
            else:
                self.problem(end, "no seal, and a later segment exists")
        elif (mismatch := seal_mismatch(seal, [record for _, record, _ in walk])) is not None:
            line, reason = mismatch
            self.problem(f"{where}:{line}: seq {seal['first_seq'] + line - 1}", reason)
        else:
            self.vouched.update(v for n, v in retention if n <= seal["count"])
            if not seal["final"] and not newest:
                self.problem(end, "only a checkpoint seal, and a later segment exists")
            elif not seal["final"] and len(walk) > seal["count"]:
                self.report.notes.append(f"{where}: {len(walk) - seal['count']} records after the checkpoint seal "
                                         f"(through seq {seal['last_seq']}): written since, not yet sealed")
        return walk

    def seal(self, stream: str, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """The segment's seal, if any and validly signed for this segment; else why not."""
        try:
            seal = read_seal(path)
        except ValueError as e:
            return None, f"not a seal: {e}"
        if seal is None:
            return None, None
        problem = signature_problem(seal, self.keys)
        if problem is None and (seal.get("stream"), seal.get("segment"), seal.get("first_seq")) \
                != (stream, path.name, first_seq_of(path)):
            problem = f"signed for {seal.get('stream')}/{seal.get('segment')}, not this segment"
        return (None, problem) if problem else (seal, None)


# ---------------------------------------------------------------- query


_FILTERS = ("trace_id", "principal", "model", "subject", "request_id", "type")


def query(directory: Path, *, trace_id: str | None = None, principal: str | None = None, model: str | None = None,
          subject: str | None = None, request_id: str | None = None, since: str | None = None,
          until: str | None = None, type: str | None = None) -> Iterator[dict[str, Any]]:
    """The record bodies that match every filter given (since inclusive, until exclusive; ISO-8601
    or Unix seconds), with "stream" and "seq" added, in time order across streams. Stubs and lines
    that do not parse (a running writer's torn tail) are skipped; verify is for integrity."""
    wanted = {k: v for k, v in zip(_FILTERS, (trace_id, principal, model, subject, request_id, type)) if v is not None}
    low, high = (None if t is None else iso_time(t) for t in (since, until))
    found = []
    for stream_dir in _streams(directory):
        for path in segment_paths(stream_dir):
            for raw in path.read_bytes().split(b"\n"):
                try:
                    record = parse_line(raw)
                except ValueError:
                    continue
                if record.body is not None and _matches(record.body, wanted, low, high):
                    found.append({**record.body, "stream": stream_dir.name, "seq": record.seq})
    yield from sorted(found, key=lambda r: (str(r.get("time", "")), r["stream"], r["seq"]))


def _matches(body: dict[str, Any], wanted: dict[str, str], low: str | None, high: str | None) -> bool:
    if any(body.get(k) != v for k, v in wanted.items()):
        return False
    when = body.get("time")
    return (low is None and high is None) or isinstance(when, str) and (low is None or when >= low) \
        and (high is None or when < high)


# ---------------------------------------------------------------- purge


@dataclass
class PurgeReport:
    """What purge did: records replaced by stubs, segment files rewritten, and per stream the
    matching records left in a running writer's open segment."""

    removed: int = 0
    rewritten: list[str] = field(default_factory=list)
    left_open: dict[str, int] = field(default_factory=dict)


def purge(directory: Path, subject: str, reason: str, key: Ed25519PrivateKey, operator: str = "") -> PurgeReport:
    """Replace every record whose "subject" is subject by a stub. First a signed purge record
    listing each stub's (stream, seq, digest) is appended to purges.jsonl and fsynced, then each
    segment is rewritten atomically. While a stream's writer runs (holds its lock), only its
    final-sealed segments are purged; the matches in its open segment are counted in left_open."""
    directory = Path(directory)
    report = PurgeReport()
    locks: list[int] = []
    plans: list[tuple[Path, list[bytes], dict[int, Record]]] = []
    try:
        for stream_dir in _streams(directory):
            lock = try_lock(stream_dir)
            if lock is not None:
                locks.append(lock)
            for path in segment_paths(stream_dir):
                lines = path.read_bytes().split(b"\n")
                hits = _subject_records(lines, subject)
                if not hits:
                    continue
                if lock is None and not _final_sealed(path):
                    report.left_open[stream_dir.name] = report.left_open.get(stream_dir.name, 0) + len(hits)
                else:
                    plans.append((path, lines, hits))
        removed = [{"stream": path.parent.name, "seq": r.seq, "digest": r.digest.hex()}
                   for path, _, hits in plans for r in hits.values()]
        if not removed:
            return report
        _append(directory / PURGES, canonical(sign(key, {
            "time": iso_now(), "subject_sha256": hashlib.sha256(subject.encode()).hexdigest(), "reason": reason,
            "operator": operator, "removed": removed})) + b"\n")
        for path, lines, hits in plans:
            for i, record in hits.items():
                lines[i] = stub_line(record)[:-1]
            write_atomic(path, b"\n".join(lines))
            report.rewritten.append(f"{path.parent.name}/{path.name}")
        report.removed = len(removed)
    finally:
        for lock in locks:
            os.close(lock)
    return report


def _subject_records(lines: list[bytes], subject: str) -> dict[int, Record]:
    """The records among lines whose "subject" is subject, by line index."""
    hits = {}
    for i, raw in enumerate(lines):
        try:
            record = parse_line(raw)
        except ValueError:
            continue
        if record.body is not None and record.body.get("subject") == subject:
            hits[i] = record
    return hits


def _final_sealed(segment: Path) -> bool:
    try:
        seal = read_seal(segment)
    except ValueError:
        return False
    return seal is not None and seal.get("final") is True


def _append(path: Path, line: bytes) -> None:
    """Append line to path durably."""
    write_synced(path, line, append=True)
    fsync_dir(path.parent)


# ---------------------------------------------------------------- infergate audit ...


def add_audit_arguments(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `infergate audit verify | query | purge | keygen` subcommands, on the subparsers of `audit`."""
    check = subparsers.add_parser("verify", help="check chains, seals, stubs and purge records; exit 1 on a problem")
    check.add_argument("dir", type=Path, help="the audit directory (a subdirectory per stream)")
    check.add_argument("--public-key", dest="public_keys", action="append", type=Path, default=[], metavar="PEM",
                       help="a trusted public key (repeatable); default: every *.pub in DIR and DIR/..")
    find = subparsers.add_parser("query", help="print matching records as JSON lines, in time order")
    find.add_argument("dir", type=Path)
    for option, dest in (("--trace", "trace_id"), ("--principal", "principal"), ("--model", "model"),
                         ("--subject", "subject"), ("--request-id", "request_id"), ("--type", "type")):
        find.add_argument(option, dest=dest)
    find.add_argument("--since", metavar="TIME", help="ISO-8601 or Unix seconds, inclusive")
    find.add_argument("--until", metavar="TIME", help="ISO-8601 or Unix seconds, exclusive")
    remove = subparsers.add_parser("purge", help="replace a data subject's records by stubs a signed purge record lists")
    remove.add_argument("dir", type=Path)
    remove.add_argument("--subject", required=True, help="the data subject's id, as in the records' \"subject\"")
    remove.add_argument("--reason", required=True, help="why (kept in the purge record)")
    remove.add_argument("--key", required=True, type=Path, metavar="PEM",
                        help="the private key that signs the purge record")
    remove.add_argument("--operator", default="", help="who purges (kept in the purge record)")
    keygen = subparsers.add_parser("keygen", help="write a new Ed25519 signing key and its .pub")
    keygen.add_argument("--out", required=True, type=Path, metavar="PEM")


def audit_command(args: argparse.Namespace) -> int:
    """Run the parsed `infergate audit` subcommand: 0 on success, 1 on a failed verify or an error."""
    try:
        return _COMMANDS[args.audit_command](args)
    except (OSError, ValueError) as e:
        print(f"infergate audit {args.audit_command}: {e}", file=sys.stderr)
        return 1


def _verify_command(args: argparse.Namespace) -> int:
    paths = args.public_keys or sorted({*args.dir.glob("*.pub"), *args.dir.resolve().parent.glob("*.pub")})
    if not paths:
        raise ValueError(f"no public key: none in {args.dir} or {args.dir}/..; pass --public-key PEM")
    if not args.public_keys:
        print(f"infergate audit verify: note: using {', '.join(map(str, paths))} found beside the log; a key kept "
              "beside the log only guards against accidental damage, pass --public-key with a copy kept elsewhere",
              file=sys.stderr)
    report = verify(args.dir, load_public_keys(paths))
    for problem in report.problems:
        print(f"problem: {problem}")
    for note in report.notes:
        print(f"note: {note}")
    summary = f"{args.dir}: {report.streams} streams, {report.segments} segments, {report.records} records"
    if report.ok:
        print(f"{summary}: ok")
        return 0
    print(f"infergate audit verify: {summary}: {len(report.problems)} problems, the first: {report.problems[0]}",
          file=sys.stderr)
    return 1


def _query_command(args: argparse.Namespace) -> int:
    for record in query(args.dir, **{k: getattr(args, k) for k in (*_FILTERS, "since", "until")}):
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    return 0


def _purge_command(args: argparse.Namespace) -> int:
    report = purge(args.dir, args.subject, args.reason, load_key(args.key), args.operator)
    print(f"{args.dir}: {report.removed} records replaced by stubs in {len(report.rewritten)} segments")
    for stream, count in report.left_open.items():
        print(f"{stream}: {count} matching records left in the segment its running writer has open; purge again "
              "after it rotates or with the gateway stopped")
    return 0


def _keygen_command(args: argparse.Namespace) -> int:
    key = create_key(args.out)
    print(f"{args.out}: key id {key_id(key.public_key())}; public key {public_key_path(args.out)}")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "verify": _verify_command, "query": _query_command, "purge": _purge_command, "keygen": _keygen_command}
