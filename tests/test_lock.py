"""The experiment's driver lock: a second holder is refused with who holds it; a lock left by a
SIGKILLed driver does not block the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coatnet.search.errors import SearchAlreadyRunning, exit_code_for
from coatnet.search.lock import LOCK_FILE, DriverLock

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from coatnet.search.lock import DriverLock
lock = DriverLock(Path(sys.argv[1]), name="held")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(experiment: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(experiment)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    first = DriverLock(tmp_path / "exp", name="exp")
    first.acquire()
    try:
        with pytest.raises(SearchAlreadyRunning, match=f"pid {os.getpid()}") as err:
            DriverLock(tmp_path / "exp", name="exp").acquire()
        assert "already running" in str(err.value)
        assert exit_code_for(err.value) == 2
    finally:
        first.release()
    with DriverLock(tmp_path / "exp", name="exp"):  # released: free again
        pass


def test_lock_of_a_sigkilled_holder_does_not_block(tmp_path: Path) -> None:
    experiment = tmp_path / "exp"
    child = hold_in_child(experiment)
    try:
        with pytest.raises(SearchAlreadyRunning, match=f"pid {child.pid}"):
            DriverLock(experiment, name="exp").acquire()
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert str(child.pid) in (experiment / LOCK_FILE).read_text()  # the stale record is left
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the flock as the process goes
        try:
            with DriverLock(experiment, name="exp"):
                break
        except SearchAlreadyRunning:
            assert time.monotonic() < deadline, "lock still held after its holder died"
            time.sleep(0.1)
