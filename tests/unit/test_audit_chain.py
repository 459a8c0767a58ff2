"""The audit format: chain hash, record and stub lines, the chain walk, seals, keys and signatures, times."""
from __future__ import annotations

import hashlib
import logging
import os
import stat

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.chain import (ZERO_HASH, canonical, chain_hash, check_chain, create_key, iso_from_unix, iso_now,
                                 iso_time, key_id, load_key, load_or_create_key, load_public_keys, parse_line,
                                 read_seal, record_line, seal_mismatch, sign, signature_problem, stub_line, try_lock,
                                 write_seal)


def chain(*bodies: dict, seq: int = 0, prev: str = ZERO_HASH) -> list[bytes]:
    """Lines chaining bodies from seq after prev, without their newlines."""
    lines = []
    for body in bodies:
        line, prev = record_line(seq, prev, canonical(body))
        lines.append(line[:-1])
        seq += 1
    return lines


def test_hash_is_sha256_of_prev_seq_and_body_digest():
    body = canonical({"type": "infer", "time": "t", "a": 1})
    line, digest = record_line(7, "ab" * 32, body)
    assert digest == chain_hash("ab" * 32, 7, hashlib.sha256(body).digest()) == hashlib.sha256(bytes.fromhex("ab" * 32) + (7).to_bytes(8, "big")
                                    + hashlib.sha256(body).digest()).hexdigest()
    assert line == b'{"seq":7,"prev":"' + b"ab" * 32 + b'","hash":"' + digest.encode() + b'","rec":' + body + b"}\n"
    assert body == b'{"a":1,"time":"t","type":"infer"}'   # sorted keys
    record = parse_line(line[:-1])
    assert (record.seq, record.prev, record.hash, record.body, record.intact) == (7, "ab" * 32, digest, orjson.loads(body), True)
    assert orjson.loads(line) == {"seq": 7, "prev": "ab" * 32, "hash": digest, "rec": orjson.loads(body)}


def test_a_stub_keeps_seq_prev_hash_and_the_body_digest():
    line, = chain({"type": "infer", "time": "t", "subject": "s"})
    record = parse_line(line)
    stub = parse_line(stub_line(record)[:-1])
    assert (stub.seq, stub.prev, stub.hash, stub.digest, stub.body) == (0, ZERO_HASH, record.hash, record.digest, None)
    assert stub.intact and b"subject" not in stub_line(record)


@pytest.mark.parametrize("raw", [
    b"", b"{}", b'{"seq":0}', b'{"seq":01,"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","rec":{}}',
    b'{"seq":0,"prev":"' + b"0" * 63 + b'","hash":"' + b"0" * 64 + b'","rec":{}}',
    b'{"seq":0,"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","rec":[1]}',
    b'{"seq":0,"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","rec":{"a":1}} ',
    b'{"seq":0,"prev":"' + b"0" * 64 + b'","hash":"' + b"0" * 64 + b'","rec":{"a":1}x}',
])
def test_parse_refuses_anything_but_a_record_line(raw):
    with pytest.raises(ValueError):
        parse_line(raw)


def test_chain_walk_names_each_break_once():
    lines = chain(*({"type": "infer", "time": "t", "i": i} for i in range(6)))
    assert [reason for _, _, reason in check_chain(lines, 0, ZERO_HASH)] == [None] * 6
    edited = lines[:2] + [lines[2].replace(b'"i":2', b'"i":9')] + lines[3:]
    assert [(s, r) for s, _, r in check_chain(edited, 0, ZERO_HASH) if r] == [(2, "hash does not match the record (edited)")]
    deleted = lines[:2] + lines[3:]
    assert [(s, r) for s, _, r in check_chain(deleted, 0, ZERO_HASH) if r] == [(3, "seq 2 expected: records missing or out of order")]
    swapped = lines[:2] + [lines[3], lines[2]] + lines[4:]
    assert [s for s, _, r in check_chain(swapped, 0, ZERO_HASH) if r] == [3, 2, 4]
    garbage = lines[:2] + [b"junk"] + lines[3:]
    assert [(s, r is not None) for s, _, r in check_chain(garbage, 0, ZERO_HASH)][2:4] == [(2, True), (3, False)]
    assert [r for _, _, r in check_chain(lines[3:], 3, None)] == [None] * 3        # prev None: any start
    assert next(check_chain(lines[3:], 3, ZERO_HASH))[2].startswith("prev is not the hash")


