"""The general outbox alone: a journal on disk, replay in order, one delivery thread, retries.

No MLflow: ``deliver`` is a recording function, and the journal is a real file in tmp_path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coatnet.search.tracking import outbox as outbox_mod
from coatnet.search.tracking.outbox import Outbox, read_journal


class Rejected(Exception):
    """What the receiver answers when an operation can never succeed."""


class Down(Exception):
    """What the receiver raises while it is unreachable."""


def _is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, Rejected)


class Receiver:
    """Records what was delivered (and by which thread); can be down, reject, or block."""

    def __init__(self) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.threads: set[int] = set()
        self.down = False
        self.reject: set[int] = set()  # values of op["n"] answered with Rejected
        self.block: threading.Event | None = None  # deliveries wait on it while set
        self.entered = threading.Event()
        self._active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
            self.threads.add(threading.get_ident())
        try:
            self.entered.set()
            if self.block is not None:
                self.block.wait(timeout=30)
            if self.down:
                raise Down("connection refused")
            if op["n"] in self.reject:
                raise Rejected(f"bad value in op {op['n']}")
            self.delivered.append(dict(op))
        finally:
            with self._lock:
                self._active -= 1

    def numbers(self) -> list[int]:
        return [op["n"] for op in self.delivered]


def _outbox(path: Path, receiver: Receiver, **kwargs: Any) -> Outbox:
    return Outbox(path=path, deliver=receiver, is_permanent=_is_permanent,
                  describe=lambda op: f"op {op.get('n')}", retry_max_s=0.05, name="test",
                  thread_name=f"outbox-{path.stem}", **kwargs)


def _journal_numbers(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def test_operations_are_journalled_before_delivery_and_replayed_in_order(tmp_path: Path) -> None:
    """A receiver that is down keeps every op on disk; a new outbox delivers them in order."""
    journal = tmp_path / "ops.pending.json"
    down = Receiver()
    down.down = True
    first = _outbox(journal, down)
    for n in range(1, 6):
        first.put({"n": n})
    assert _journal_numbers(journal) == [1, 2, 3, 4, 5]  # on disk before any delivery
    assert [json.loads(line)["seq"] for line in journal.read_text().splitlines()] == [1, 2, 3,
                                                                                    4, 5]
    assert not first.flush(timeout_s=0.3)
    assert first.pending_count() == 5
    first.stop()  # the "process" ends without persist(): the appended journal is enough
    assert down.delivered == []

    up = Receiver()
    second = _outbox(journal, up)
    assert second.pending_count() == 0  # nothing is read before replay
    assert second.replay() == 5
    assert second.flush(timeout_s=10)
    second.stop()
    assert up.numbers() == [1, 2, 3, 4, 5]
    assert [op["seq"] for op in up.delivered] == [1, 2, 3, 4, 5]
    assert not journal.exists()  # drained: the journal is obsolete


def test_replay_renumbers_the_journal_and_new_operations_follow(tmp_path: Path) -> None:
    """Replayed ops keep their order but get this outbox's numbers; new ones come after."""
    journal = tmp_path / "ops.pending.json"
    journal.write_text("".join(json.dumps({"n": n, "seq": seq}) + "\n"
                               for n, seq in ((1, 7), (2, 9))))
    receiver = Receiver()
    receiver.block = threading.Event()  # hold delivery until everything is queued
    box = _outbox(journal, receiver)
    assert box.replay() == 2
    assert [json.loads(line)["seq"] for line in journal.read_text().splitlines()] == [1, 2]
    box.put({"n": 3})
    assert _journal_numbers(journal) == [1, 2, 3]
    receiver.block.set()
    assert box.flush(timeout_s=10)
    box.stop()
    assert receiver.numbers() == [1, 2, 3]
    assert [op["seq"] for op in receiver.delivered] == [1, 2, 3]


def test_replay_without_pending_removes_a_stale_journal(tmp_path: Path) -> None:
    journal = tmp_path / "ops.pending.json"
    journal.write_text("\n")
    box = _outbox(journal, Receiver())
    assert box.replay() == 0
    assert not journal.exists()


