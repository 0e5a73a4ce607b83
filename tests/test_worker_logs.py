"""Ray's worker output goes to the experiment's log file, not the terminal (``worker_logs``)."""

from __future__ import annotations

from pathlib import Path

from coatnet.search.worker_logs import route_worker_output


def test_worker_output_goes_to_the_file_without_colour_codes(ray_local, tmp_path: Path,
                                                              capsys) -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    saved = list(dispatcher.handlers)  # an earlier search in this process may have routed it
    printed: list[dict] = []
    ray_handler = ("ray_print_logs", printed.append)  # what ray.init registers
    path = tmp_path / "experiment" / "ray_workers.log"
    try:
        dispatcher.handlers = [ray_handler]
        assert route_worker_output(None) is False  # --verbose: left as it is
        assert dispatcher.handlers == [ray_handler]
        assert route_worker_output(path) is True
        assert not path.exists()  # opened with the first line only
        assert [n for n, _ in dispatcher.handlers if n == "ray_print_logs"] == []
        dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4242,
                         "task_name": "run_trial", "actor_name": "", "is_err": False,
                         "lines": ["Checkpoint successfully created at: here"]})
        assert route_worker_output(path) is True  # a second driver in the process: one file
        dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4242,
                         "task_name": "run_trial", "actor_name": "", "is_err": True,
                         "lines": ["a warning"]})
    finally:
        dispatcher.handlers = saved
    lines = path.read_text().splitlines()
    assert lines == ["(run_trial pid=4242) Checkpoint successfully created at: here",
                     "(run_trial pid=4242) a warning"], lines
    assert printed == []  # Ray's terminal printer got nothing
    out = capsys.readouterr()
    assert "Checkpoint successfully" not in out.out + out.err
