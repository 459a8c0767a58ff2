"""The audit writer. The request path appends entries to a bounded deque (never blocks, never
raises); one background thread renders them, chains them onto the stream's segment files, fsyncs
and seals, rotates and keeps retention. A failed write is retried in order, so nothing is lost
while the deque has room; when it is full, append says so and the caller applies its policy."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.chain import (ZERO_HASH, AuditError, canonical, check_chain, first_seq_of, fsync_dir, iso_from_unix,
                                 iso_now, key_id, parse_line, read_seal, record_line, seal_mismatch, seal_path,
                                 segment_name, segment_paths, signature_problem, try_lock, write_all, write_seal)

log = logging.getLogger(__name__)

BATCH = 4096               # entries rendered and written with one os.write
GATHER_S = 0.01            # the writer's pause between batches (unless a full batch waits): entries gather,
                           # so a busy gateway makes one write and one GIL hand-over per ~GATHER_S, not per request
RETRY_S = 0.5              # back-off after a failed write or rotation
RETENTION_EVERY_S = 60.0
LOCK_WAIT_S = 10.0


class Entry(Protocol):
    """What the request path queues: rendered in the writer thread, off the request path."""

    def render(self) -> dict[str, Any]:
        """The record body: JSON-able, with "type" and "time" (see chain.iso_now)."""
        ...


class Observer:
    """Hooks for metrics, called in the writer thread; they must be quick and must not raise."""

    def written(self, records: int, depth: int) -> None:
        """A batch of records was written; depth entries are still queued."""

    def failed(self, stage: str) -> None:
        """A stage failed: "render", "write", "fsync", "seal", "recovery" or "retention"."""

    def recovered(self, torn_bytes: int) -> None:
        """open() found the stream's newest segment not final-sealed and recovered it."""

    def sealed(self, final: bool) -> None:
        """A checkpoint (final False) or final seal was written."""


@dataclass(eq=False)
class _Segment:
    """The segment being written: its file, where its chain starts, what is written and sealed."""

    path: Path
    fd: int
    first_prev: str
    opened_at: float        # time.monotonic()
    size: int = 0           # bytes of whole lines written
    count: int = 0          # records written
    head: str = ZERO_HASH   # hash of the last record written
    synced: int = 0         # records covered by the last seal


