"""The exceptions a user of the search meets, and the exit code each one maps to.

The CLI's exit-code table lives here and nowhere else (``EXIT_CODES``, ``exit_code_for``).
Every module raises these instead of defining its own, so no module imports the runner (or any
other layer) just for an exception. This module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_NO_RESULT = 1  # the search ran but no trial produced a result
EXIT_BAD_INPUT = 2  # nothing was started or created
EXIT_TRACKING_UNDELIVERED = 3  # done, but MLflow data is still on disk (sync_mlflow.py sends it)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT: the state is saved, --resume continues

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_NO_RESULT: "the search failed (no trial produced a result)",
    EXIT_BAD_INPUT: "bad input (nothing was started or created)",
    EXIT_TRACKING_UNDELIVERED: "done, but some MLflow data never reached the server (kept on "
                               "disk; `python experiments/sync_mlflow.py EXPERIMENT_DIR` sends it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): the state is saved and the printed command (the "
                      "same --name, or --resume) continues the search",
}


class SearchError(Exception):
    """Base of the errors the CLI turns into a one-line message and an exit code."""

    exit_code = EXIT_NO_RESULT


class SearchInputError(SearchError, ValueError):
    """Bad command-line input (found before any compute is spent)."""

    exit_code = EXIT_BAD_INPUT


class SpaceError(SearchInputError):
    """A space file is invalid; ``problems`` holds one ``<file>: <key.path>: <why>`` per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SearchAlreadyRunning(SearchInputError):
    """Another driver holds this experiment's lock (``coatnet.search.lock``); nothing changed."""


class DataNotFoundError(SearchInputError):
    """The dataset files are not where the config says (bad input, a ``ValueError``)."""


class TrackingServerUnavailable(SearchError, RuntimeError):
    """The MLflow tracking server could not be reached before the search started."""

    exit_code = EXIT_BAD_INPUT


class SearchInterrupted(SearchError, RuntimeError):
    """The search was stopped (Ctrl-C / SIGINT) with trials unfinished; its state is saved and
    the same ``--name`` (or ``--resume``) continues it."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, *, name: str, experiment_dir: Path, space: Path,
                 storage_path: str | None) -> None:
        self.name, self.experiment_dir, self.space = name, experiment_dir, space
        storage = f" --storage-path {storage_path}" if storage_path else ""
        self.resume_command = (f"python experiments/search.py --space {space} --name {name}"
                               f"{storage} --resume")
        super().__init__(f"search {name!r} interrupted; its state is saved in {experiment_dir}. "
                         f"Continue it with:\n    {self.resume_command}")


def exit_code_for(error: BaseException) -> int | None:
    """The CLI exit code for ``error``, or None when it is not a user-facing error (a bug:
    let the traceback show). A missing file named on the command line is bad input too."""
    if isinstance(error, SearchError):
        return error.exit_code
    if isinstance(error, FileNotFoundError):
        return EXIT_BAD_INPUT
    return None
