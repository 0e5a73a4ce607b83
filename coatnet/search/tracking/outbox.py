"""A durable outbox: operations journalled on disk, delivered in order by one background thread.

The producer (a driver loop that must never wait on the network) calls ``put``; the outbox
appends the operation to its journal file, queues it, and a single daemon thread hands the
operations one at a time, in order, to the ``deliver`` callable it was given. An operation
leaves the queue only once ``deliver`` returned, or raised an error that ``is_permanent`` calls
permanent (then it is dropped with a warning: it would fail the same way forever); any other
error keeps it at the head of the queue and is retried with exponential back-off up to
``retry_max_s``. So while the receiver is down, operations pile up in order and nothing is lost.

The journal (JSON lines, one operation each) is what makes this survive the process: every
operation is appended before it is queued, the file is removed whenever the queue drains, and
``persist`` atomically rewrites it to what is still queued. A process killed even with SIGKILL
therefore leaves every undelivered operation on disk, and the next outbox on the same file
(``replay``) queues them again ahead of its own. Delivery is at-least-once: ``deliver`` must be
idempotent (an operation whose result was lost with the process is sent again).

The outbox knows nothing of what the operations mean: they are JSON-able dicts, to which it
adds only ``seq`` (their number in delivery order).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coatnet.search.checkpoints import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["Outbox", "read_journal"]

Operation = dict[str, Any]

_RETRY_MIN_S = 0.5
_JOIN_TIMEOUT_S = 5.0
# How a retry attempt ended (``Outbox._attempt``).
_SENT, _DROPPED, _RETRY = "sent", "dropped", "retry"


def read_journal(path: Path | str, *, name: str = "outbox",
                 valid: Callable[[Operation], bool] | None = None) -> list[Operation]:
    """The operations journalled in ``path``, in order ([] when there is no journal).

    A torn last line (the process died while appending it) is skipped with a warning, and so
    is any entry that is not a JSON object or that ``valid`` refuses. An older writer kept the
    whole queue as one JSON list; that format is still read.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        logger.warning("Ignoring unreadable %s journal %s: %s", name, path, exc)
        return []
    if text.lstrip().startswith("["):  # the older format: one JSON list
        try:
            entries = json.loads(text)
        except ValueError as exc:
            logger.warning("Ignoring unreadable %s journal %s: %s", name, path, exc)
            return []
        return [op for op in entries if isinstance(op, dict) and (valid is None or valid(op))]
    ops = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except ValueError:
            logger.warning("%s:%d: torn journal line skipped (the driver died while writing "
                           "it)", path, number)
            continue
        if isinstance(op, dict) and (valid is None or valid(op)):
            ops.append(op)
    return ops


def _never_permanent(exc: BaseException) -> bool:
    return False