class AuditLog:
    """One stream of the audit log: `<directory>/<stream>/`, written by this process alone."""

    def __init__(self, directory: Path, stream: str, key: Ed25519PrivateKey, *, capacity: int = 65536,
                 fsync_interval_s: float = 1.0, max_segment_bytes: int = 64 * 2**20,
                 max_segment_age_s: float = 3600.0, retention_s: float | None = None,
                 observer: Observer | None = None, max_bytes: int = 256 * 2**20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.stream = stream
        self.fsync_interval_s = fsync_interval_s
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age_s = max_segment_age_s
        self.retention_s = retention_s
        self._dir = Path(directory) / stream
        self._key = key
        self._key_id = key_id(key.public_key())
        self._observer = observer or Observer()
        self._queue: deque[tuple[Entry, int]] = deque()   # entries and the bytes they hold on to
        self._bytes_in = 0        # bytes of entries ever queued (the appending thread's counter) ...
        self._bytes_out = 0       # ... and of entries taken (the writer's): two owners, no lock
        self._closed = False      # from close() on: append refuses, the writer ends once the deque is drained
        self._abandon = False     # the writer ends now (close timed out)
        self._thread: threading.Thread | None = None
        self._lock_fd = -1
        # The chain and the segment; the writer thread's alone once open() returns.
        self._seq = 0                  # seq of the next record chained
        self._prev = ZERO_HASH         # hash of the last record chained
        self._pending: list[bytes] = []   # lines chained, not yet written; written before anything else
        self._segment: _Segment | None = None
        self._failing = False          # the last write failed: truncate back before the next
        self._retry_at = 0.0
        self._last_sync = 0.0
        self._next_retention = 0.0

    @property
    def depth(self) -> int:
        """Entries queued and not yet taken by the writer."""
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes the queued entries hold on to (requests and answers), as their appenders said."""
        return self._bytes_in - self._bytes_out

    def full(self) -> bool:
        return len(self._queue) >= self.capacity or self.queued_bytes >= self.max_bytes

    def append(self, entry: Entry, size: int = 0, reserved: bool = False) -> bool:
        """Queue entry (holding size bytes); False, queuing nothing, once closed or while the queue
        is full (`capacity` entries or `max_bytes`). reserved: the caller made room beforehand
        (fail_closed admission), so it is queued even past the limits."""
        if self._closed or (not reserved and self.full()):
            return False
        self._bytes_in += size
        self._queue.append((entry, size))
        return True

    def open(self) -> None:
        """Lock the stream, recover what a crash left, start a new segment, keep retention and
        start the writer thread. OSError when another process holds the stream for LOCK_WAIT_S."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        try:
            previous, extra = self._recover()
            self._begin(previous, extra)
            self._flush()
            if self.retention_s is not None and not self._pending:
                self._retain()
        except BaseException:
            if self._segment is not None:
                os.close(self._segment.fd)
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.stream}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop taking entries; write all queued, fsync, final-seal, stop the writer and unlock.
        A writer still failing after timeout_s is abandoned unsealed: the next open recovers."""
        if self._thread is None:
            return
        self._closed = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon = True
            self._thread.join(RETRY_S + 1.0)
            log.error("audit stream %s: not closed within %g s; %d queued entries and %d chained lines are lost, "
                      "the next open recovers the segment", self.stream, timeout_s, len(self._queue), len(self._pending))
        elif self._queue:
            log.error("audit stream %s: %d entries appended while closing were not written", self.stream, len(self._queue))
        self._thread = None
        os.close(self._lock_fd)

    # ------------------------------------------------------------ the writer thread

    @property
    def _current(self) -> _Segment:
        assert self._segment is not None, "open() first"
        return self._segment

    def _run(self) -> None:
        while not self._abandon:
            try:
                busy = self._step()
            except Exception:
                log.exception("audit stream %s: writer error", self.stream)
                busy = False
            if self._closed and not busy and not self._queue and not self._pending:
                break
            if not busy or len(self._queue) < BATCH:
                time.sleep(GATHER_S)
        if not self._abandon:
            self._sync(final=True)
        os.close(self._current.fd)

    def _step(self) -> bool:
        """Write what is queued (or retry what failed), then fsync and seal, and keep retention, when
        due. Whether it wrote something."""
        segment = self._current
        now = time.monotonic()
        wrote = False
        if self._pending:
            wrote = now >= self._retry_at and self._flush()
        elif self._queue:
            bodies = [self._render(self._take()) for _ in range(min(len(self._queue), BATCH))]
            if now >= self._retry_at and (segment.size >= self.max_segment_bytes
                                          or now - segment.opened_at >= self.max_segment_age_s):
                self._rotate()
            self._chain(bodies)
            wrote = self._flush()
        segment = self._current
        if segment.synced < segment.count and now - self._last_sync >= self.fsync_interval_s:
            self._sync(final=False)
        if self.retention_s is not None and now >= self._next_retention and not self._pending:
            self._retain()
        return wrote

    def _take(self) -> Entry:
        entry, size = self._queue.popleft()
        self._bytes_out += size
        return entry

    def _render(self, entry: Entry) -> bytes:
        """The entry's body; a "render_error" record in its place when it does not render."""
        try:
            body = entry.render()
            if not isinstance(body, dict):
                raise TypeError(f"render() returned a {type(body).__name__}, not a dict")
            return canonical(body)
        except Exception as e:
            log.exception("audit stream %s: an entry did not render", self.stream)
            self._observer.failed("render")
            return canonical({"type": "render_error", "time": iso_now(), "error": repr(e)})

    def _chain(self, bodies: list[bytes]) -> None:
        for body in bodies:
            line, self._prev = record_line(self._seq, self._prev, body)
            self._pending.append(line)
            self._seq += 1

    def _flush(self) -> bool:
        """Write the pending lines in one go; on failure cut the file back to its last whole line
        and keep them, in order, for a retry after RETRY_S. Whether they were written."""
        segment = self._current
        data = b"".join(self._pending)
        try:
            if self._failing:
                os.ftruncate(segment.fd, segment.size)
            write_all(segment.fd, data)
        except OSError as e:
            if not self._failing:
                log.error("audit stream %s: write to %s failed (%s); retrying, %d entries queued",
                          self.stream, segment.path.name, e, len(self._queue))
            self._failing = True
            self._retry_at = time.monotonic() + RETRY_S
            self._observer.failed("write")
            self._observer.written(0, len(self._queue))  # the depth gauge keeps moving while writes fail
            return False
        if self._failing:
            log.warning("audit stream %s: writing again", self.stream)
            self._failing = False
        records = len(self._pending)
        segment.size += len(data)
        segment.count += records
        segment.head = self._prev
        self._pending = []
        self._observer.written(records, len(self._queue))
        return True

    def _sync(self, final: bool) -> bool:
        """fsync the segment and seal what is written; whether both worked."""
        segment = self._current
        if segment.count == 0:
            return False
        self._last_sync = time.monotonic()
        try:
            os.fsync(segment.fd)
        except OSError as e:
            log.error("audit stream %s: fsync of %s failed: %s", self.stream, segment.path.name, e)
            self._observer.failed("fsync")
            return False
        try:
            write_seal(segment.path, self._key, stream=self.stream, first_prev=segment.first_prev,
                       count=segment.count, head=segment.head, final=final)
        except OSError as e:
            log.error("audit stream %s: sealing %s failed: %s", self.stream, segment.path.name, e)
            self._observer.failed("seal")
            return False
        segment.synced = segment.count
        self._observer.sealed(final)
        return True

    def _begin(self, previous: str | None, extra: list[bytes], fd: int | None = None) -> None:
        """Start the segment whose first record is the next seq (fd: its file, already created),
        opening it with its "segment" record and then the extra ones."""
        path = self._dir / segment_name(self._seq)
        if fd is None:
            fd = self._create(path)
        now = time.monotonic()
        self._segment = _Segment(path, fd, first_prev=self._prev, opened_at=now, head=self._prev)
        self._last_sync = now
        self._chain([canonical({"type": "segment", "time": iso_now(), "stream": self.stream, "segment": path.name,
                                "previous": previous, "pid": os.getpid(), "hostname": socket.gethostname(),
                                "key_id": self._key_id}), *extra])

    def _create(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fsync_dir(self._dir)
        return fd

    def _rotate(self) -> None:
        """Final-seal the segment and start the next; on failure go on writing this one."""
        segment = self._current
        path = self._dir / segment_name(self._seq)
        try:
            fd = self._create(path)
        except OSError as e:
            log.error("audit stream %s: cannot start %s: %s", self.stream, path.name, e)
            self._observer.failed("write")
            self._retry_at = time.monotonic() + RETRY_S
            return
        if not self._sync(final=True):
            os.close(fd)
            with suppress(OSError):
                path.unlink()
            self._retry_at = time.monotonic() + RETRY_S
            return
        os.close(segment.fd)
        self._begin(segment.path.name, [], fd)

    def _retain(self) -> None:
        """Delete the oldest final-sealed segments whose last record is older than retention_s, once a
        durable "retention" record vouches for them (verify accepts a stream starting mid-chain so)."""
        assert self.retention_s is not None
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
        cutoff = iso_from_unix(time.time() - self.retention_s)
        try:
            expired: list[tuple[Path, dict[str, Any]]] = []
            for path in segment_paths(self._dir):
                seal = read_seal(path)
                if (path == self._current.path or not seal or seal.get("final") is not True
                        or _last_time(path, seal) >= cutoff):
                    break
                expired.append((path, seal))
            if not expired:
                return
            last = expired[-1][1]
            self._chain([canonical({"type": "retention", "time": iso_now(), "removed": [p.name for p, _ in expired],
                                    "through_seq": last["last_seq"], "head": last["head"]})])
            if not (self._flush() and self._sync(final=False)):
                return
            for path, _ in expired:
                path.unlink()
                seal_path(path).unlink(missing_ok=True)
            fsync_dir(self._dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("audit stream %s: retention failed: %r", self.stream, e)
            self._observer.failed("retention")
            return
        log.info("audit stream %s: retention removed %d segments through seq %d", self.stream, len(expired),
                 last["last_seq"])

    # ------------------------------------------------------------ open()

    def _lock(self) -> int:
        deadline = time.monotonic() + LOCK_WAIT_S
        while (fd := try_lock(self._dir)) is None:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, f"audit stream {self._dir} is locked by another process "
                              f"(waited {LOCK_WAIT_S:g} s): does a second writer use the stream name {self.stream!r}?")
            time.sleep(0.05)
        return fd

    def _recover(self) -> tuple[str | None, list[bytes]]:
        """Set the chain to continue where the newest segment ends: cut a torn last line, drop a
        segment left empty, final-seal the one before unless its chain is broken. Returns that
        segment's name and the records the new segment holds after its "segment" record."""
        paths = segment_paths(self._dir)
        if not paths:
            return None, []
        newest = paths[-1]
        sealed = _final_seal(newest)
        if sealed is not None:  # closed cleanly: nothing of it is touched, whatever follows its seal
            self._seq, self._prev = sealed["last_seq"] + 1, sealed["head"]
            return newest.name, []
        torn = _cut_torn_tail(newest)
        crashed = bool(torn)
        if newest.stat().st_size == 0:
            log.warning("audit stream %s: removing %s, left empty by a crash", self.stream, newest.name)
            paths.pop().unlink()
            seal_path(newest).unlink(missing_ok=True)
            fsync_dir(self._dir)
            crashed = True
        if paths:
            crashed = not self._conclude(paths[-1]) or crashed
        if crashed:
            self._observer.recovered(len(torn))
        extra = [canonical({"type": "recovery", "time": iso_now(), "segment": newest.name, "torn_bytes": len(torn),
                            "torn_sha256": hashlib.sha256(torn).hexdigest(), "last_seq": self._seq - 1})] if torn else []
        return (paths[-1].name if paths else None), extra

    def _conclude(self, path: Path) -> bool:
        """Continue the chain after path's last record, and final-seal path if the writer stopped
        before it could and its records agree with each other and its checkpoint. Whether path was
        final-sealed before."""
        lines = path.read_bytes().split(b"\n")[:-1]
        walk = list(check_chain(lines, first_seq_of(path), None))
        records = [record for _, record, _ in walk]
        last = next((record for record in reversed(records) if record), None)
        if last is None:
            raise AuditError(f"{path}: no readable record to continue the chain from; move the stream directory aside")
        self._seq, self._prev = last.seq + 1, last.hash
        try:
            seal = read_seal(path)
            final = seal is not None and seal["final"] is True
            problem = next((f"line {n}: {reason}" for n, (_, _, reason) in enumerate(walk, 1) if reason), None)
            if problem is None and seal is not None and not final:
                problem = signature_problem(seal, {self._key_id: self._key.public_key()})
            if problem is None and seal is not None:
                mismatch = seal_mismatch(seal, records)
                problem = mismatch and f"line {mismatch[0]}: {mismatch[1]}"
        except (ValueError, KeyError, TypeError) as e:
            final, problem = False, f"unreadable seal: {e!r}"
        if problem:
            log.error("audit stream %s: %s is inconsistent (%s); leaving it unsealed for an audit, the chain goes on "
                      "from seq %d", self.stream, path.name, problem, self._seq)
            self._observer.failed("recovery")
        elif not final:
            assert records[0] is not None
            write_seal(path, self._key, stream=self.stream, first_prev=records[0].prev, count=len(records),
                       head=last.hash, final=True)
            log.warning("audit stream %s: %s was not final-sealed (the writer stopped without closing); sealed "
                        "its %d records", self.stream, path.name, len(records))
            self._observer.sealed(True)
        return final


def _final_seal(path: Path) -> dict[str, Any] | None:
    """path's seal when it is a readable final one (verify checks its signature and the records)."""
    try:
        seal = read_seal(path)
    except ValueError:
        return None
    if seal is None or seal.get("final") is not True or not isinstance(seal.get("last_seq"), int) \
            or not isinstance(seal.get("head"), str):
        return None
    return seal


def _cut_torn_tail(path: Path) -> bytes:
    """Cut a partial or broken last line (a write a crash interrupted) off path; the bytes cut."""
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")
    if not tail and lines and not _whole(lines[-1]):
        tail = lines[-1] + b"\n"
    if tail:
        log.warning("audit %s: cutting a torn last line of %d bytes", path, len(tail))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, len(data) - len(tail))
            os.fsync(fd)
        finally:
            os.close(fd)
    return tail


def _whole(raw: bytes) -> bool:
    try:
        return parse_line(raw).intact
    except ValueError:
        return False


def _last_time(path: Path, seal: dict[str, Any]) -> str:
    """The "time" of a segment's last record (its seal's, if that record was purged), reading
    only the file's tail."""
    with open(path, "rb") as f:
        end, size = f.seek(0, os.SEEK_END), 4096
        while True:
            start = max(0, end - size)
            f.seek(start)
            tail = f.read().rstrip(b"\n")
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            size *= 8
    body = parse_line(tail[cut + 1:]).body
    when = body.get("time") if body else None
    return when if isinstance(when, str) else str(seal["sealed_at"])
