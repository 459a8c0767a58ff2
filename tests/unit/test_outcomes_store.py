"""The join store on SQLite: remember and join (by request id, by trace id, every status), the race
of an outcome posted right after the answer, restarts, two processes on one file, expiry, the
bounded queue, and the queries of the rest of the outcomes room."""
from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from gateway.outcomes.records import Feedback, Prediction
from gateway.outcomes.store import ArmStats, JoinStore, Observer, Status

NOW = 1_700_000_000.0
TRACE = "0af7651916cd43dd8448eb211c80319c"


def at_now() -> float:
    """The stores' clock (for expiry): fixed, so that predictions made at NOW expire only when a test says."""
    return NOW


def prediction(i: int, *, request_id: str | None = None, trace_id: str = "", target: str = "blue",
               version: str = "1", rows: list[list[float]] | None = None, at: float = NOW,
               ttl: float = 3600.0, model: str = "clf") -> Prediction:
    rows = [[0.2, 0.8], [0.9, 0.1]] if rows is None else rows
    return Prediction(model, f"r{i}" if request_id is None else request_id, trace_id or f"{i:032x}", target, version,
                      "weight", {"country": "fr" if i % 2 else "de"}, rows, at, at + ttl)


class Recorder(Observer):
    """Counts what the writer reports, and (as on_drop) what is lost."""

    def __init__(self) -> None:
        self.rows = self.tombstoned = self.deleted = 0
        self.failures: list[str] = []
        self.drops: list[tuple[object, str]] = []

    def on_drop(self, parts: object, reason: str) -> None:
        self.drops.append((parts, reason))

    def written(self, rows: int, depth: int) -> None:
        self.rows += rows

    def failed(self, stage: str) -> None:
        self.failures.append(stage)

    def swept(self, tombstoned: int, deleted: int) -> None:
        self.tombstoned += tombstoned
        self.deleted += deleted


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[..., JoinStore]]:
    """Stores on tmp_path/outcomes.db (settle_s 0 unless asked: one process; clock at_now);
    closed at teardown."""
    opened: list[JoinStore] = []

    def make(**options: object) -> JoinStore:
        settings: dict = {"settle_s": 0.0, "clock": at_now, **options}
        store = JoinStore(f"sqlite:///{tmp_path / 'outcomes.db'}", **settings)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_join_by_request_id_and_by_trace_id(stores: Callable[..., JoinStore]) -> None:
    store = stores()
    store.remember(prediction(1))
    store.remember(prediction(2, request_id="", trace_id=TRACE))   # no client id: only its trace joins
    report = store.join([Feedback("clf", request_id="r1", row=1, label=0.0, business={"bought": True}),
                         Feedback("clf", trace_id=TRACE, label=1.0)], NOW + 5)
    assert [r.status for r in report.results] == [Status.JOINED, Status.JOINED]
    first, second = report.joined
    assert first.prediction == prediction(1) and first.feedback.row == 1 and first.joined_at == NOW + 5
    assert second.prediction == prediction(2, request_id="", trace_id=TRACE)
    assert report.counts() == {"joined": 2}
    # a request id that names nothing falls back to the trace, but only to predictions made without an id
    store.remember(prediction(3, trace_id=TRACE))
    assert store.join([Feedback("clf", request_id="nope", trace_id=TRACE)], NOW).results[0].status is Status.DUPLICATE
    assert store.join([Feedback("clf", request_id="r3", trace_id="f" * 32)], NOW).results[0].status is Status.JOINED


def test_every_status_in_input_order(stores: Callable[..., JoinStore]) -> None:
    store = stores()
    store.remember(prediction(1))
    store.remember(prediction(2, ttl=10.0))
    store.remember(prediction(3, model="other"))
    items = [Feedback("clf", request_id="r9", label=1.0),             # never remembered
             Feedback("clf", request_id="r1", row=2, label=1.0),      # the batch has rows 0 and 1
             Feedback("clf", request_id="r2", label=1.0),             # past expires_at
             Feedback("clf", request_id="r1", row=1, label=0.0),
             Feedback("clf", request_id="r1", row=0, label=1.0),      # second outcome: the first won
             Feedback("clf", request_id="r3", label=1.0),             # another model's id
             Feedback("clf", request_id="r2", label=1.0)]
    report = store.join(items, NOW + 11)
    assert [r.status.value for r in report] == ["unknown", "bad_row", "expired", "joined", "duplicate",
                                                "unknown", "expired"]
    assert [r.reason for r in report][1:5] == ["row 2 is outside the prediction's 2 rows",
                                               "the prediction expired at 2023-11-14T22:13:30Z", "",
                                               "the prediction already has an outcome (the first one posted is kept)"]
    assert report.results[3].joined is not None and report.results[3].joined.feedback == items[3]
    [kept] = store.joined("clf")
    assert kept.feedback.row == 1 and kept.feedback.label == 0.0      # the first outcome is the one kept


