"""Shared fixtures: a real MLflow tracking server and a small local Ray instance.

The server runs in its own process group so teardown can kill it together with the
uvicorn worker and job runner it spawns, even when a test fails half-way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

logger = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServerProcess:
    """A real ``mlflow server`` on 127.0.0.1 backed by SQLite, restartable on the same port/DB."""

    def __init__(self, root: Path, *, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db_path = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        """Start the server and block until GET /health answers 200."""
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_bin) if mlflow_bin.exists() else sys.executable,
            *([] if mlflow_bin.exists() else ["-m", "mlflow"]),
            "server",
            "--backend-store-uri", f"sqlite:///{self.db_path}",
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow server exited early:\n{self._log_tail()}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Kill the whole process group (server, uvicorn worker, job runner)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            # SIGKILL goes to the group even when the leader already exited on SIGTERM,
            # so a straggling worker or job runner cannot outlive the test.
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                # uvicorn waits for idle keep-alive clients on SIGTERM; don't wait with it.
                logger.info("mlflow server pid %d still up after %s", pgid, sig.name)
        # Wait until the port is really free so a restart can bind it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no server log>"


@pytest.fixture
def mlflow_server_factory(tmp_path: Path) -> Iterator[Callable[..., MlflowServerProcess]]:
    """Start extra servers a test controls (stop/restart); all are killed at teardown."""
    servers: list[MlflowServerProcess] = []

    def make(name: str = "mlflow") -> MlflowServerProcess:
        server = MlflowServerProcess(tmp_path / name)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The http URI of a real MLflow server shared by the session (use unique experiment names)."""
    server = MlflowServerProcess(tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start()
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A small local Ray instance (2 CPUs, no dashboard) for the whole session."""
    import ray

    # Workers must import test modules (plain-function trainables) and the repo's packages
    # by name, like the pytest process does; they inherit PYTHONPATH from the raylet.
    old_path = os.environ.get("PYTHONPATH")
    extra = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
    os.environ["PYTHONPATH"] = os.pathsep.join(extra + ([old_path] if old_path else []))
    started = False
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False)
            started = True
        yield
    finally:
        if started:
            ray.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@contextlib.contextmanager
def optuna_dashboard(storage: str, log_path: Path) -> Iterator[str]:
    """A real ``optuna-dashboard`` on ``storage`` at 127.0.0.1, in its own process group; its
    base URL once ``/api/studies`` answers. Killed on exit, also when the test fails."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("optuna-dashboard")), storage,
               "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{base}/api/studies", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"optuna-dashboard did not start: {log_path.read_text()}")
            time.sleep(0.25)
        yield base
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=5)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="session")
def pareto_search(tmp_path_factory, mlflow_server, ray_local):
    """A small accuracy-versus-MACs search (``test_pareto_search.SPACE``) logged to the session's
    MLflow server; its outcome and the server's URI (the browser tests look at it too)."""
    from test_pareto_search import SPACE

    from coatnet.search.runner import SearchOptions, run_search

    directory = tmp_path_factory.mktemp("pareto")
    space = directory / "pareto.yaml"
    space.write_text(SPACE)
    outcome = run_search(SearchOptions(space=space, storage_path=str(directory / "runs"),
                                       mlflow_uri=mlflow_server, name="front",
                                       experiment_name="e2e-pareto"))
    return outcome, mlflow_server
