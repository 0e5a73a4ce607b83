"""Where Ray's worker output goes: a log file in the experiment directory, not the terminal.

Ray prints every line its workers write (Ray Train's local-mode notes, a "Checkpoint
successfully created" per epoch and trial) on the driver's terminal, through one handler of its
worker-output dispatcher, and keeps doing so after the search's summary. ``route_worker_output``
swaps that handler for one that appends the same lines, with Ray's ``(pid=...)`` prefixes, to a
file (``WORKER_LOG`` in the experiment directory), so the summary is the last thing on screen.
``--verbose`` leaves Ray's handler in place. Nothing here changes what the workers do.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger("coatnet.search")

__all__ = ["WORKER_LOG", "route_worker_output"]

WORKER_LOG = "ray_workers.log"
_RAY_HANDLER = "ray_print_logs"  # the name Ray registers its terminal printer under
_HANDLER = "coatnet_worker_log"


class _FileSink:
    """Appends Ray's worker-output batches to one file, line-buffered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: TextIO | None = None  # opened with the first line: a refused run writes none

    def __call__(self, data: dict[str, Any]) -> None:
        from ray._private.worker import print_worker_logs

        with self._lock:
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = self.path.open("a", encoding="utf-8", buffering=1)
                print_worker_logs(data, _Plain(self._file))
            except Exception:  # noqa: BLE001 - a log line must never stop the search
                pass


class _Plain:
    """A file that drops the terminal colour codes Ray puts around its ``(pid=...)`` prefixes."""

    _CODES = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def write(self, text: str) -> int:
        return self._file.write(self._CODES.sub("", text))

    def flush(self) -> None:
        self._file.flush()

    def isatty(self) -> bool:
        return False


def route_worker_output(path: Path | None) -> bool:
    """Send Ray's worker output to ``path`` (None: leave it on the terminal).

    Call after ``ray.init``. Returns whether the output now goes to the file; False when this
    Ray version has no such dispatcher (the output then stays on the terminal).
    """
    if path is None:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without the dispatcher: nothing to swap
        logger.debug("Ray's worker-output dispatcher not found; worker output stays on screen")
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if _HANDLER in names:
        dispatcher.remove_handler(_HANDLER)
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.add_handler(_HANDLER, _FileSink(Path(path)))
    logger.info("Ray worker output goes to %s (--verbose shows it here)", path)
    return True