def test_seal_roundtrip_and_mismatches(tmp_path):
    key = Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    lines = chain(*({"type": "infer", "time": "t", "i": i} for i in range(4)), seq=10, prev="cd" * 32)
    records = [parse_line(line) for line in lines]
    segment = tmp_path / "segment-000000000010.jsonl"
    write_seal(segment, key, stream="w0", first_prev="cd" * 32, count=3, head=records[2].hash, final=False)
    seal = read_seal(segment)
    assert signature_problem(seal, keys) is None
    assert {k: seal[k] for k in ("stream", "segment", "first_seq", "last_seq", "count", "final")} == {
        "stream": "w0", "segment": segment.name, "first_seq": 10, "last_seq": 12, "count": 3, "final": False}
    assert seal_mismatch(seal, records) is None                  # a checkpoint: more records may follow
    assert seal_mismatch(seal, records[:2]) == (3, "missing: the checkpoint seal covers 3 records, through seq 12 (truncated)")
    assert seal_mismatch(seal, records[:2] + records[3:])[0] == 3
    assert seal_mismatch({**seal, "final": True}, records) == (4, "record after the final seal (appended)")
    assert seal_mismatch({**seal, "first_prev": ZERO_HASH}, records)[0] == 1
    assert read_seal(tmp_path / "segment-000000000099.jsonl") is None


def test_signature_problems(tmp_path):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    doc = sign(key, {"a": 1, "b": [1, 2]})
    assert doc["key_id"] == key_id(key.public_key()) and signature_problem(doc, keys) is None
    assert signature_problem({**doc, "a": 2}, keys).startswith("bad signature")
    assert signature_problem({**doc, "signature": "!!"}, keys).startswith("bad signature")
    assert signature_problem(sign(other, {"a": 1}), keys).startswith("signed by unknown key")
    assert signature_problem({**doc, "key_id": ["x"]}, keys).startswith("signed by unknown key")


def test_keys_are_created_once_private_and_named_by_id(tmp_path, caplog):
    path = tmp_path / "audit.pem"
    with caplog.at_level(logging.WARNING, "gateway.audit.chain"):
        key = load_or_create_key(path)
    assert "created audit signing key" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = load_public_keys([tmp_path / "audit.pem.pub"])
    assert list(public) == [key_id(key.public_key())] and len(key_id(key.public_key())) == 16
    assert key_id(load_or_create_key(path).public_key()) == key_id(key.public_key())   # loaded, not replaced
    with pytest.raises(FileExistsError):
        create_key(path)
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ValueError, match="bad.pem"):
        load_key(tmp_path / "bad.pem")
    with pytest.raises(ValueError, match="audit.pem: not a PEM public key"):
        load_public_keys([path])


def test_times_have_one_canonical_form():
    assert iso_time("2026-11-28T04:05:50.123456Z") == "2026-11-28T04:05:50.123456Z"
    assert iso_time("2026-11-28T05:05:50.123456+01:00") == "2026-11-28T04:05:50.123456Z"
    assert iso_time("2026-11-28T04:05:50") == "2026-11-28T04:05:50.000000Z"
    assert iso_time("1700000000.5") == iso_from_unix(1700000000.5) == "2023-11-14T22:13:20.500000Z"
    assert iso_time("0001-01-01T00:00:00Z") == "0001-01-01T00:00:00.000000Z"
    assert len(iso_now()) == 27 and iso_now().endswith("Z") and iso_time(iso_now()) <= iso_now()
    for bad in ("yesterday", "nan", "1e30", ""):
        with pytest.raises(ValueError, match="not an ISO-8601 time or Unix seconds"):
            iso_time(bad)


def test_a_stream_lock_is_exclusive(tmp_path):
    fd = try_lock(tmp_path)
    assert fd is not None and try_lock(tmp_path) is None
    os.close(fd)
    again = try_lock(tmp_path)
    assert again is not None
    os.close(again)
