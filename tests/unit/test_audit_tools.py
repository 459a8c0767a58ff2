"""Audit tools: verify names the first place each kind of tampering breaks, query filters and
orders across streams, purge leaves a verifiable log without the subject, and the commands."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Callable

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.chain import canonical, create_key, load_key, parse_line, record_line, stub_line, write_seal
from gateway.audit.log import AuditLog
from gateway.audit.tools import add_audit_arguments, audit_command, purge, query, verify
from tests.unit.test_audit_log import Item, Recorder, item, keys_of, wait_for, write_log

KEY = Ed25519PrivateKey.generate()
S0, S1, S2 = "segment-000000000000", "segment-000000000006", "segment-000000000012"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A closed stream w0: S0 holds seq 0-5, S1 6-11, S2 12-17; each its "segment" record, then
    five entries t0..t14 (subjects alternate alice, bob)."""
    write_log(tmp_path, KEY, [[item(g * 5 + i, subject=("alice", "bob")[i % 2], pad="x" * 300) for i in range(5)]
                              for g in range(3)], max_segment_bytes=2000)
    return tmp_path


def lines(root: Path, name: str) -> list[bytes]:
    return (root / "w0" / f"{name}.jsonl").read_bytes().split(b"\n")[:-1]


def rewrite(root: Path, name: str, change: Callable[[list[bytes]], list[bytes]]) -> None:
    (root / "w0" / f"{name}.jsonl").write_bytes(b"".join(line + b"\n" for line in change(lines(root, name))))


def forged(after: bytes, body: dict) -> bytes:
    """A line chained correctly after the line `after`, as someone without the key could write it."""
    record = parse_line(after)
    return record_line(record.seq + 1, record.hash, canonical(body))[0][:-1]


def reseal(root: Path, name: str, count: int, final: bool) -> None:
    """Seal the first count records of a segment with the real key (a writer that stopped there)."""
    recs = [parse_line(line) for line in lines(root, name)]
    write_seal(root / "w0" / f"{name}.jsonl", KEY, stream="w0", first_prev=recs[0].prev, count=count,
               head=recs[count - 1].hash, final=final)


def test_an_untouched_log_verifies(root):
    report = verify(root, keys_of(KEY))
    assert report.ok and (report.records, report.segments, report.streams, report.notes) == (18, 3, 1, [])


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "edited": (lambda r: rewrite(r, S1, lambda ls: [ls[0], ls[1], ls[2].replace(b'"t6"', b'"t9"'), *ls[3:]]),
               f"w0/{S1}.jsonl:3: seq 8: hash does not match the record (edited)"),
    "deleted": (lambda r: rewrite(r, S1, lambda ls: ls[:2] + ls[3:]),
                f"w0/{S1}.jsonl:3: seq 9: seq 8 expected: records missing"),
    "reordered": (lambda r: rewrite(r, S1, lambda ls: [*ls[:2], ls[3], ls[2], *ls[4:]]),
                  f"w0/{S1}.jsonl:3: seq 9: seq 8 expected: records missing or out of order"),
    "inserted": (lambda r: rewrite(r, S1, lambda ls: [*ls[:3], forged(ls[2], {"type": "infer", "time": "x"}), *ls[3:]]),
                 f"w0/{S1}.jsonl:5: seq 9: seq 10 expected: records repeated, inserted"),
    "truncated": (lambda r: rewrite(r, S2, lambda ls: ls[:-1]),
                  f"w0/{S2}.jsonl:6: seq 17: missing: the final seal covers 6 records, through seq 17"),
    "appended after the final seal": (lambda r: rewrite(r, S2, lambda ls: [*ls, forged(ls[-1], {"type": "infer", "time": "x"})]),
                                      f"w0/{S2}.jsonl:7: seq 18: record after the final seal (appended)"),
    "resealed by a forger": (lambda r: (r / "w0" / f"{S1}.seal").write_bytes(
        (r / "w0" / f"{S1}.seal").read_bytes().replace(b'"count":6', b'"count":5')),
        f"w0/{S1}.seal: bad signature"),
    "middle segment removed": (lambda r: [(r / "w0" / f"{S1}{ext}").unlink() for ext in (".jsonl", ".seal")],
                               f"w0/{S2}.jsonl:1: seq 12: seq 6 expected: records missing"),
    "first segment removed": (lambda r: [(r / "w0" / f"{S0}{ext}").unlink() for ext in (".jsonl", ".seal")],
                              f"w0/{S1}.jsonl:1: seq 6: the stream starts at seq 6 and no retention record vouches"),
    "record hidden as a stub": (lambda r: rewrite(r, S1, lambda ls: [*ls[:2], stub_line(parse_line(ls[2]))[:-1], *ls[3:]]),
                                f"w0/{S1}.jsonl:3: seq 8: a purge stub no validly signed purge record lists"),
    "seal of an older segment removed": (lambda r: (r / "w0" / f"{S1}.seal").unlink(),
                                         f"w0/{S1}.jsonl:6: seq 11: no seal, and a later segment exists"),
    "final seal of an older segment swapped for a checkpoint": (lambda r: reseal(r, S1, 6, final=False),
                                                                f"w0/{S1}.jsonl:6: seq 11: only a checkpoint seal"),
    "seal copied from another segment": (lambda r: (r / "w0" / f"{S1}.seal").write_bytes((r / "w0" / f"{S2}.seal").read_bytes()),
                                         f"w0/{S1}.seal: signed for w0/{S2}.jsonl, not this segment"),
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_tampering_is_found_where_it_starts(root, kind):
    tamper, first_problem = TAMPERING[kind]
    tamper(root)
    report = verify(root, keys_of(KEY))
    assert not report.ok and report.problems[0].startswith(first_problem), report.problems