class Outbox:
    """Operations journalled in ``path`` and delivered in order by one daemon thread.

    ``deliver(op)`` sends one operation; ``is_permanent(exc)`` says whether an error it raised
    will never go away (drop the operation) or may (retry it). ``valid`` filters journal
    entries on ``replay``. ``name`` (what the operations are, e.g. "MLflow") and ``target``
    (who receives them, e.g. "MLflow at http://...") only word the log messages.
    """

    def __init__(
        self,
        *,
        path: Path | str,
        deliver: Callable[[Operation], None],
        is_permanent: Callable[[BaseException], bool] = _never_permanent,
        valid: Callable[[Operation], bool] | None = None,
        describe: Callable[[Operation], str] = lambda op: "an operation",
        retry_max_s: float = 15.0,
        name: str = "outbox",
        target: str | None = None,
        thread_name: str = "outbox-delivery",
    ) -> None:
        self.path = Path(path)
        self.retry_max_s = retry_max_s
        self.name = name
        self.target = target or name
        self._deliver = deliver
        self._is_permanent = is_permanent
        self._valid = valid
        self._describe = describe
        self._thread_name = thread_name
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._ops: collections.deque[Operation] = collections.deque()
        self._busy = False  # the head operation is being delivered right now
        self._stop = False
        self._running = False  # the delivery thread exists (at most one, ever, at a time)
        self._thread: threading.Thread | None = None
        self._outage_since: float | None = None
        self._seq = 0  # numbers journal lines; ops are delivered in this order

    # ---- producer side

    def put(self, op: Operation) -> None:
        """Journal ``op`` (adding its ``seq``), queue it and make sure it will be delivered."""
        with self._cond:
            self._seq += 1
            op["seq"] = self._seq
            self._journal(op)
            self._ops.append(op)
            self._cond.notify_all()
        self.start()

    def replay(self) -> int:
        """Queue what an earlier outbox on the same journal could not deliver; returns how many
        were found. Without any, a stale journal is removed.

        Call it at start, before the first ``put``: an operation put earlier is in the journal
        as well, so it would be queued (and delivered) twice. The replayed operations go ahead
        of anything queued here and are renumbered in delivery order.
        """
        pending = read_journal(self.path, name=self.name, valid=self._valid)
        with self._cond:
            if pending:
                logger.info("Replaying %d %s operation(s) left by a previous driver",
                            len(pending), self.name)
                queued = list(self._ops)
                self._ops.clear()
                self._ops.extend(pending)
                self._ops.extend(queued)
                self._seq = 0
                for op in self._ops:
                    self._seq += 1
                    op["seq"] = self._seq
                self._rewrite_journal()
                self._cond.notify_all()
            elif not self._ops:
                self.path.unlink(missing_ok=True)
        return len(pending)

    def start(self) -> None:
        """Start the delivery thread unless it runs (then it just keeps running).

        A thread that ``stop`` could not join (it was still inside ``deliver``) is reused, not
        joined by a second one: two threads would deliver the same head operation twice.
        """
        with self._cond:
            self._stop = False
            if self._running:
                self._cond.notify_all()
                return
            self._running = True
            self._thread = threading.Thread(target=self._deliver_loop, name=self._thread_name,
                                            daemon=True)
            self._thread.start()

    def flush(self, *, timeout_s: float | None = None) -> bool:
        """Wait until every queued operation was delivered; False if it timed out."""
        self.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._ops or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    logger.warning("%s: %d operation(s) still unsent after %.0fs", self.target,
                                   len(self._ops) + int(self._busy), timeout_s)
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True

    def stop(self) -> None:
        """Stop the delivery thread (queued operations stay queued, and journalled)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_JOIN_TIMEOUT_S)

    def persist(self) -> int:
        """Rewrite the journal to exactly what is still queued (dropping what was delivered
        meanwhile); returns how many operations it holds, 0 when it could not be written."""
        with self._lock:
            pending = len(self._ops)
            if pending:
                try:
                    self._rewrite_journal()
                except OSError as exc:
                    logger.warning("Could not save unsent %s operations: %s", self.name, exc)
                    return 0
        return pending

    def pending_count(self) -> int:
        """Operations not yet delivered (queued or being delivered)."""
        with self._lock:
            return len(self._ops)

    # ---- the journal (caller holds the lock)

    def _journal(self, op: Operation) -> None:
        """Append one operation to the journal; a failure is logged, the op stays queued."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(op, default=str) + "\n")
        except OSError as exc:
            logger.warning("Could not journal an %s operation to %s: %s", self.name, self.path,
                           exc)

    def _rewrite_journal(self) -> None:
        """Replace the journal with the queue as it is (atomically: old file or all of new)."""
        ops = list(self._ops)
        if not ops:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(op, default=str) + "\n" for op in ops)
        atomic_write_bytes(self.path, text.encode())

    # ---- the delivery thread

    def _deliver_loop(self) -> None:
        try:
            self._deliver_until_stopped()
        except BaseException:  # SystemExit and the like: let ``start`` begin a new thread
            with self._cond:
                self._running = False
                self._busy = False
                self._cond.notify_all()
            raise

    def _deliver_until_stopped(self) -> None:
        delay = _RETRY_MIN_S
        while True:
            with self._cond:
                while not self._ops and not self._stop:
                    self._cond.wait()
                if self._stop:
                    # Decided under the lock, so ``start`` either saw this thread running and
                    # cleared ``_stop`` in time, or sees it gone and starts the next one.
                    self._running = False
                    return
                op = self._ops[0]
                self._busy = True
            outcome = self._attempt(op)
            if outcome == _SENT:
                delay = _RETRY_MIN_S
            with self._cond:
                if outcome != _RETRY and self._ops and self._ops[0] is op:
                    self._ops.popleft()
                    if not self._ops:  # everything delivered: the journal is obsolete
                        try:
                            self.path.unlink(missing_ok=True)
                        except OSError:
                            pass
                self._busy = False
                self._cond.notify_all()
                if outcome == _RETRY:
                    self._cond.wait(timeout=delay)
                    delay = min(delay * 2, self.retry_max_s)

    def _attempt(self, op: Operation) -> str:
        """Deliver ``op`` once: _SENT, _DROPPED (a permanent error) or _RETRY."""
        try:
            self._deliver(op)
        except Exception as exc:  # never let delivery kill the thread
            if self._is_permanent(exc):
                logger.warning("%s rejected %s, dropped: %s", self.name, self._describe(op), exc)
                return _DROPPED
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                logger.warning("%s unreachable (%s); keeping %d operation(s) queued and "
                               "retrying", self.target, exc, len(self._ops))
            else:
                logger.debug("%s retry failed: %s", self.name, exc)
            return _RETRY
        if self._outage_since is not None:
            logger.warning("%s reachable again after %.0fs; sending queued data", self.target,
                           time.monotonic() - self._outage_since)
            self._outage_since = None
        return _SENT
