"""The search-efficiency benchmark's files: its runs file (resume across processes, a clear
error on a cut file) and a rebuilt report keeping its hand-written reading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import efficiency_report  # noqa: E402
import harness  # noqa: E402
from efficiency_runs import RunKey, RunsFile, _commit  # noqa: E402

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "coatnet_small.yaml"
ROWS = [{"t": 1.23456, "trial": "a", "epoch": 1, "status": "running", "val_accuracy": 0.5,
         "test_accuracy": 0.4, "extra": "dropped"}]


def _key(budget: int = 16) -> RunKey:
    return RunKey.of(space=SPACE, budget=budget, epochs=4, concurrency=2,
                     objectives=[("val_accuracy", "max")])


def test_runs_file_keeps_runs_per_key(tmp_path: Path) -> None:
    path = tmp_path / "x.runs.jsonl.gz"
    RunsFile(path, key=_key()).append(method="ours", seed=0, rows=ROWS, wall_s=12.34)
    RunsFile(path, key=_key(budget=32)).append(method="ours", seed=0, rows=ROWS, wall_s=1.0)
    RunsFile(path, key=_key()).append(method="random", seed=1, rows=ROWS, wall_s=5.0)

    done = RunsFile(path, key=_key()).done()  # a later process reads what earlier ones wrote
    assert sorted(done) == [("ours", 0), ("random", 1)]
    rows, wall = done[("ours", 0)]
    assert wall == 12.3 and rows[0]["t"] == 1.235 and "extra" not in rows[0]
    assert list(RunsFile(path, key=_key(budget=32)).done()) == [("ours", 0)]


def test_cut_runs_file_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "x.runs.jsonl.gz"
    RunsFile(path, key=_key()).append(method="ours", seed=0, rows=ROWS * 50, wall_s=1.0)
    one = path.stat().st_size
    RunsFile(path, key=_key()).append(method="ours", seed=1, rows=ROWS * 50, wall_s=1.0)
    data = path.read_bytes()
    path.write_bytes(data[:one + (len(data) - one) // 2])  # the second run cut mid-write

    with pytest.raises(SystemExit, match=r"x\.runs\.jsonl\.gz.*first 1 run.*Move the file away"):
        RunsFile(path, key=_key()).done()


def test_rebuilt_report_keeps_the_reading(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    assert efficiency_report.kept_reading(out) == []
    out.write_text("# T\n\n| a |\n\n## Reading (by hand)\n\n- it means this\n")
    assert efficiency_report.kept_reading(out) == ["", "## Reading (by hand)", "",
                                                   "- it means this"]
    out.write_text("# T\n\n| a |\n")
    assert efficiency_report.kept_reading(out) == []


def test_a_space_outside_the_repo_is_named_as_given(tmp_path: Path) -> None:
    assert harness.shown_path(SPACE) == "search_spaces/coatnet_small.yaml"
    outside = tmp_path / "space.yaml"
    assert harness.shown_path(outside) == str(outside)  # no ValueError after the first seed


def test_a_run_names_its_commit_and_a_changed_tree(tmp_path: Path) -> None:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert _commit(tmp_path) == head  # an untracked file does not change what ran
    (tmp_path / "code.py").write_text("a = 2\n")
    assert _commit(tmp_path) == f"{head}+dirty"
    assert _commit(tmp_path / "missing") is None
