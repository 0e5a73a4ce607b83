"""Which MLflow tracking server a search uses, and whether it answers before the search starts."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from coatnet.search.errors import TrackingServerUnavailable

__all__ = ["check_tracking_server", "resolve_tracking_uri"]


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """--mlflow-uri wins, then MLFLOW_TRACKING_URI, then a SQLite file in the cwd.

    The default is an absolute path so Ray workers and a later resume from another directory
    still hit the same database.
    """
    if cli_uri:
        return cli_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_server(uri: str, *, timeout_s: float = 5) -> None:
    """Fail before any trial starts when an http(s) tracking server is unreachable.

    Otherwise hours of training would run while every log call times out in the background.
    Non-http URIs (sqlite, file) are local and need no check.
    """
    if not _is_http(uri):
        return
    base = uri.rstrip("/")
    problem = ""
    try:
        resp = requests.get(f"{base}/health", timeout=timeout_s)
        if resp.status_code == 200:
            return
        # /health may be hidden behind a proxy; the REST API answering at all is enough.
        resp = requests.get(
            f"{base}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            timeout=timeout_s,
        )
        if resp.status_code in (200, 401, 403):
            return
        problem = f"HTTP {resp.status_code}"
    except requests.RequestException as exc:
        problem = f"{type(exc).__name__}: {exc}"
    raise TrackingServerUnavailable(
        f"MLflow tracking server at {uri} is not reachable ({problem}). Start it, or pass "
        "another --mlflow-uri / MLFLOW_TRACKING_URI, before starting the search."
    )