def test_an_outcome_that_does_not_fit_its_row_joins_nothing(stores: Callable[..., JoinStore]) -> None:
    store = stores()
    store.remember(prediction(1))

    def fits(item: Feedback, row: list[float]) -> str | None:
        return None if item.label is None or item.label < len(row) else f"no class {item.label:g} in {len(row)}"

    report = store.join([Feedback("clf", request_id="r1", row=1, label=2.0),
                         Feedback("clf", request_id="r1", row=1, label=1.0)], NOW, fits)
    assert [(r.status, r.reason) for r in report] == [(Status.MISFIT, "no class 2 in 2"), (Status.JOINED, "")]
    [kept] = store.joined("clf")
    assert kept.feedback.label == 1.0


def test_join_right_after_remember(stores: Callable[..., JoinStore]) -> None:
    # the writer would wait 30 s before writing on its own: the join must flush this process's queue
    store = stores(batch_s=30.0)
    time.sleep(0.05)   # the writer is now asleep
    started = time.monotonic()
    for i in range(50):
        store.remember(prediction(i))
        assert store.join([Feedback("clf", request_id=f"r{i}", label=1.0)], NOW).results[0].status is Status.JOINED
    assert time.monotonic() - started < 10.0


def test_outcomes_survive_a_restart(stores: Callable[..., JoinStore]) -> None:
    store = stores(batch_s=30.0)
    store.remember(prediction(1))
    store.remember(prediction(2))
    assert store.join([Feedback("clf", request_id="r1", label=1.0)], NOW).results[0].status is Status.JOINED
    store.remember(prediction(3))
    store.close()            # drains r3 although the writer's interval has not passed
    again = stores()
    assert [j.prediction.request_id for j in again.joined("clf")] == ["r1"]
    report = again.join([Feedback("clf", request_id="r1"), Feedback("clf", request_id="r2"),
                         Feedback("clf", request_id="r3")], NOW)
    assert [r.status for r in report.results] == [Status.DUPLICATE, Status.JOINED, Status.JOINED]


def test_decode_runs_in_the_writer_and_failures_are_counted(stores: Callable[..., JoinStore]) -> None:
    recorder = Recorder()
    store = stores(observer=recorder, on_drop=recorder.on_drop)
    callers = threading.get_ident()
    threads: list[int] = []

    def decode(i: int) -> Prediction:
        threads.append(threading.get_ident())
        if i == 2:
            raise ValueError("output tensor missing")
        return prediction(i, rows=[[float(i)]] if i == 3 else [[1.0, 2.0], [3.0]])   # 4: ragged rows

    for i in (1, 2, 3, 4):
        store.remember(i if i != 1 else prediction(1), decode if i != 1 else None)
    assert store.flush()
    assert threads and callers not in threads
    assert recorder.drops == [(2, "decode"), (4, "decode")] and recorder.rows == 2 and recorder.failures == []
    report = store.join([Feedback("clf", request_id=f"r{i}", label=1.0) for i in (1, 2, 3, 4)], NOW)
    assert [r.status for r in report.results] == [Status.JOINED, Status.UNKNOWN, Status.JOINED, Status.UNKNOWN]


def test_a_reused_request_id_replaces_a_prediction_without_outcome(stores: Callable[..., JoinStore]) -> None:
    store = stores()
    store.remember(prediction(1, target="blue"))
    store.remember(prediction(1, target="green", at=NOW + 1))
    [joined] = store.join([Feedback("clf", request_id="r1", label=1.0)], NOW + 2).joined
    assert joined.prediction.target == "green"
    store.remember(prediction(1, target="red", at=NOW + 3))   # r1 has an outcome: kept as it is
    assert store.flush()
    assert [j.prediction.target for j in store.joined("clf")] == ["green"]


