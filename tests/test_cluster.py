"""Scale out: the search submitted with ``ray job submit`` to a real Ray cluster, results in a
real MLflow server.

Every process is real and started here: ``ray start --head`` / ``ray start --address`` (each in
its own process group, every port chosen free, bound to this machine), ``mlflow server``
(conftest), ``ray job submit``, ``experiments/search.py``. Teardown kills each process group by
its id, also when a test fails; ``ray stop`` is never used (it would stop every Ray on the
machine). The cluster runs with token auth (``RAY_AUTH_MODE=token`` and a per-run
``RAY_AUTH_TOKEN``, never written to ``~/.ray``), like the documented setup.

Skip locally with ``-m 'not cluster'``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO_ROOT, free_port

from coatnet.search import cluster
from coatnet.search.errors import SearchInputError
from coatnet.search.faults import FAULTS_ENV

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.cluster

VENV_BIN = Path(sys.executable).parent
RAY_BIN = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else "ray"
NODE_START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 240.0

SPACE = """\
data:
  dataset: synthetic
  image_size: 32
  num_samples: 256
  num_classes: 4
  image_channel: 3
trial:
  epochs: 2
  max_failures: 0
search:
  num_samples: {num_samples}
  seed: 5
  searcher: random
  asha: {{grace_period: 2, reduction_factor: 2}}
model:
  layout: {{type: categorical, choices: [CCTT, CCCC]}}
  depth: {{s0: 1, s1: 1, s2: 1, s3: 1, s4: 1}}
  channels: {{s0: 8, s1: 16, s2: 16, s3: 32, s4: 32}}
  expand_scale: 2
  head_dim: 16
  path_dropout: 0.0
train:
  lr: {{type: categorical, choices: [0.003, 0.01]}}
  weight_decay: 0.01
  label_smoothing: 0.0
  batch_size: 64
  warmup_epochs: 1