def test_a_signature_by_an_unknown_key_is_reported(root):
    report = verify(root, keys_of(Ed25519PrivateKey.generate()))
    assert report.problems[0].startswith(f"w0/{S0}.seal: signed by unknown key '")
    assert len(report.problems) == 3 and verify(root, {}).problems == report.problems


def test_the_unsealed_tail_of_a_running_writer_is_a_note(root):
    reseal(root, S2, 4, final=False)            # the checkpoint covers seq 12-15; 16, 17 written since
    with open(root / "w0" / f"{S2}.jsonl", "ab") as f:
        f.write(b'{"seq":18,"pr')              # a write in progress
    report = verify(root, keys_of(KEY))
    assert report.ok and report.notes == [
        f"w0/{S2}.jsonl:7: torn last line of 13 bytes: a writer is writing it or crashed; its next open cuts it",
        f"w0/{S2}.jsonl: 2 records after the checkpoint seal (through seq 15): written since, not yet sealed"]
    rewrite(root, S2, lambda ls: ls[:3])        # but the record the checkpoint signed must be there
    assert verify(root, keys_of(KEY)).problems == [
        f"w0/{S2}.jsonl:4: seq 15: missing: the checkpoint seal covers 4 records, through seq 15 (truncated)"]
    (root / "w0" / f"{S2}.seal").unlink()
    report = verify(root, keys_of(KEY))
    assert report.ok and report.notes[0].startswith(f"w0/{S2}.jsonl: not sealed yet (3 records)")


def test_only_a_sealed_retention_record_vouches_for_removed_segments(root):
    for ext in (".jsonl", ".seal"):
        (root / "w0" / f"{S0}{ext}").unlink()
    head = parse_line(lines(root, S1)[0]).prev
    rewrite(root, S2, lambda ls: [*ls, forged(ls[-1], {"type": "retention", "time": "x", "through_seq": 5, "head": head})])
    reseal(root, S2, 6, final=False)            # the forged record sits in the unsealed tail
    assert verify(root, keys_of(KEY)).problems == [
        f"w0/{S1}.jsonl:1: seq 6: the stream starts at seq 6 and no retention record vouches for the records before"]
    reseal(root, S2, 7, final=True)             # as the writer seals its own retention record
    assert verify(root, keys_of(KEY)).ok


def test_an_empty_directory_does_not_verify(tmp_path):
    assert verify(tmp_path, keys_of(KEY)).problems == [f"{tmp_path}: no audit segments"]


def test_purge_leaves_a_verifiable_log_without_the_subject(root):
    bob = list(query(root, subject="bob"))
    report = purge(root, "alice", "erasure request 17", KEY, operator="dpo")
    assert (report.removed, report.rewritten, report.left_open) == (9, [f"w0/{S0}.jsonl", f"w0/{S1}.jsonl", f"w0/{S2}.jsonl"], {})
    assert list(query(root, subject="alice")) == [] and list(query(root, subject="bob")) == bob
    assert not any(b"alice" in p.read_bytes() for p in (root / "w0").iterdir())
    line, = (root / "purges.jsonl").read_bytes().splitlines()
    purge_record = orjson.loads(line)
    assert b"alice" not in line and purge_record["subject_sha256"] == hashlib.sha256(b"alice").hexdigest()
    assert (purge_record["reason"], purge_record["operator"], len(purge_record["removed"])) == ("erasure request 17", "dpo", 9)
    stub = parse_line(lines(root, S1)[1])
    assert stub.body is None and {"stream": "w0", "seq": 7, "digest": stub.digest.hex()} in purge_record["removed"]
    report = verify(root, keys_of(KEY))
    assert report.ok and report.records == 18
    assert purge(root, "alice", "again", KEY).removed == 0 and len((root / "purges.jsonl").read_bytes().splitlines()) == 1


def test_a_tampered_purge_record_unlists_its_stubs(root):
    purge(root, "alice", "erasure", KEY)
    path = root / "purges.jsonl"
    path.write_bytes(path.read_bytes().replace(b"erasure", b"routine"))
    problems = verify(root, keys_of(KEY)).problems
    assert problems[0] == f"purges.jsonl:1: bad signature (key {next(iter(keys_of(KEY)))})"
    assert len(problems) == 1 + 9 and all("a purge stub no validly signed purge record lists" in p for p in problems[1:])


