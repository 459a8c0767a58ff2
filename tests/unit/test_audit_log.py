"""The audit writer: chaining across rotations, a queue that never blocks and drains on close,
checkpoints while busy, write errors that lose nothing, crash recovery, retention, the stream lock."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import log as audit_log
from gateway.audit.chain import (ZERO_HASH, Record, create_key, iso_now, key_id, parse_line, read_seal, segment_paths)
from gateway.audit.log import AuditLog, Observer
from gateway.audit.tools import verify

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Item:
    """An entry that renders a fixed body."""

    body: dict[str, Any]

    def render(self) -> dict[str, Any]:
        return self.body


def item(i: int, **fields: Any) -> Item:
    return Item({"type": "infer", "time": iso_now(), "trace_id": f"t{i}", **fields})


class Recorder(Observer):
    def __init__(self) -> None:
        self.records = 0
        self.failures: list[str] = []
        self.recoveries: list[int] = []
        self.seals: list[bool] = []

    def written(self, records: int, depth: int) -> None:
        self.records += records

    def failed(self, stage: str) -> None:
        self.failures.append(stage)

    def recovered(self, torn_bytes: int) -> None:
        self.recoveries.append(torn_bytes)

    def sealed(self, final: bool) -> None:
        self.seals.append(final)


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def keys_of(key: Ed25519PrivateKey) -> dict:
    return {key_id(key.public_key()): key.public_key()}


def write_log(root: Path, key: Ed25519PrivateKey, groups: list[list[Item]], stream: str = "w0",
              **options: Any) -> Recorder:
    """Open a stream, write each group as its own batch (a rotation can come between two), close."""
    recorder = Recorder()
    log = AuditLog(root, stream, key, observer=recorder, **options)
    log.open()
    for group in groups:
        done = recorder.records + len(group)
        assert all(log.append(entry) for entry in group)
        wait_for(lambda: recorder.records >= done)
    log.close()
    return recorder


def records(stream_dir: Path) -> list[list[Record]]:
    """Every segment's records, oldest segment first."""
    return [[parse_line(raw) for raw in path.read_bytes().split(b"\n")[:-1]] for path in segment_paths(stream_dir)]


def test_records_chain_across_size_rotations(tmp_path):
    key = Ed25519PrivateKey.generate()
    recorder = write_log(tmp_path, key, [[item(g * 5 + i, pad="x" * 300) for i in range(5)] for g in range(4)],
                         max_segment_bytes=2000)
    segments = records(tmp_path / "w0")
    assert [len(s) for s in segments] == [6, 6, 6, 6]   # each: its "segment" record, then a group
    flat = [r for s in segments for r in s]
    assert [r.seq for r in flat] == list(range(24)) and flat[0].prev == ZERO_HASH
    assert all(b.prev == a.hash for a, b in zip(flat, flat[1:]))
    names = [p.name for p in segment_paths(tmp_path / "w0")]
    assert names == ["segment-000000000000.jsonl", "segment-000000000006.jsonl", "segment-000000000012.jsonl",
                     "segment-000000000018.jsonl"]
    for i, segment in enumerate(segments):
        head = segment[0].body
        assert (head["type"], head["segment"], head["previous"], head["key_id"]) == (
            "segment", names[i], names[i - 1] if i else None, key_id(key.public_key()))
    assert [r.body["trace_id"] for r in flat if r.body["type"] == "infer"] == [f"t{i}" for i in range(20)]
    assert all(read_seal(p)["final"] for p in segment_paths(tmp_path / "w0"))
    assert recorder.records == 24 and recorder.seals.count(True) == 4
    report = verify(tmp_path, keys_of(key))
    assert report.ok and (report.records, report.segments, report.streams, report.notes) == (24, 4, 1, [])