def _writer(path: str, prefix: str, count: int, start: multiprocessing.synchronize.Barrier,
            remembered: multiprocessing.synchronize.Event, go: multiprocessing.synchronize.Event,
            results: multiprocessing.Queue) -> None:
    """A second process: open the store at the same moment as the test, remember `count`
    predictions, then (on go) join the test's and report the statuses."""
    start.wait()
    store = JoinStore(f"sqlite:///{path}", batch_s=0.3, batch=64, settle_s=1.0, clock=at_now)
    for i in range(count):
        store.remember(prediction(i, request_id=f"{prefix}{i}", target=prefix))
    remembered.set()
    go.wait(30)
    report = store.join([Feedback("clf", request_id=f"main{i}", label=1.0) for i in range(count)], NOW)
    results.put(sorted(report.counts().items()))
    store.close()


def test_two_processes_share_one_file(tmp_path: Path) -> None:
    # both open a fresh file at once (the schema race), write at once, and join each other's
    # predictions right after the other remembered them (still in its queue: the settle look)
    ctx = multiprocessing.get_context("spawn")
    path, count = tmp_path / "shared.db", 300
    start, remembered, go, results = ctx.Barrier(2), ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_writer, args=(str(path), "child", count, start, remembered, go, results))
    child.start()
    store: JoinStore | None = None
    try:
        start.wait(30)
        store = JoinStore(f"sqlite:///{path}", batch_s=0.3, batch=64, settle_s=1.0, clock=at_now)
        for i in range(count):
            store.remember(prediction(i, request_id=f"main{i}", target="main"))
        assert remembered.wait(30)
        report = store.join([Feedback("clf", request_id=f"child{i}", label=1.0) for i in range(count)], NOW)
        assert report.counts() == {"joined": count}
        go.set()
        assert results.get(timeout=30) == [("joined", count)]
        child.join(30)
        assert child.exitcode == 0
        assert store.arm_stats("clf", "main", "label", 0.0).n == count
        assert store.arm_stats("clf", "child", "label", 0.0).n == count
    finally:
        if store is not None:
            store.close()
        if child.is_alive():
            child.kill()


def test_expiry_makes_tombstones_then_deletes(stores: Callable[..., JoinStore], tmp_path: Path) -> None:
    clock = [NOW]
    recorder = Recorder()
    store = stores(clock=lambda: clock[0], sweep_interval_s=0.01, grace_s=100.0, retention_s=1000.0,
                   sweep_batch=3, observer=recorder)
    for i in range(10):
        store.remember(prediction(i, ttl=10.0))
    store.remember(prediction(99, ttl=10.0))
    assert store.join([Feedback("clf", request_id="r99", label=1.0)], NOW + 1).counts() == {"joined": 1}
    db = sqlite3.connect(tmp_path / "outcomes.db")

    def payloads() -> int:
        return db.execute("SELECT COUNT(*) FROM outcome_predictions WHERE rows_f64 IS NOT NULL").fetchone()[0]

    def count() -> int:
        return db.execute("SELECT COUNT(*) FROM outcome_predictions").fetchone()[0]

    assert payloads() == 11
    clock[0] = NOW + 11                         # past expires_at: tombstones, in steps of sweep_batch
    wait_for(lambda: recorder.tombstoned == 10)
    assert payloads() == 1 and count() == 11    # the joined record keeps its payload
    # a tombstone still answers "expired", whatever the caller's clock says
    assert store.join([Feedback("clf", request_id="r3")], NOW).results[0].status is Status.EXPIRED
    clock[0] = NOW + 111                        # past the grace: the tombstones go
    wait_for(lambda: recorder.deleted == 10)
    assert count() == 1
    assert store.join([Feedback("clf", request_id="r3")], NOW).results[0].status is Status.UNKNOWN
    assert len(store.joined("clf")) == 1
    clock[0] = NOW + 1002                       # past the joined record's retention
    wait_for(lambda: recorder.deleted == 11)
    assert store.joined("clf") == []


def test_a_full_queue_drops_and_tells(stores: Callable[..., JoinStore]) -> None:
    recorder = Recorder()
    store = stores(queue_size=3, observer=recorder, on_drop=recorder.on_drop)
    unblock = threading.Event()

    def slow(i: int) -> Prediction:   # holds the writer until the test lets it go
        unblock.wait(10)
        return prediction(i)

    assert store.remember(0, slow)
    wait_for(lambda: store.depth == 0)   # the writer took it and waits in decode
    accepted = [store.remember(i, slow) for i in range(1, 6)]
    assert accepted == [True, True, True, False, False]
    assert store.depth == 3 and recorder.drops == [(4, "full"), (5, "full")]
    unblock.set()
    assert store.flush()
    assert recorder.rows == 4
    report = store.join([Feedback("clf", request_id=f"r{i}") for i in range(6)], NOW)
    assert [r.status for r in report] == [Status.JOINED] * 4 + [Status.UNKNOWN] * 2
    store.close()
    assert store.remember(prediction(7)) is False and recorder.drops[-1] == (prediction(7), "closed")


