"""What every benchmark here shares: timing, the machine description and the results file.

The benchmarks are scripts (``python benchmarks/NAME.py``), so this is imported as a sibling
module (``import harness``: the script's own folder is first on ``sys.path``). It owns:

- **timing**: ``timer_median`` (``torch.utils.benchmark.Timer`` on all of torch's threads),
  ``calls_per_second`` (a step run for a wall-clock budget), ``timed_repeats`` (wall times of
  single calls after warm-ups, synchronizing the device), ``interleaved_rounds`` /
  ``rotated`` (every contender once per round, in an order rotated by one each round),
  ``median_ratio`` (the median of per-round ratios), ``summarize`` (median / min / max / sum),
  ``PhaseTimer`` (summed wall time of every call of patched functions), ``run_child`` (a
  measurement in a fresh process of its own) and ``parse_cases`` (the ``side:batch,...``
  option);
- **the machine description**: ``machine`` (the ``Machine:`` line of the torch benchmarks:
  CPU, torch's threads, torch version), ``host`` (host name, usable cores, Python, load
  average), ``versions`` (``ray 2.60.0, optuna 5.0.0, ...``) and ``loadavg``;
- **the results file**: ``Results`` (a title with the date, the command that produced it, the
  machine, then the benchmark's own lines and markdown tables), printed and written to
  ``--out``; ``row`` / ``table`` / ``fmt`` for markdown table rows and cells.

It imports only the standard library at module level (torch when a function needs it), so
``gpu_check_env.py`` can use it before the carried packages are unpacked, and ``--help`` stays
fast.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")

# ------------------------------------------------------------------------------- timing


def timer_median(stmt: str, globals: dict[str, Any], seconds: float) -> float:
    """Median seconds of one run of ``stmt`` by ``Timer.blocked_autorange``, on all threads."""
    import torch
    from torch.utils.benchmark import Timer

    # torch.utils.benchmark.Timer runs on one thread unless told otherwise (results before
    # 2026-11-27 were single-threaded): every timing uses all of torch's threads.
    timer = Timer(stmt, globals=globals, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median


def calls_per_second(step: Callable[[], None], seconds: float, *, warmup: int = 1,
                     min_calls: int = 2) -> float:
    """Calls of ``step`` per wall-clock second, after ``warmup`` untimed calls, for at least
    ``seconds`` and ``min_calls`` calls."""
    for _ in range(warmup):
        step()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < min_calls:
        step()
        calls += 1
    return calls / elapsed


def timed_repeats(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
                  sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of ``repeats`` single calls of ``fn`` after ``warmup`` untimed ones; ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before and after each, so a call's queued device
    work is inside its time."""
    times = []
    for index in range(warmup + repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def rotated(names: Sequence[T], round_index: int) -> list[T]:
    """``names`` rotated by one per round, so no contender always runs first or after another
    (for two contenders: the order flips every round)."""
    shift = round_index % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def interleaved_rounds(names: Sequence[str], rounds: int, measure: Callable[[str], T], *,
                       progress: Callable[[int, dict[str, list[T]]], None] | None = None
                       ) -> dict[str, list[T]]:
    """``measure(name)`` of every name once per round, in ``rotated`` order: on a noisy machine
    the contenders of one round see the same conditions, so per-round ratios hold.
    ``progress(round_index, results)`` runs after each round."""
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(list(names), round_index):
            results[name].append(measure(name))
        if progress is not None:
            progress(round_index, results)
    return results


def median_ratio(values: Iterable[float], baselines: Iterable[float]) -> float:
    """The median of per-round ratios ``value / baseline`` (rounds paired in order)."""
    return statistics.median(v / b for v, b in zip(values, baselines, strict=True))


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    min: float
    max: float
    sum: float


def summarize(values: Iterable[float]) -> Summary | None:
    """Median / min / max / sum of the values; None when there are none."""
    values = list(values)
    if not values:
        return None
    return Summary(len(values), statistics.median(values), min(values), max(values),
                   sum(values))


class PhaseTimer:
    """Sums the wall time (``time.time()``) of every call of the functions it wraps, per label.

    ``wrap(owner, attr, label)`` replaces ``owner.attr`` in this process; a function already
    wrapped (by any PhaseTimer) is left as it is, so repeated set-ups do not nest timers.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        if getattr(original, "_phase_timer", False):
            return

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.time() - t

        timed._phase_timer = True  # type: ignore[attr-defined]
        setattr(owner, attr, timed)

    def clear(self) -> None:
        self.totals.clear()


def run_child(script: str | Path, args: Sequence[str], *, env: dict[str, str] | None = None,
              what: str = "a measurement") -> str:
    """Runs ``python SCRIPT ARGS`` in a fresh process (this interpreter) and returns the last
    line of its stdout; raises with the tail of its stderr when it fails."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"{what} in a child process failed (rc={out.returncode}):\n"
                           f"{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"224:8,64:16"`` -> ``[(224, 8), (64, 16)]`` (image side, batch size)."""
    cases = []
    for case in text.split(","):
        side, batch = (int(v) for v in case.split(":"))
        cases.append((side, batch))
    return cases


# ------------------------------------------------------------------------------- machine


def cpu() -> str:
    return platform.processor() or platform.machine()


def cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def versions(*modules: str) -> str:
    """``"ray 2.60.0, optuna 5.0.0, torch 2.14.1"`` for the named (imported) modules."""
    return ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in modules)