def test_segments_rotate_by_age(tmp_path):
    key = Ed25519PrivateKey.generate()
    recorder = Recorder()
    log = AuditLog(tmp_path, "w0", key, max_segment_age_s=0.05, observer=recorder)
    log.open()
    log.append(item(0))
    wait_for(lambda: recorder.records == 2)
    time.sleep(0.06)
    log.append(item(1))
    wait_for(lambda: recorder.records == 4)
    log.close()
    assert [[r.body["type"] for r in s] for s in records(tmp_path / "w0")] == [["segment", "infer"], ["segment", "infer"]]
    assert verify(tmp_path, keys_of(key)).ok


def test_append_never_blocks_refuses_when_full_and_close_drains(tmp_path):
    key = Ed25519PrivateKey.generate()
    log = AuditLog(tmp_path, "w0", key, capacity=100)
    started = time.perf_counter()
    accepted = [log.append(item(i)) for i in range(20_000)]
    assert time.perf_counter() - started < 1.0
    assert accepted.count(True) == 100 and accepted[:100] == [True] * 100 and log.depth == 100
    log.open()
    log.close()
    assert log.depth == 0 and not log.append(item(0))   # closed: refused
    flat = [r for s in records(tmp_path / "w0") for r in s]
    assert [r.body["trace_id"] for r in flat[1:]] == [f"t{i}" for i in range(100)]


def test_close_drains_a_full_queue(tmp_path):
    key = Ed25519PrivateKey.generate()
    recorder = Recorder()
    log = AuditLog(tmp_path, "w0", key, observer=recorder)
    log.open()
    assert all(log.append(item(i)) for i in range(20_000))
    log.close()
    seal = read_seal(segment_paths(tmp_path / "w0")[0])
    assert recorder.records == seal["count"] == 20_001 and seal["final"]
    assert verify(tmp_path, keys_of(key)).ok


def test_a_checkpoint_is_sealed_within_the_interval_while_appends_continue(tmp_path):
    key = Ed25519PrivateKey.generate()
    recorder = Recorder()
    log = AuditLog(tmp_path, "w0", key, fsync_interval_s=0.05, observer=recorder)
    log.open()
    segment = tmp_path / "w0" / "segment-000000000000.jsonl"
    started, checkpoints = time.monotonic(), []
    while time.monotonic() - started < 0.4:   # never idle for long: a record every millisecond
        log.append(item(len(checkpoints)))
        seal = read_seal(segment)
        if seal and (not checkpoints or seal["count"] != checkpoints[-1]["count"]):
            checkpoints.append(seal)
        time.sleep(0.001)
    log.close()
    assert len(checkpoints) >= 3 and not any(c["final"] for c in checkpoints)
    assert checkpoints[0]["sealed_at"] < checkpoints[-1]["sealed_at"]
    assert recorder.seals.count(False) >= 3 and recorder.seals[-1] is True