def test_remember_is_cheap_for_the_caller(stores: Callable[..., JoinStore]) -> None:
    store = stores(queue_size=1_000_000)
    p = prediction(0)
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        store.remember(p)
    per_call = (time.perf_counter() - started) / n
    assert per_call < 20e-6, f"remember took {per_call * 1e6:.1f} µs a call"


def test_arm_stats_and_joined_agree_with_the_inputs(stores: Callable[..., JoinStore]) -> None:
    rng = np.random.default_rng(7)
    store = stores()
    posted: list[tuple[Prediction, Feedback]] = []
    for i in range(200):
        target, version = ("blue", "1") if i % 3 else ("green", "2")
        p = prediction(i, target=target, version=version, rows=rng.random((3, 4)).tolist(), at=NOW + i)
        store.remember(p)
        if i % 5 == 4:
            continue   # no outcome for these
        label = int(rng.integers(0, 4)) if i % 7 else None
        business = {"revenue": float(rng.normal(10, 3))} if i % 4 else {}
        posted.append((p, Feedback("clf", request_id=p.request_id, row=i % 3, label=label, business=business)))
    report = store.join([f for _, f in posted], NOW + 500)
    assert report.counts() == {"joined": len(posted)}

    for target in ("blue", "green"):
        since = NOW + 50
        mine = [(p, f) for p, f in posted if p.target == target and p.at >= since]
        correct = [float(int(np.argmax(p.rows[f.row])) == f.label) for p, f in mine if f.label is not None]
        revenue = [f.business["revenue"] for _, f in mine if "revenue" in f.business]
        for outcome, values in (("label", correct), ("revenue", revenue)):
            stats = store.arm_stats("clf", target, outcome, since)
            assert isinstance(stats, ArmStats) and stats.n == len(values) > 0
            assert stats.sum == pytest.approx(sum(values)) and stats.sum_sq == pytest.approx(sum(v * v for v in values))
    assert store.arm_stats("clf", "blue", "churned", NOW) == (0, 0.0, 0.0)
    with pytest.raises(ValueError):
        store.arm_stats("clf", "blue", 'x") OR 1=1 --', NOW)

    window = store.joined("clf", version="2", since=NOW + 20, until=NOW + 120)
    expected = [(p, f) for p, f in posted if p.version == "2" and NOW + 20 <= p.at < NOW + 120]
    assert [j.prediction for j in window] == [p for p, _ in expected]
    assert [(j.feedback.row, j.feedback.label, j.feedback.business) for j in window] == \
        [(f.row, f.label, f.business) for _, f in expected]
    assert all(j.joined_at == NOW + 500 for j in window)
    assert len(store.joined("clf")) == len(posted) and store.joined("other") == []


def test_a_handle_for_tools_reads_without_a_writer(stores: Callable[..., JoinStore], tmp_path: Path) -> None:
    store = stores()
    store.remember(prediction(1))
    store.join([Feedback("clf", request_id="r1", label=1.0)], NOW)
    recorder = Recorder()
    tool = JoinStore(f"sqlite:///{tmp_path / 'outcomes.db'}", writer=False, on_drop=recorder.on_drop)
    try:
        assert [j.prediction.request_id for j in tool.joined("clf")] == ["r1"]
        assert tool.remember(prediction(2)) is False and recorder.drops == [(prediction(2), "closed")]
    finally:
        tool.close()


def test_refuses_what_it_cannot_store(stores: Callable[..., JoinStore]) -> None:
    for url in ("mysql://somewhere/db", "sqlite://relative.db", "sqlite:///"):
        with pytest.raises(ValueError):
            JoinStore(url)
    store = stores()
    store.remember(prediction(1))
    with pytest.raises(ValueError):
        store.join([Feedback("clf", request_id="r1", label=float("nan"))], NOW)
    assert store.join([Feedback("clf", request_id="r1", label=1.0)], NOW).counts() == {"joined": 1}