def test_torn_last_line_and_invalid_entries_are_skipped(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "ops.pending.json"
    journal.write_text(json.dumps({"n": 1}) + "\n" + json.dumps(["not", "an", "op"]) + "\n"
                       + json.dumps({"other": 2}) + "\n" + json.dumps({"n": 3}) + "\n"
                       + '{"n": 4, "se')  # the process died while appending this one
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking.outbox")
    ops = read_journal(journal, name="test", valid=lambda op: "n" in op)
    assert [op["n"] for op in ops] == [1, 3]
    assert any("torn journal line skipped" in r.getMessage() for r in caplog.records)

    receiver = Receiver()
    box = _outbox(journal, receiver, valid=lambda op: "n" in op)
    assert box.replay() == 2
    assert box.flush(timeout_s=10)
    box.stop()
    assert receiver.numbers() == [1, 3]


def test_the_older_json_list_journal_is_read(tmp_path: Path) -> None:
    journal = tmp_path / "ops.pending.json"
    journal.write_text(json.dumps([{"n": 1}, "junk", {"n": 2}]))
    assert [op["n"] for op in read_journal(journal)] == [1, 2]
    assert read_journal(tmp_path / "missing.json") == []


def test_a_permanent_error_drops_the_operation_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking.outbox")
    journal = tmp_path / "ops.pending.json"
    receiver = Receiver()
    receiver.reject = {2}
    box = _outbox(journal, receiver)
    for n in (1, 2, 3):
        box.put({"n": n})
    assert box.flush(timeout_s=10)
    box.stop()
    assert receiver.numbers() == [1, 3]  # 2 was dropped, not retried, and did not block 3
    assert box.pending_count() == 0
    assert not journal.exists()
    dropped = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert dropped == ["test rejected op 2, dropped: bad value in op 2"]


def test_a_transient_error_is_retried_until_the_receiver_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="coatnet.search.tracking.outbox")
    journal = tmp_path / "ops.pending.json"
    receiver = Receiver()
    receiver.down = True
    box = _outbox(journal, receiver, target="test server")
    for n in (1, 2):
        box.put({"n": n})
    assert not box.flush(timeout_s=0.3)  # retried meanwhile, never dropped
    assert box.pending_count() == 2 and receiver.delivered == []
    receiver.down = False
    assert box.flush(timeout_s=10)
    box.stop()
    assert receiver.numbers() == [1, 2]  # each exactly once, in order
    messages = [r.getMessage() for r in caplog.records]
    assert sum("test server unreachable" in m for m in messages) == 1  # once per outage
    assert any("test server reachable again" in m for m in messages)


def test_persist_compacts_the_journal_to_what_is_still_queued(tmp_path: Path) -> None:
    journal = tmp_path / "ops.pending.json"
    receiver = Receiver()
    box = _outbox(journal, receiver)
    box.put({"n": 1})
    assert box.flush(timeout_s=10)
    receiver.down = True
    for n in (2, 3):
        box.put({"n": n})
    assert not box.flush(timeout_s=0.3)
    assert box.persist() == 2
    box.stop()
    assert _journal_numbers(journal) == [2, 3]
    assert box.pending_count() == 2


def test_only_one_delivery_thread_even_after_a_stop_that_could_not_join(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop() while a delivery hangs, then more work: the hung thread carries on alone."""
    monkeypatch.setattr(outbox_mod, "_JOIN_TIMEOUT_S", 0.1)
    journal = tmp_path / "ops.pending.json"
    receiver = Receiver()
    receiver.block = threading.Event()
    box = _outbox(journal, receiver)
    box.put({"n": 1})
    assert receiver.entered.wait(timeout=10)
    box.stop()  # the thread is inside deliver(): the join times out

    def producer(start: int) -> None:
        for n in range(start, start + 5):
            box.put({"n": n})

    producers = [threading.Thread(target=producer, args=(s,)) for s in (10, 20, 30)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    time.sleep(0.2)
    alive = [t for t in threading.enumerate() if t.name == f"outbox-{journal.stem}"]
    assert len(alive) == 1
    receiver.block.set()
    assert box.flush(timeout_s=10)
    box.stop()
    numbers = receiver.numbers()
    assert numbers[0] == 1 and sorted(numbers) == [1, *range(10, 15), *range(20, 25),
                                                   *range(30, 35)]  # each exactly once
    assert [op["seq"] for op in receiver.delivered] == list(range(1, 17))  # in put order
    assert receiver.max_active == 1
    assert len(receiver.threads) == 1
