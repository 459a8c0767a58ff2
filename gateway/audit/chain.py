"""The audit log's on-disk format, shared by the writer and the tools: record lines and the hash
chain through them, signed seals, purge stubs, stream locks, signing keys and the one time format.

A line is `{"seq":N,"prev":P,"hash":H,"rec":BODY}` with BODY the record's sorted-key JSON kept
verbatim, and H = sha256(P ‖ N as 8 bytes big-endian ‖ sha256(BODY)). The chain runs over body
digests, so a purge can replace a body by its digest (a stub) and every later hash and seal holds.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ZERO_HASH = "0" * 64   # prev of a stream's record 0
_LINE = re.compile(rb'\{"seq":(0|[1-9][0-9]{0,18}),"prev":"([0-9a-f]{64})","hash":"([0-9a-f]{64})",'
                   rb'(?:"rec":(.*)|"purged":"([0-9a-f]{64})")\}', re.S)
_SEGMENT = re.compile(r"segment-[0-9]{12}\.jsonl")


class AuditError(Exception):
    """The log is in a state the writer must not continue from without a person deciding."""


# ---------------------------------------------------------------- times


def _format(when: datetime) -> str:
    return when.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_second: tuple[int, str] = (-1, "")  # the last whole second formatted: records come many to a second


def iso_from_unix(t: float) -> str:
    """The one time format of audit records, "YYYY-MM-DDTHH:MM:SS.ffffffZ" in UTC: as strings
    these order as the times do. The writer calls it per record, so the seconds part is cached."""
    global _second
    fraction, seconds = math.modf(t)
    whole, micros = int(seconds), round(fraction * 1e6)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{micros:06d}Z"


def iso_now() -> str:
    """Now in the audit time format."""
    return iso_from_unix(time.time())


def iso_time(text: str) -> str:
    """The audit time format of an ISO-8601 time (UTC when it names no zone) or of Unix seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    try:
        if seconds is not None:
            return iso_from_unix(seconds)
        when = datetime.fromisoformat(text)
        return _format(when if when.tzinfo else when.replace(tzinfo=timezone.utc))
    except (ValueError, OverflowError, OSError) as e:
        raise ValueError(f"not an ISO-8601 time or Unix seconds: {text!r}") from e


# ---------------------------------------------------------------- records and the chain


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes a record body or signed document is hashed and signed as: JSON with sorted keys."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev: str, seq: int, digest: bytes) -> str:
    """The hash of record seq, whose body has sha256 digest, chained after the record hashed prev."""
    return hashlib.sha256(bytes.fromhex(prev) + seq.to_bytes(8, "big") + digest).hexdigest()


@dataclass(frozen=True, slots=True)
class Record:
    """One parsed line. A purge stub has body None, and digest is then that of the purged body."""

    seq: int
    prev: str
    hash: str
    digest: bytes
    body: dict[str, Any] | None

    @property
    def intact(self) -> bool:
        """Whether the stored hash is the one seq, prev and the body's digest make."""
        return chain_hash(self.prev, self.seq, self.digest) == self.hash


def record_line(seq: int, prev: str, body: bytes) -> tuple[bytes, str]:
    """The line that chains body as record seq after prev, with its hash; body goes in verbatim."""
    digest = chain_hash(prev, seq, hashlib.sha256(body).digest())
    return b'{"seq":%d,"prev":"%s","hash":"%s","rec":%s}\n' % (seq, prev.encode(), digest.encode(), body), digest


def stub_line(record: Record) -> bytes:
    """The line that replaces a purged record: same seq, prev and hash, the body's digest instead of it."""
    return b'{"seq":%d,"prev":"%s","hash":"%s","purged":"%s"}\n' % (
        record.seq, record.prev.encode(), record.hash.encode(), record.digest.hex().encode())


def parse_line(raw: bytes) -> Record:
    """The record of one line (without its newline); ValueError when it is not one."""
    match = _LINE.fullmatch(raw)
    if match is None:
        raise ValueError("not a record line")
    seq, prev, hash_, body, purged = match.groups()
    if purged is not None:
        return Record(int(seq), prev.decode(), hash_.decode(), bytes.fromhex(purged.decode()), None)
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the body is not a JSON object")
    return Record(int(seq), prev.decode(), hash_.decode(), hashlib.sha256(body).digest(), doc)


def check_chain(lines: Iterable[bytes], seq: int, prev: str | None) -> Iterator[tuple[int, Record | None, str | None]]:
    """For lines that should continue the chain at seq after the hash prev (None: after anything),
    each line's (seq, record or None when it does not parse, what breaks the chain there or None).
    After a break the walk goes on from that line, so each break is reported once."""
    for raw in lines:
        try:
            record = parse_line(raw)
        except ValueError as e:
            yield seq, None, f"not a record: {e}"
            seq, prev = seq + 1, None
            continue
        if not record.intact:
            reason = "hash does not match the record (edited)"
        elif record.seq > seq:
            reason = f"seq {seq} expected: records missing or out of order"
        elif record.seq < seq:
            reason = f"seq {seq} expected: records repeated, inserted or out of order"
        elif prev is not None and record.prev != prev:
            reason = "prev is not the hash of the record before: records inserted, removed or out of order"
        else:
            reason = None
        yield record.seq, record, reason
        seq, prev = record.seq + 1, record.hash