"""


# --------------------------------------------------------------------------- processes


def kill_group(proc: subprocess.Popen, *, name: str) -> None:
    """SIGTERM, then SIGKILL, the process group led by ``proc`` (start_new_session=True)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            logger.info("%s (pid %d) still up after %s", name, proc.pid, sig.name)
    # ray start's children (raylet, gcs_server, workers) share the group: make sure they are gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RayNode:
    """One ``ray start --block`` process group; head or worker, all ports picked free."""

    def __init__(self, *, env: Mapping[str, str], num_cpus: int, head_address: str | None = None,
                 log_dir: Path) -> None:
        self.env = dict(env)
        self.num_cpus = num_cpus
        self.head_address = head_address
        # unix socket paths live under it and must stay < 107 chars: /tmp/csr-XXXXXXXX
        self.temp_dir = Path(tempfile.mkdtemp(prefix="csr-", dir="/tmp"))
        self.log_path = log_dir / f"ray-{'head' if head_address is None else 'worker'}-" \
                                  f"{uuid.uuid4().hex[:6]}.log"
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def command(self) -> list[str]:
        cmd = [RAY_BIN, "start", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus),
               "--num-gpus", "0", "--temp-dir", str(self.temp_dir),
               # defaults are fixed ports (52365, 10001, 10002-19999) that other Ray
               # instances on this machine may hold
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--min-worker-port", "0", "--max-worker-port", "0"]
        if self.head_address is None:
            cmd += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port),
                    "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.head_address]
        return cmd

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.temp_dir,
                                         start_new_session=True)
        finally:
            log.close()

    def wait_until_exited_early(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_group(proc, name="ray start")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


class LocalRayCluster:
    """A head node (+ optional workers) and the helpers to talk to its dashboard."""

    def __init__(self, root: Path, *, head_cpus: int) -> None:
        self.root = root
        self.token = secrets.token_hex(32)
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI",
                    "RAY_AUTH_TOKEN_PATH", cluster.SHARED_STORAGE_ENV, "PYTHONPATH"):
            env.pop(key, None)
        # the job entrypoint says `python`: it must be this environment's interpreter
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0"})
        self.env = env
        self.head = RayNode(env=env, num_cpus=head_cpus, log_dir=root)
        self.workers: list[RayNode] = []

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        self.head.start()
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.head.wait_until_exited_early()
            try:
                resp = requests.get(f"{self.head.dashboard_url}/api/jobs/", timeout=2,
                                    headers=self.headers)
                if resp.status_code == 200 and self._job_agent_ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"Ray head not ready after {NODE_START_TIMEOUT_S}s:\n"
                           f"{self.head.log_tail()}")

    def _job_agent_ready(self) -> bool:
        """The head's dashboard agent registered (else submit answers 'No available agent')."""
        nodes = self.nodes()
        return bool(nodes) and all(n.get("state") == "ALIVE" for n in nodes)

    def nodes(self) -> list[dict]:
        resp = requests.get(f"{self.head.dashboard_url}/api/v0/nodes", timeout=5,
                            headers=self.headers, params={"detail": "1"})
        resp.raise_for_status()
        return resp.json()["data"]["result"]["result"]

    def add_worker(self, *, num_cpus: int) -> RayNode:
        node = RayNode(env=self.env, num_cpus=num_cpus, head_address=self.head.gcs_address,
                       log_dir=self.root)
        self.workers.append(node)
        node.start()
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            node.wait_until_exited_early()
            alive = [n for n in self.nodes() if n.get("state") == "ALIVE"]
            if len(alive) == 1 + len(self.workers):
                return node
            time.sleep(1.0)
        raise RuntimeError(f"worker node did not join after {NODE_START_TIMEOUT_S}s:\n"
                           f"{node.log_tail()}")

    def alive_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() if n.get("state") == "ALIVE"}

    def stop(self) -> None:
        for node in [*self.workers, self.head]:
            node.stop()

    # ---- jobs

    def submit(self, *, entrypoint: list[str], runtime_env: Path, working_dir: Path,
               extra_env: Mapping[str, str] | None = None) -> tuple[str, str]:
        """``ray job submit --no-wait``; returns (submission id, the CLI's output)."""
        submission_id = f"coatnet-{uuid.uuid4().hex[:10]}"
        cmd = [RAY_BIN, "job", "submit", "--address", self.head.dashboard_url,
               "--submission-id", submission_id, "--working-dir", str(working_dir),
               "--runtime-env", str(runtime_env), "--no-wait", "--", *entrypoint]
        env = dict(self.env, **(extra_env or {}))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                              cwd=self.root)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"ray job submit failed:\n{output}"
        return submission_id, output

    def wait_job(self, submission_id: str, *, timeout_s: float = JOB_TIMEOUT_S) -> str:
        """Poll the job until it ends; stop it (and fail) when it runs past ``timeout_s``."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.head.dashboard_url, headers=self.headers)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = client.get_job_status(submission_id)
            if status.is_terminal():
                return str(status.value if isinstance(status, JobStatus) else status)
            time.sleep(2.0)
        client.stop_job(submission_id)
        pytest.fail(f"job {submission_id} still running after {timeout_s}s:\n"
                    f"{self.job_logs(submission_id)[-6000:]}")

    def job_logs(self, submission_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.head.dashboard_url,
                                   headers=self.headers).get_job_logs(submission_id)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    """A real 2-CPU Ray head for the module; workers join on demand; all killed at the end."""
    test_cluster = LocalRayCluster(tmp_path_factory.mktemp("ray_cluster"), head_cpus=2)
    try:
        test_cluster.start()
        yield test_cluster
    finally:
        test_cluster.stop()


@pytest.fixture(scope="module")
def two_nodes(ray_cluster: LocalRayCluster) -> LocalRayCluster:
    """The head plus a second node (``ray start --address``) with 1 CPU."""
    if not ray_cluster.workers:
        ray_cluster.add_worker(num_cpus=1)
    return ray_cluster


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    """A tiny space on a path every node (one machine) can read."""
    path = tmp_path / "tiny_cluster.yaml"
    path.write_text(SPACE.format(num_samples=3))
    return path


def search_entrypoint(space: Path, *, storage: Path | str, name: str, experiment: str,
                      mlflow_uri: str | None = None) -> list[str]:
    cmd = ["python", "experiments/search.py", "--space", str(space), "--storage-path",
           str(storage), "--name", name, "--experiment-name", experiment]
    return cmd + (["--mlflow-uri", mlflow_uri] if mlflow_uri else [])


def runs_of(uri: str, experiment: str) -> tuple[dict, list[dict]]:
    """(parent run, child runs) of an experiment, read over MLflow's REST API."""
    base = f"{uri}/api/2.0/mlflow"
    exp = requests.get(f"{base}/experiments/get-by-name", params={"experiment_name": experiment},
                       timeout=10)
    exp.raise_for_status()
    exp_id = exp.json()["experiment"]["experiment_id"]
    resp = requests.post(f"{base}/runs/search", json={"experiment_ids": [exp_id],
                                                      "max_results": 1000}, timeout=10)
    resp.raise_for_status()
    runs = resp.json().get("runs", [])

    def tags(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parents = [r for r in runs if tags(r).get("role") == "search"]
    assert len(parents) == 1, f"expected one parent run, got {len(parents)}"
    parent = parents[0]
    children = [r for r in runs
                if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    for run in [parent, *children]:
        run["tags"] = tags(run)
    return parent, children


def uploaded_package(output: str, head: RayNode) -> Path:
    """The head node's unpacked copy of the working-dir package ``ray job submit`` uploaded."""
    match = re.search(r"Uploading package gcs://(_ray_pkg_[0-9a-f]+)\.zip", output)
    assert match, f"no package upload in the submit output:\n{output}"
    found = list(head.temp_dir.glob(f"session_*/runtime_resources/working_dir_files/"
                                    f"{match.group(1)}"))
    assert found, f"package {match.group(1)} not unpacked under {head.temp_dir}"
    return found[0]


# --------------------------------------------------------------------------- tests: real cluster


def test_submitted_search_succeeds_and_logs_every_trial(ray_cluster: LocalRayCluster,
                                                        mlflow_server: str, space_file: Path,
                                                        tmp_path: Path) -> None:
    experiment = f"cluster-1node-{uuid.uuid4().hex[:6]}"
    submission_id, output = ray_cluster.submit(
        entrypoint=search_entrypoint(space_file, storage=tmp_path / "runs", name="one-node",
                                     experiment=experiment, mlflow_uri=mlflow_server),
        runtime_env=REPO_ROOT / "runtime_env.yaml", working_dir=REPO_ROOT)
    status = ray_cluster.wait_job(submission_id)
    logs = ray_cluster.job_logs(submission_id)
    assert status == "SUCCEEDED", logs[-6000:]

    package = uploaded_package(output, ray_cluster.head)  # code only: no .git, .venv, runs
    files = [p for p in package.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1 << 20
    top = {p.relative_to(package).parts[0] for p in files}
    assert {"coatnet", "experiments", "search_spaces"} <= top
    assert not top & {".git", ".venv", "mlruns", "ray_results", "data", "tests", "mlflow.db"}
    assert "up to 2 at once" in logs  # max_concurrent_trials from the head's 2 CPUs

    parent, children = runs_of(mlflow_server, experiment)
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == 3
    assert all(c["info"]["status"] == "FINISHED" for c in children)
    assert {c["tags"]["node"] for c in children} <= ray_cluster.alive_node_ids()
    assert all(c["tags"].get("device") == "cpu" for c in children)
    assert (tmp_path / "runs" / "one-node" / "leaderboard.csv").is_file()


def test_upload_leaves_out_history_environments_and_results(tmp_path: Path) -> None:
    """The package ``ray job submit --working-dir .`` builds, with this repo's ignore files."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((REPO_ROOT / "runtime_env.yaml").read_text())["excludes"]
    target = tmp_path / "pkg.zip"
    create_package(str(REPO_ROOT), target, include_gitignore=True, excludes=excludes)
    names = zipfile.ZipFile(target).namelist()
    assert "experiments/search.py" in names and "coatnet/search/runner.py" in names
    assert "runtime_env.yaml" in names
    assert "coatnet/search/data/__init__.py" in names  # a package, not a dataset folder
    banned = (".git/", ".venv/", "mlruns/", "ray_results/", "__pycache__/", "tests/")
    assert not [n for n in names if any(n.startswith(b) or f"/{b}" in n for b in banned)]
    assert not [n for n in names if n.startswith(("data/", "datasets/"))]  # datasets at the top
    assert target.stat().st_size < 1 << 20


def test_unreachable_mlflow_fails_the_job_before_any_trial(ray_cluster: LocalRayCluster,
                                                          space_file: Path,
                                                          tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    submission_id, _ = ray_cluster.submit(
        entrypoint=search_entrypoint(space_file, storage=tmp_path / "runs", name="no-mlflow",
                                     experiment="never", mlflow_uri=uri),
        runtime_env=REPO_ROOT / "runtime_env.yaml", working_dir=REPO_ROOT)
    assert ray_cluster.wait_job(submission_id, timeout_s=120) == "FAILED"
    logs = ray_cluster.job_logs(submission_id)
    assert f"MLflow tracking server at {uri} is not reachable" in logs, logs[-4000:]
    assert "at once" not in logs  # the Tuner never started
    assert not (tmp_path / "runs").exists()


def test_local_storage_with_two_nodes_is_refused(two_nodes: LocalRayCluster,
                                                 mlflow_server: str, space_file: Path,
                                                 tmp_path: Path) -> None:
    experiment = f"cluster-refused-{uuid.uuid4().hex[:6]}"
    submission_id, _ = two_nodes.submit(
        entrypoint=search_entrypoint(space_file, storage=tmp_path / "runs", name="refused",
                                     experiment=experiment, mlflow_uri=mlflow_server),
        runtime_env=REPO_ROOT / "runtime_env.yaml", working_dir=REPO_ROOT)
    assert two_nodes.wait_job(submission_id, timeout_s=120) == "FAILED"
    logs = two_nodes.job_logs(submission_id)
    assert "the Ray cluster has 2 nodes" in logs and "head-node syncing" in logs, logs[-4000:]
    assert cluster.SHARED_STORAGE_ENV in logs
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_trials_run_on_both_nodes(two_nodes: LocalRayCluster, mlflow_server: str,
                                  tmp_path: Path) -> None:
    space = tmp_path / "tiny4.yaml"
    space.write_text(SPACE.format(num_samples=4))
    experiment = f"cluster-2node-{uuid.uuid4().hex[:6]}"
    # the shipped runtime env, with the storage declared shared (on one machine any path is)
    # and MLflow given through MLFLOW_TRACKING_URI instead of --mlflow-uri
    runtime_env = yaml.safe_load((REPO_ROOT / "runtime_env.yaml").read_text())
    # Each epoch sleeps 2 s, so the 3 trial slots are all busy at once and the third trial
    # lands on the second node (otherwise fast trials can all run on the head's 2 CPUs).
    slow = json.dumps({"sleep_per_epoch_s": 2.0}, separators=(",", ":"))
    runtime_env["env_vars"].update({cluster.SHARED_STORAGE_ENV: "1",
                                    "MLFLOW_TRACKING_URI": mlflow_server, FAULTS_ENV: slow})
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    submission_id, _ = two_nodes.submit(
        entrypoint=search_entrypoint(space, storage=tmp_path / "runs", name="two-nodes",
                                     experiment=experiment),
        runtime_env=env_file, working_dir=REPO_ROOT)
    status = two_nodes.wait_job(submission_id)
    logs = two_nodes.job_logs(submission_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "up to 3 at once" in logs  # 2 + 1 CPUs

    parent, children = runs_of(mlflow_server, experiment)
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == 4
    nodes = {c["tags"]["node"] for c in children}
    assert nodes == two_nodes.alive_node_ids(), (nodes, logs[-4000:])


def test_unreachable_address_fails_in_seconds(space_file: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "search.py"),
                           "--space", str(space_file), "--address", address],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert address in proc.stderr and "ray start --head" in proc.stderr
    assert elapsed < 60  # imports dominate; ray.init alone would retry for minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_cluster.yaml"]


# --------------------------------------------------------------------------- tests: the checks


def test_address_forms() -> None:
    assert cluster.gcs_endpoint("10.0.0.1:6380") == ("10.0.0.1", 6380)
    assert cluster.gcs_endpoint("head") == ("head", 6379)
    assert cluster.gcs_endpoint("ray://head") == ("head", 10001)
    assert cluster.gcs_endpoint("auto") is None
    with pytest.raises(SearchInputError, match="ray job submit --address"):
        cluster.gcs_endpoint("http://head:8265")


def test_storage_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.SHARED_STORAGE_ENV, raising=False)
    local = tmp_path / "runs"
    cluster.check_storage(raw=str(local), local_root=local, alive_nodes=1)
    cluster.check_storage(raw="s3://bucket/x", local_root=tmp_path, alive_nodes=3)
    with pytest.raises(SearchInputError, match="has 2 nodes"):
        cluster.check_storage(raw=str(local), local_root=local, alive_nodes=2)
    cluster.check_storage(raw=str(local), local_root=local, alive_nodes=2, shared=True)
    monkeypatch.setenv(cluster.SHARED_STORAGE_ENV, "1")
    cluster.check_storage(raw=str(local), local_root=local, alive_nodes=2)


def test_remote_storage_keeps_driver_state_locally(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from coatnet.search.runner import SearchOptions, plan_search

    monkeypatch.setenv(cluster.STATE_DIR_ENV, str(tmp_path / "state"))
    space = tmp_path / "s.yaml"
    space.write_text(SPACE.format(num_samples=2))
    plan = plan_search(SearchOptions(space=space, storage_path="s3://bucket/coat/net",
                                     name="x", mlflow_uri="http://127.0.0.1:1"))
    assert plan.experiment_dir == tmp_path / "state" / "s3" / "bucket" / "coat" / "net" / "x"
    assert cluster.tune_storage_path("s3://bucket/coat/net/", local_root=plan.storage_path) \
        == "s3://bucket/coat/net"
    assert cluster.local_storage_path("file:///tmp/a") == Path("/tmp/a")
    assert not list(tmp_path.joinpath("state").glob("**/*"))  # planning creates nothing


def test_concurrency_from_cluster_resources() -> None:
    cpu_trial = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1}
    assert cluster.default_concurrency(cpu_trial, {"CPU": 3.0}) == 3
    gpu_trial = {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4}
    assert cluster.default_concurrency(gpu_trial, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert cluster.default_concurrency(gpu_trial, {"CPU": 64.0}) == 1


def test_job_runtime_env_wins_over_driver_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cluster.RAY_JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"env_vars": {"A": "job"}}, "metadata": {}}))
    assert cluster.driver_runtime_env({"A": "driver", "B": "driver"}) == \
        {"env_vars": {"B": "driver"}}


def test_resume_finds_a_space_across_job_uploads() -> None:
    first = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0a1b/spaces/a.yaml"
    again = "/tmp/csr-x/session_2/runtime_resources/working_dir_files/_ray_pkg_ff00/spaces/a.yaml"
    assert cluster.space_key(first) == cluster.space_key(again) == "spaces/a.yaml"
    assert cluster.space_key("/home/me/spaces/a.yaml") == "/home/me/spaces/a.yaml"


def test_relative_storage_inside_a_job_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In a job the cwd is Ray's temporary copy of --working-dir: results there get lost."""
    job_dir = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0a1b"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv(cluster.RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    with pytest.raises(SearchInputError, match="temporary copy of the job's --working-dir"):
        cluster.check_storage(raw=None, local_root=job_dir / "ray_results", alive_nodes=1)
    cluster.check_storage(raw=str(tmp_path / "runs"), local_root=tmp_path / "runs",
                          alive_nodes=1)
