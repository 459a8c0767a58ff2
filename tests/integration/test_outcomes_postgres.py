"""The join store on a real PostgreSQL (scripts/postgres.sh): two processes, as two gateway
replicas, join each other's predictions and see one set of A/B statistics; processes racing to
create the schema; the writer and joins riding out a database restart."""
from __future__ import annotations

import multiprocessing
import time

import psycopg
import pytest

from gateway.errors import Unavailable
from gateway.outcomes.records import Feedback, Prediction
from gateway.outcomes.store import JoinStore, Status
from tests.conftest import Postgres

NOW = 1_700_000_000.0


def at_now() -> float:
    """The stores' clock (for expiry): fixed at NOW, so nothing the tests make expires."""
    return NOW


def prediction(request_id: str, target: str, top: int) -> Prediction:
    rows = [[1.0 if k == top else 0.0 for k in range(3)]]
    return Prediction("clf", request_id, f"{abs(hash(request_id)):032x}"[-32:], target, "1", "weight", {}, rows,
                      NOW, NOW + 3600)


def _replica(url: str, start: multiprocessing.synchronize.Barrier, remembered: multiprocessing.synchronize.Event,
             go: multiprocessing.synchronize.Event, results: multiprocessing.Queue) -> None:
    """Another replica: open the store at the same moment as the test, remember 100 green
    predictions, then (on go) join the test's blue ones and report the statuses."""
    start.wait(30)
    store = JoinStore(url, batch_s=0.3, settle_s=1.0, clock=at_now)
    for i in range(100):
        store.remember(prediction(f"green{i}", "green", i % 3))
    remembered.set()
    go.wait(30)
    report = store.join([Feedback("clf", request_id=f"blue{i}", label=0.0, business={"revenue": 2.0})
                         for i in range(100)], NOW)
    results.put(sorted(report.counts().items()))
    store.close()


def test_two_replicas_join_each_others_predictions(postgres_server: Postgres) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, remembered, go, results = ctx.Barrier(2), ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_replica, args=(postgres_server.url, start, remembered, go, results))
    child.start()
    store: JoinStore | None = None
    try:
        start.wait(30)
        store = JoinStore(postgres_server.url, batch_s=0.3, settle_s=1.0, clock=at_now)
        for i in range(100):
            store.remember(prediction(f"blue{i}", "blue", 0))
        assert remembered.wait(30)
        # right after the other replica remembered them: some are still in its queue
        report = store.join([Feedback("clf", request_id=f"green{i}", label=1.0, business={"revenue": float(i)})
                             for i in range(100)], NOW)
        assert report.counts() == {"joined": 100}
        assert {j.prediction.target for j in report.joined} == {"green"}
        go.set()
        assert results.get(timeout=30) == [("joined", 100)]
        child.join(30)
        assert child.exitcode == 0
        # one truth for both: labels joined here and there, summed in SQL
        green = store.arm_stats("clf", "green", "label", NOW)
        correct = sum(1 for i in range(100) if i % 3 == 1)
        assert green == (100, float(correct), float(correct))
        assert store.arm_stats("clf", "green", "revenue", NOW) == (100, float(sum(range(100))),
                                                                   float(sum(i * i for i in range(100))))
        assert store.arm_stats("clf", "blue", "label", NOW) == (100, 100.0, 100.0)
        assert store.arm_stats("clf", "blue", "revenue", NOW) == (100, 200.0, 400.0)
        assert store.arm_stats("clf", "blue", "label", NOW + 1) == (0, 0.0, 0.0)
        assert len(store.joined("clf")) == 200
        again = store.join([Feedback("clf", request_id="blue7", label=1.0)], NOW)   # the other replica's won
        assert again.results[0].status is Status.DUPLICATE
    finally:
        if store is not None:
            store.close()
        if child.is_alive():
            child.kill()


def _create(url: str, start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    start.wait(30)
    try:
        store = JoinStore(url, clock=at_now)
        store.remember(prediction(f"p{multiprocessing.current_process().pid}", "blue", 0))
        store.close()
        results.put("ok")
    except Exception as e:  # reported to the test, which shows it
        results.put(repr(e))


def test_schema_creation_races(postgres_server: Postgres) -> None:
    ctx = multiprocessing.get_context("spawn")
    processes = 4
    start, results = ctx.Barrier(processes), ctx.Queue()
    children = [ctx.Process(target=_create, args=(postgres_server.url, start, results)) for _ in range(processes)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
    assert outcomes == ["ok"] * processes
    with psycopg.connect(postgres_server.url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outcome_predictions").fetchone() == (processes,)
        indexes = conn.execute("SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'outcome_predictions'").fetchone()
        assert indexes == (6,)   # the primary key and five of ours, each once


def test_writer_and_joins_ride_out_a_restart(postgres_server: Postgres) -> None:
    store = JoinStore(postgres_server.url, settle_s=0.0, clock=at_now)
    try:
        store.remember(prediction("before", "blue", 0))
        assert store.flush()
        postgres_server.stop()
        store.remember(prediction("during", "blue", 0))   # queued; the writer retries until the database is back
        assert not store.flush(timeout_s=1.0)
        postgres_server.start()
        assert store.flush(timeout_s=10.0)
        report = store.join([Feedback("clf", request_id=rid, label=0.0) for rid in ("before", "during")], NOW)
        assert report.counts() == {"joined": 2}
    finally:
        store.close()


def test_joins_answer_unavailable_while_the_database_is_down(postgres_server: Postgres) -> None:
    store = JoinStore(postgres_server.url, settle_s=0.0, clock=at_now, timeout_s=1.0)
    try:
        postgres_server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="outcome store postgresql"):
            store.join([Feedback("clf", request_id="x")], NOW)
        assert time.monotonic() - started < 10.0
    finally:
        postgres_server.start()
        store.close()