def test_purge_skips_the_open_segment_of_a_running_writer(tmp_path):
    recorder = Recorder()
    log = AuditLog(tmp_path, "w0", KEY, max_segment_bytes=2000, observer=recorder)
    log.open()
    try:
        for g in range(3):
            done = recorder.records + 5
            assert all(log.append(item(g * 5 + i, subject="alice", pad="x" * 300)) for i in range(5))
            wait_for(lambda: recorder.records >= done)
        report = purge(tmp_path, "alice", "erasure", KEY)
        assert (report.removed, report.rewritten, report.left_open) == (10, [f"w0/{S0}.jsonl", f"w0/{S1}.jsonl"], {"w0": 5})
        assert verify(tmp_path, keys_of(KEY)).ok
    finally:
        log.close()
    assert len(list(query(tmp_path, subject="alice"))) == 5
    assert purge(tmp_path, "alice", "erasure, after rotation", KEY).removed == 5
    assert list(query(tmp_path, subject="alice")) == [] and verify(tmp_path, keys_of(KEY)).ok


def test_query_filters_and_orders_across_streams(tmp_path):
    def at(second: int, trace: str, **fields: str) -> Item:
        return Item({"type": "infer", "time": f"2026-01-01T00:00:{second:02d}.000000Z", "trace_id": trace, **fields})

    write_log(tmp_path, KEY, [[at(1, "a", model="m1", principal="p1"), at(4, "d", model="m2", request_id="r4")]], "w0")
    write_log(tmp_path, KEY, [[at(2, "b", model="m1", principal="p2"), at(3, "c", model="m1")],
                              [Item({"type": "shadow", "time": "2026-01-01T00:00:05.000000Z", "trace_id": "a"})]], "w1")
    found = list(query(tmp_path, type="infer"))
    assert [(r["trace_id"], r["stream"], r["seq"]) for r in found] == [("a", "w0", 1), ("b", "w1", 1), ("c", "w1", 2), ("d", "w0", 2)]
    assert [r["type"] for r in query(tmp_path, trace_id="a")] == ["infer", "shadow"]
    assert [r["trace_id"] for r in query(tmp_path, model="m1", principal="p2")] == ["b"]
    assert [r["trace_id"] for r in query(tmp_path, request_id="r4")] == ["d"]
    window = query(tmp_path, type="infer", since="2026-01-01T01:00:02+01:00", until="1767225604")   # 00:00:02 to :04
    assert [r["trace_id"] for r in window] == ["b", "c"]
    assert {r["type"] for r in query(tmp_path)} == {"segment", "infer", "shadow"}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="infergate audit")
    add_audit_arguments(parser.add_subparsers(dest="audit_command", required=True))
    code = audit_command(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_commands(tmp_path, capsys):
    key_path = tmp_path / "keys" / "audit.pem"
    key_path.parent.mkdir()
    code, out, _ = run(["keygen", "--out", str(key_path)], capsys)
    assert code == 0 and (tmp_path / "keys" / "audit.pem.pub").exists() and "key id" in out
    code, _, err = run(["keygen", "--out", str(key_path)], capsys)
    assert code == 1 and err.startswith("infergate audit keygen: ") and "exists" in err
    signing = load_key(key_path)
    audit = tmp_path / "audit"
    write_log(audit, signing, [[item(1, subject="alice"), item(2, subject="bob")]])
    public = ["--public-key", str(key_path) + ".pub"]
    code, out, _ = run(["verify", str(audit), *public], capsys)
    assert code == 0 and out.endswith(f"{audit}: 1 streams, 1 segments, 3 records: ok\n")
    code, out, _ = run(["query", str(audit), "--trace", "t2"], capsys)
    assert code == 0 and [orjson.loads(line)["subject"] for line in out.splitlines()] == ["bob"]
    code, out, _ = run(["purge", str(audit), "--subject", "alice", "--reason", "erasure", "--key", str(key_path)], capsys)
    assert code == 0 and out.startswith(f"{audit}: 1 records replaced by stubs in 1 segments")
    assert run(["verify", str(audit), *public], capsys)[0] == 0
    segment = audit / "w0" / f"{S0}.jsonl"
    segment.write_bytes(segment.read_bytes().replace(b'"t2"', b'"t3"'))
    code, out, err = run(["verify", str(audit), *public], capsys)
    assert code == 1 and out.startswith(f"problem: w0/{S0}.jsonl:3: seq 2: hash does not match")
    assert err.startswith("infergate audit verify: ") and "1 problems" in err
    code, _, err = run(["query", str(audit), "--since", "yesterday"], capsys)
    assert code == 1 and err.startswith("infergate audit query: not an ISO-8601 time")


def test_verify_finds_keys_beside_the_log_and_says_what_they_are_worth(tmp_path, capsys):
    write_log(tmp_path / "audit", create_key(tmp_path / "audit.pem"), [[item(1)]])
    code, out, err = run(["verify", str(tmp_path / "audit")], capsys)
    assert code == 0 and "only guards against accidental damage" in err and out.endswith("ok\n")
    (tmp_path / "audit.pem.pub").unlink()
    code, _, err = run(["verify", str(tmp_path / "audit")], capsys)
    assert code == 1 and err.startswith("infergate audit verify: no public key")
