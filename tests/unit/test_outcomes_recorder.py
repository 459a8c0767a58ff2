"""A route's recorder: what it refuses before anything is written (a NUL in a request id, a
label for a prediction that is not finite, a class the prediction does not have), and a post
counted in the store's thread, not on the event loop."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from gateway import config
from gateway.outcomes.recorder import Recorder
from gateway.outcomes.records import Feedback, Prediction
from gateway.outcomes.store import JoinStore

SPEC = config.Outcomes.model_validate({"task": "classifier", "business": {"converted": "rate"}})


class Hub:
    """What a recorder uses of the hub: the store, counting (where it runs) and the status counter."""

    def __init__(self, store: JoinStore) -> None:
        self.store = store
        self.counted_on: list[str] = []
        self.metrics = SimpleNamespace(posted=lambda model, status: None)

    def count(self, recorder: Recorder, joined: object) -> None:
        self.counted_on.append(threading.current_thread().name)


def test_unjoinable_outcomes_are_invalid_and_joins_are_counted_off_the_loop(tmp_path: Path):
    store = JoinStore(f"sqlite:///{tmp_path}/outcomes.db", settle_s=0)
    hub = Hub(store)
    recorder = Recorder("m", SPEC, hub)  # type: ignore[arg-type]
    now = time.time()
    for rid, row in (("ok", [0.2, 0.8]), ("nan", [float("nan"), 0.5]), ("small", [0.3, 0.7])):
        store.remember(Prediction("m", rid, "", "a", "1", "weight", {}, [row], now, now + 3600))
    items = [Feedback("m", "a\x00b", label=1.0), Feedback("m", "nan", label=1.0), Feedback("m", "small", label=5.0),
             Feedback("m", "nan", business={"converted": 1.0}), Feedback("m", "ok", label=1.0)]
    try:
        statuses = asyncio.run(recorder.post(items))
    finally:
        store.close()
    assert [s.status for s in statuses] == ["invalid", "invalid", "invalid", "joined", "joined"]
    assert "NUL" in statuses[0].reason and "not finite" in statuses[1].reason and "not a class" in statuses[2].reason
    assert len(hub.counted_on) == 2 and threading.main_thread().name not in hub.counted_on