def machine(*, threads: bool = True) -> str:
    """The torch benchmarks' machine: ``x86_64, 2 threads, torch 2.14.1+cu130`` (torch's
    intra-op threads; ``threads=False`` leaves them out)."""
    import torch

    parts = [cpu()]
    if threads:
        parts.append(f"{torch.get_num_threads()} threads")
    return ", ".join([*parts, versions("torch")])


@dataclass(frozen=True)
class Host:
    name: str
    cpu: str
    cores: int
    python: str
    loadavg: tuple[float, float, float]


def host() -> Host:
    """The host now: name, CPU, usable cores, Python version and the load average."""
    return Host(platform.node(), cpu(), cores(), platform.python_version(), os.getloadavg())


def loadavg(values: Sequence[float]) -> str:
    """``"0.73 / 1.75 / 2.33"`` (1 / 5 / 15 min)."""
    return " / ".join(f"{v:.2f}" for v in values)


# ------------------------------------------------------------------------------- results file


def today() -> str:
    return datetime.date.today().isoformat()


def now() -> str:
    """Local time with its UTC offset, to the second: ``2026-11-27T02:19:31+00:00``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def shown_path(path: str | Path) -> str:
    """``path`` as a results file names it: relative to the repo when inside it, else as given
    (a space file in /tmp must not stop a benchmark when it writes its report)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def command(script: str | Path, args: Sequence[str] | None = None) -> str:
    """``python benchmarks/NAME.py ARGS`` (the script relative to the repo; ``args`` default
    to this process's), as the results file records it."""
    return shlex.join(["python", shown_path(script), *(sys.argv[1:] if args is None else args)])


def row(*cells: object) -> str:
    """One markdown table row; an empty cell is written ``| |``."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def table(*columns: str) -> list[str]:
    """A markdown table's header row and separator."""
    return [row(*columns), "|" + "---|" * len(columns)]


def fmt(value: float | None, unit: str = " s", digits: int = 2) -> str:
    """A figure for a table cell: ``1.23 s``, or ``-`` when there is none."""
    return "-" if value is None else f"{value:.{digits}f}{unit}"


class Results:
    """One results file: its header, then the benchmark's lines (prose and tables).

    Two header shapes, as the files under ``results/`` have them:
    ``Results.dated`` -- ``# Title (date)``, ``Command: `...```, ``Machine: ...`` and notes,
    one a line; ``Results.listed`` -- ``# Title`` then ``- command:``, ``- date:``,
    ``- machine:`` and more ``- key: value`` items.
    """

    def __init__(self, header: Sequence[str]) -> None:
        self.lines = list(header)

    @classmethod
    def dated(cls, title: str, *, script: str | Path, machine: str, notes: Sequence[str] = (),
              args: Sequence[str] | None = None) -> Results:
        # two trailing spaces: a markdown line break between the header lines
        lines = [f"Command: `{command(script, args)}`", f"Machine: {machine}", *notes]
        return cls([f"# {title} ({today()})", "",
                    *(line + "  " for line in lines[:-1]), lines[-1], ""])

    @classmethod
    def listed(cls, title: str, *, script: str | Path, args: Sequence[str] | None, date: str,
               machine: str, items: Sequence[str] = ()) -> Results:
        return cls([f"# {title}", "", f"- command: `{command(script, args)}`",
                    f"- date: {date}", f"- machine: {machine}", *(f"- {i}" for i in items),
                    ""])

    def add(self, *lines: str, echo: bool = False) -> None:
        """Appends lines; ``echo`` also prints them now (progress while a benchmark runs)."""
        self.lines += lines
        if echo:
            print("\n".join(lines), flush=True)

    def table(self, *columns: str) -> None:
        self.add(*table(*columns))

    def row(self, *cells: object, echo: bool = False) -> None:
        self.add(row(*cells), echo=echo)

    @property
    def text(self) -> str:
        text = "\n".join(self.lines)
        return text if text.endswith("\n") else text + "\n"

    def write(self, out: Path | None) -> str:
        """Prints the whole file and, with an ``out`` path, writes it there."""
        text = self.text
        print(text)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        return text


def in_process_reporter() -> type:
    """The train loop's ``Reporter`` base for an objective run in this process (plain Optuna,
    the peer these benchmarks compare with): CPU, nothing to resume; subclasses say what
    ``report`` does. Imported late: ``coatnet`` is on ``sys.path`` once a script set it."""
    import torch

    from coatnet.search.reporting import Reporter

    class InProcessReporter(Reporter):
        def device(self, *, use_gpu: bool) -> Any:
            return torch.device("cpu")

        def resume_state(self) -> None:
            return None

    return InProcessReporter