def test_write_errors_lose_and_reorder_nothing(tmp_path, monkeypatch):
    key = Ed25519PrivateKey.generate()
    recorder = Recorder()
    real_write, state = os.write, {"fail": False, "calls": 0}

    def flaky(fd: int, data: bytes) -> int:
        if not state["fail"]:
            return real_write(fd, data)
        state["calls"] += 1
        if state["calls"] % 2:                  # part of a line reaches the file, then the disk is full
            return real_write(fd, bytes(data[:max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", flaky)
    log = AuditLog(tmp_path, "w0", key, capacity=50, fsync_interval_s=0.01, observer=recorder)
    log.open()
    accepted = [i for i in range(10) if log.append(item(i))]
    wait_for(lambda: recorder.records == 11)
    state["fail"] = True
    n = 10
    while log.append(item(n)):                  # the writer holds its failed batch; the queue fills up
        accepted.append(n)
        n += 1
        assert n < 10_000
        time.sleep(0.0005)
    assert log.depth == 50 and "write" in recorder.failures
    time.sleep(0.6)                             # a retry or two fails as well
    state["fail"] = False
    log.close()
    flat = [r for s in records(tmp_path / "w0") for r in s]
    assert [r.body["trace_id"] for r in flat if r.body["type"] == "infer"] == [f"t{i}" for i in accepted]
    assert [r.seq for r in flat] == list(range(len(flat)))
    assert recorder.failures.count("write") >= 2 and state["calls"] >= 4
    assert verify(tmp_path, keys_of(key)).ok


def test_an_entry_that_does_not_render_leaves_a_render_error_record(tmp_path):
    key = Ed25519PrivateKey.generate()

    class Broken:
        def render(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    recorder = write_log(tmp_path, key, [[item(0), Broken(), Item(["not", "a", "dict"]), item(1)]])  # type: ignore[list-item]
    bodies = [r.body for r in records(tmp_path / "w0")[0]]
    assert [b["type"] for b in bodies] == ["segment", "infer", "render_error", "render_error", "infer"]
    assert bodies[2]["error"] == "RuntimeError('boom')" and "not a dict" in bodies[3]["error"]
    assert recorder.failures == ["render", "render"] and verify(tmp_path, keys_of(key)).ok


def test_a_second_writer_of_the_same_stream_waits_then_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_log, "LOCK_WAIT_S", 0.1)
    key = Ed25519PrivateKey.generate()
    first = AuditLog(tmp_path, "w0", key)
    first.open()
    with pytest.raises(OSError, match="is locked by another process"):
        AuditLog(tmp_path, "w0", key).open()
    first.close()
    second = AuditLog(tmp_path, "w0", key)
    second.open()
    second.close()
    assert [len(s) for s in records(tmp_path / "w0")] == [1, 1] and verify(tmp_path, keys_of(key)).ok


CRASHING_WRITER = """
import sys, time
from pathlib import Path
from gateway.audit.chain import iso_now, load_key
from gateway.audit.log import AuditLog

class Item:
    def __init__(self, i): self.i = i
    def render(self): return {"type": "infer", "time": iso_now(), "trace_id": f"t{self.i}"}

log = AuditLog(Path(sys.argv[1]), "w0", load_key(Path(sys.argv[2])), fsync_interval_s=0.01)
log.open()
for i in range(20):
    log.append(Item(i))
while log.depth:
    time.sleep(0.005)
time.sleep(0.2)
print("written", flush=True)
time.sleep(60)
"""


def crash_a_writer(root: Path, key_path: Path) -> Path:
    """Run a writer in a process, kill it after it wrote 20 entries and a checkpoint; its segment."""
    process = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(root), str(key_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "written\n"
    finally:
        process.kill()
        process.wait()
    segment, = segment_paths(root / "w0")
    assert read_seal(segment)["count"] == 21 and not read_seal(segment)["final"]
    return segment


@pytest.mark.parametrize("torn", [b"", b'{"seq":21,"prev":"3f2a', b'{"seq":21,"prev":"' + b"0" * 64 + b'"}\n'])
def test_a_crashed_writer_s_segment_is_cut_sealed_and_continued(tmp_path, torn):
    key_path = tmp_path / "audit.pem"
    key = create_key(key_path)
    segment = crash_a_writer(tmp_path / "audit", key_path)
    with open(segment, "ab") as f:
        f.write(torn)
    before = verify(tmp_path / "audit", keys_of(key))
    if torn.endswith(b"\n"):                    # a whole line, but not a record: a problem until recovery cuts it
        assert before.problems == ["w0/segment-000000000000.jsonl:22: seq 21: not a record: not a record line"]
    elif torn:                                  # a line being written: a note
        assert before.ok and before.notes[0].startswith(f"w0/segment-000000000000.jsonl:22: torn last line of {len(torn)} bytes")
    recorder = write_log(tmp_path / "audit", key, [[item(20)]])
    assert recorder.recoveries == [len(torn)] and recorder.failures == []
    old, new = records(tmp_path / "audit" / "w0")
    assert len(old) == 21 and read_seal(segment)["final"] and read_seal(segment)["count"] == 21
    assert new[0].seq == 21 and new[0].prev == old[-1].hash and new[0].body["previous"] == segment.name
    kinds = [r.body["type"] for r in new]
    if torn:
        recovery = new[1].body
        assert kinds == ["segment", "recovery", "infer"]
        assert (recovery["segment"], recovery["torn_bytes"], recovery["last_seq"]) == (segment.name, len(torn), 20)
        assert recovery["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    else:
        assert kinds == ["segment", "infer"]
    report = verify(tmp_path / "audit", keys_of(key))
    assert report.ok and report.notes == [] and report.records == 21 + len(new)


def test_a_tampered_segment_found_at_recovery_is_left_unsealed(tmp_path):
    key_path = tmp_path / "audit.pem"
    key = create_key(key_path)
    segment = crash_a_writer(tmp_path / "audit", key_path)
    segment.write_bytes(segment.read_bytes().replace(b'"t7"', b'"t8"'))
    recorder = write_log(tmp_path / "audit", key, [[item(20)]])
    assert recorder.failures == ["recovery"] and recorder.recoveries == [0]
    assert read_seal(segment)["final"] is False               # its checkpoint is kept for the audit
    old, new = records(tmp_path / "audit" / "w0")
    assert new[0].seq == 21 and new[0].prev == old[-1].hash
    report = verify(tmp_path / "audit", keys_of(key))
    assert report.problems[0] == "w0/segment-000000000000.jsonl:9: seq 8: hash does not match the record (edited)"


def test_retention_removes_old_sealed_segments_and_vouches_for_them(tmp_path):
    key = Ed25519PrivateKey.generate()
    old = [[Item({"type": "infer", "time": "2020-01-01T00:00:00.000000Z", "trace_id": f"o{g}{i}", "pad": "x" * 300})
            for i in range(5)] for g in range(2)]
    write_log(tmp_path, key, [*old, [item(i, pad="x" * 300) for i in range(5)]], max_segment_bytes=2000)
    before = segment_paths(tmp_path / "w0")
    assert len(before) == 3
    seal = read_seal(before[1])
    recorder = write_log(tmp_path, key, [], retention_s=3600)
    after = segment_paths(tmp_path / "w0")
    assert after[0] == before[2] and len(after) == 2 and not before[0].with_suffix(".seal").exists()
    retention = records(tmp_path / "w0")[-1][1].body
    assert retention["type"] == "retention" and retention["removed"] == [before[0].name, before[1].name]
    assert (retention["through_seq"], retention["head"]) == (11, seal["head"])
    assert recorder.failures == []
    report = verify(tmp_path, keys_of(key))
    assert report.ok and report.records == 6 + 2
    write_log(tmp_path, key, [], retention_s=3600)        # nothing more is old enough
    assert segment_paths(tmp_path / "w0")[0] == before[2]
    assert verify(tmp_path, keys_of(key)).ok


def test_a_fresh_stream_starts_at_seq_zero(tmp_path):
    key = Ed25519PrivateKey.generate()
    write_log(tmp_path, key, [[item(0)]], stream="w1")
    (first, second), = records(tmp_path / "w1")
    assert (first.seq, first.prev, second.seq) == (0, ZERO_HASH, 1)
    assert orjson.loads((tmp_path / "w1" / "segment-000000000000.seal").read_bytes())["stream"] == "w1"


def test_reopening_after_a_clean_close_touches_nothing_of_an_edited_final_segment(tmp_path):
    """An edit made while the gateway was stopped stays for verify to report as an edit: recovery
    neither cuts the line nor reseals, and the chain goes on from the seal's head."""
    key = Ed25519PrivateKey.generate()
    write_log(tmp_path, key, [[item(i) for i in range(3)]])
    [segment] = segment_paths(tmp_path / "w0")
    seal = read_seal(segment)
    data = segment.read_bytes()
    edited = data.replace(b'"trace_id":"t2"', b'"trace_id":"t7"')  # the last record's body, still JSON
    assert edited != data
    segment.write_bytes(edited)
    write_log(tmp_path, key, [[item(9)]])
    assert segment.read_bytes() == edited and read_seal(segment) == seal
    second = records(tmp_path / "w0")[1]
    assert second[0].seq == seal["last_seq"] + 1 and second[0].prev == seal["head"]
    report = verify(tmp_path, keys_of(key))
    assert not report.ok and f"{segment.name}:4:" in report.problems[0]