# ---------------------------------------------------------------- segments, seals and files


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def segment_paths(stream_dir: Path) -> list[Path]:
    """The stream's segment files, oldest first."""
    return sorted(p for p in stream_dir.glob("segment-*.jsonl") if _SEGMENT.fullmatch(p.name))


def first_seq_of(segment: Path) -> int:
    """The seq of a segment's first record, as its file name says."""
    return int(segment.name[len("segment-"):-len(".jsonl")])


def seal_path(segment: Path) -> Path:
    return segment.with_suffix(".seal")


def write_seal(segment: Path, key: Ed25519PrivateKey, *, stream: str, first_prev: str, count: int, head: str,
               final: bool) -> None:
    """Sign and atomically write the seal over a segment's first count records, the last hashed head."""
    first_seq = first_seq_of(segment)
    doc = sign(key, {"stream": stream, "segment": segment.name, "first_seq": first_seq, "first_prev": first_prev,
                     "last_seq": first_seq + count - 1, "head": head, "count": count, "final": final,
                     "sealed_at": iso_now()})
    write_atomic(seal_path(segment), orjson.dumps(doc) + b"\n")


def read_seal(segment: Path) -> dict[str, Any] | None:
    """A segment's seal as written (signature not checked), None when it has none."""
    try:
        doc = orjson.loads(seal_path(segment).read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict):
        raise ValueError("the seal is not a JSON object")
    return doc


def seal_mismatch(seal: Mapping[str, Any], records: list[Record | None]) -> tuple[int, str] | None:
    """Where a segment's records (None: a line that does not parse) differ from what its validly
    signed seal covers, as (line number, reason); None when they agree."""
    count, kind = seal["count"], "final" if seal["final"] else "checkpoint"
    if records and (records[0] is None or records[0].prev != seal["first_prev"]):
        return 1, f"prev is not the {kind} seal's first_prev"
    if len(records) < count:
        return len(records) + 1, (f"missing: the {kind} seal covers {count} records, "
                                  f"through seq {seal['last_seq']} (truncated)")
    last = records[count - 1]
    if last is None or (last.seq, last.hash) != (seal["last_seq"], seal["head"]):
        return count, f"not the record the {kind} seal ends with (seq {seal['last_seq']}, hash {seal['head'][:16]}..)"
    if seal["final"] and len(records) > count:
        return count + 1, "record after the final seal (appended)"
    return None


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of data is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (files created, replaced, removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, append: bool = False) -> None:
    """Write data to path (replacing its content, or appending to it) and fsync the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o640)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path by data so that a crash leaves either the old file or the new, durably."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def try_lock(stream_dir: Path) -> int | None:
    """An fd holding the stream's exclusive flock (close it to release), or None while another
    process (or another open of the same stream) holds it."""
    fd = os.open(stream_dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            return None
        raise
    return fd


# ---------------------------------------------------------------- keys and signatures


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of sha256 of the raw public key: names the key in seals and purges."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(path: Path) -> Path:
    """Where the public key of the private key at path is written: `<path>.pub`."""
    return path.with_name(path.name + ".pub")


def create_key(path: Path) -> Ed25519PrivateKey:
    """A new signing key, written to path (PEM PKCS8, mode 0600) with its public key at `<path>.pub`;
    FileExistsError rather than overwrite either."""
    key = Ed25519PrivateKey.generate()
    public = public_key_path(path)
    if public.exists():
        raise FileExistsError(f"{public} exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(public, "xb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in an unencrypted PEM file; ValueError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key at path, created (with a warning) when there is none yet."""
    path = Path(path)
    if path.exists():
        return load_key(path)
    key = create_key(path)
    log.warning("created audit signing key %s (key id %s); keep a copy of %s where whoever can write the log "
                "cannot, and verify against that copy", path, key_id(key.public_key()), public_key_path(path))
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Ed25519 public keys from PEM files, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: not a PEM public key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def sign(key: Ed25519PrivateKey, fields: Mapping[str, Any]) -> dict[str, Any]:
    """fields with "key_id" added and "signature": base64 Ed25519 over the canonical JSON of all the others."""
    doc = {**fields, "key_id": key_id(key.public_key())}
    return {**doc, "signature": base64.b64encode(key.sign(canonical(doc))).decode()}


def signature_problem(doc: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    """Why a signed document's signature does not hold under keys; None when it does."""
    kid = doc.get("key_id")
    public = keys.get(kid) if isinstance(kid, str) else None
    if public is None:
        return f"signed by unknown key {kid!r}"
    try:
        public.verify(base64.b64decode(doc.get("signature", ""), validate=True),
                      canonical({k: v for k, v in doc.items() if k != "signature"}))
    except (InvalidSignature, ValueError, TypeError):
        return f"bad signature (key {kid})"
    return None
