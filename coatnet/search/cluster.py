"""What changes when the search runs on a Ray cluster instead of an embedded local Ray.

Everything here fails early, with a message that says what to do, because on a cluster the
expensive mistakes are silent ones: ``ray.init`` waits a long time for an address that does not
answer, trials on a second node write checkpoints into a directory the driver never sees (Ray
removed head-node syncing in 2.7), and a relative storage path inside a submitted job lands in
the job's temporary working-dir copy. See docs/cluster.md for the user guide.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from coatnet.search.contracts import TrialSettings
from coatnet.search.errors import SearchInputError

logger = logging.getLogger("coatnet.search")

SHARED_STORAGE_ENV = "COATNET_SHARED_STORAGE"  # "1": the local --storage-path is on every node
STATE_DIR_ENV = "COATNET_STATE_DIR"  # driver-side state of searches with remote storage
DEFAULT_STATE_DIR = Path("~/.cache/coatnet-search")
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job driver
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
CONNECT_TIMEOUT_S = 5.0
STORAGE_PROBE_TIMEOUT_S = 20.0
# Filesystems every node can mount at the same path; a local path on one of them is shared.
SHARED_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
    "glusterfs", "9p", "virtiofs", "wekafs", "orangefs", "juicefs", "alluxio",
})
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- storage paths


def is_remote_uri(raw: str) -> bool:
    """``s3://``, ``gs://``, ``abfs://``... (pyarrow filesystems); ``file://`` is a local path."""
    return "://" in raw and not raw.startswith("file://")


def local_storage_path(raw: str) -> Path:
    """A local (or mounted) storage path, absolute; ``file:///x`` means ``/x``."""
    if raw.startswith("file://"):
        raw = urlparse(raw).path
    return Path(raw).expanduser().resolve()


def state_root_for(uri: str) -> Path:
    """Where the driver keeps a remote-storage search's small state files.

    ``search_state.json``, ``mlflow_runs.json``, the leaderboard and the best config are read
    and rewritten by the driver only, so they live on the driver's disk:
    ``$COATNET_STATE_DIR`` (default ``~/.cache/coatnet-search``) ``/<scheme>/<bucket>/<prefix>``.
    Trials, checkpoints and Tune's own experiment state go to the URI.
    """
    parsed = urlparse(uri)
    if not parsed.scheme or not parsed.netloc:
        raise SearchInputError(f"--storage-path={uri!r}: a storage URI needs a scheme and a "
                               "bucket, e.g. s3://my-bucket/coatnet")
    base = Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser().resolve()
    parts = [p for p in (parsed.netloc + "/" + parsed.path).split("/") if p not in ("", ".", "..")]
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts]
    return base.joinpath(parsed.scheme, *safe)


def check_remote_storage(uri: str, *, timeout_s: float = STORAGE_PROBE_TIMEOUT_S) -> None:
    """Refuse a bucket this machine cannot reach, before Ray starts.

    Tune opens the storage only after Ray is up, and an unreachable bucket then ends in a
    pyarrow traceback (S3 resolves the bucket's region first; GCS retries for minutes). The
    probe opens the filesystem and stats the path in a daemon thread, for at most
    ``timeout_s``; a path that does not exist yet is fine (Tune creates it).
    """
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            import pyarrow.fs

            filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
            filesystem.get_file_info(path)
        except BaseException as err:  # noqa: BLE001 - reported below as bad input
            outcome["error"] = err
        else:
            outcome["error"] = None

    thread = threading.Thread(target=probe, name="storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" in outcome and outcome["error"] is None:
        return
    error = outcome.get("error")
    why = (str(error).strip().splitlines() or [type(error).__name__])[0][:300] \
        if error is not None else f"no answer within {timeout_s:.0f} s"
    raise SearchInputError(
        f"--storage-path {uri}: cannot reach this storage ({why}). Check the bucket name, the "
        "network and the credentials (AWS_* variables, GOOGLE_APPLICATION_CREDENTIALS, ...), "
        "or use a local or mounted path")


def tune_storage_path(raw: str | None, *, local_root: Path) -> str:
    """What ``RunConfig(storage_path=...)`` gets: the URI itself, or the resolved local root."""
    return raw.rstrip("/") if raw and is_remote_uri(raw) else str(local_root)


def declared_shared() -> bool:
    """The user says the local storage path is the same directory on every node."""
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in _TRUE


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (its nearest existing ancestor), Linux only."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    probe_text = str(probe.resolve())
    best, best_type = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = probe_text == mount_point or probe_text.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def is_shared_filesystem(path: Path) -> bool:
    """A network / cluster filesystem (NFS, Lustre, a FUSE bucket mount...)."""
    fs_type = filesystem_type(path) or ""
    return fs_type in SHARED_FS_TYPES or fs_type.startswith("fuse.") or fs_type == "fuse"


def in_submitted_job() -> bool:
    """This driver was started by ``ray job submit`` (Ray's job supervisor sets the job config)."""
    return RAY_JOB_CONFIG_ENV in os.environ


def _job_working_dir() -> Path | None:
    """The job's unpacked ``--working-dir`` copy (Ray starts the driver inside it)."""
    cwd = Path.cwd().resolve()
    if in_submitted_job() and "runtime_resources" in cwd.parts:
        return cwd
    return None


def check_storage(*, raw: str | None, local_root: Path, alive_nodes: int,
                  shared: bool | None = None) -> None:
    """Refuse storage that the cluster's trials and the driver would not all see.

    Since Ray 2.7 nothing copies trial directories from worker nodes to the head: with a plain
    local path on several nodes, checkpoints of trials on other nodes stay there and a resume
    or the leaderboard cannot find them. Remote URIs, network filesystems and paths the user
    declares shared (``COATNET_SHARED_STORAGE=1``) are fine.
    """
    if raw and is_remote_uri(raw):
        return
    job_dir = _job_working_dir()
    if job_dir is not None and (local_root == job_dir or job_dir in local_root.parents):
        raise SearchInputError(
            f"--storage-path={raw or local_root.name!r} resolves to {local_root}, inside the "
            "temporary copy of the job's --working-dir, which Ray deletes later. Pass an "
            "absolute --storage-path on shared storage (a mount every node has) or a bucket "
            "URI such as s3://bucket/coatnet")
    if alive_nodes <= 1:
        return
    if shared is None:
        shared = declared_shared()
    if shared or is_shared_filesystem(local_root):
        return
    fs_type = filesystem_type(local_root) or "unknown"
    raise SearchInputError(
        f"--storage-path={str(local_root)!r} is a local directory ({fs_type} filesystem) "
        f"but the Ray cluster has {alive_nodes} nodes. Ray does not "
        "copy trial results between nodes (head-node syncing was removed in Ray 2.7), so "
        "checkpoints of trials on other nodes would be lost to this driver. Use storage every "
        "node sees: a bucket (--storage-path s3://bucket/coatnet or gs://...), or a shared "
        f"mount at the same path on every node (NFS, Lustre, a FUSE bucket mount); set "
        f"{SHARED_STORAGE_ENV}=1 (e.g. in runtime_env.yaml) if this path is such a mount")


_JOB_PACKAGE = re.compile(r"^.*/working_dir_files/_ray_pkg_[0-9a-f]+/")


def space_key(space_path: str) -> str:
    """A space file's identity across submissions: relative to the job's working dir copy.

    Ray unpacks each ``--working-dir`` upload into ``.../working_dir_files/_ray_pkg_<hash>/``,
    a new directory whenever the code changes, so ``--resume`` compares the path inside it.
    """
    return _JOB_PACKAGE.sub("", space_path)


# --------------------------------------------------------------------------- Ray address


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) a driver connects to for ``address``; None for ``auto`` / ``local``.

    ``host:port`` is a GCS address (``ray start --head`` prints it), ``ray://host:port`` a Ray
    Client server. ``http://host:8265`` is the dashboard / jobs API, which a driver cannot
    connect to: that address belongs to ``ray job submit --address``.
    """
    address = address.strip()
    if address in ("auto", "local", ""):
        return None
    if address.startswith(("http://", "https://")):
        raise SearchInputError(
            f"--address / RAY_ADDRESS={address!r} is the dashboard (jobs API) address: give it "
            "to `ray job submit --address`, and give the search the cluster's GCS address "
            "(HEAD:6379) or nothing when it runs as a Ray job")
    default_port = DEFAULT_GCS_PORT
    if address.startswith("ray://"):
        address, default_port = address[len("ray://"):], DEFAULT_CLIENT_PORT
    elif "://" in address:
        raise SearchInputError(f"--address={address!r}: expected HOST:PORT (the GCS address "
                               "of the head node) or ray://HOST:PORT")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = address, str(default_port)
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        raise SearchInputError(f"--address={address!r}: expected HOST:PORT, e.g. 10.0.0.1:6379")
    return host, int(port_text)


def check_ray_reachable(address: str | None, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds when nothing listens at the cluster address.

    ``ray.init`` retries an unreachable GCS for a long time (about a minute or more) before it
    gives up; one TCP connect tells the user at once.
    """
    if not address:
        return
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        raise SearchInputError(
            f"cannot reach the Ray cluster at {address!r} ({host}:{port}: {err}). Check that "
            "the head node runs (`ray start --head`), that the address is its GCS address "
            "(HEAD:6379 by default) and that the port is open from here; leave --address and "
            "RAY_ADDRESS unset to start a local Ray") from None


def driver_runtime_env(env_vars: Mapping[str, str]) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init``, minus env vars the submitted job already sets.

    Ray refuses to merge a job's runtime env with a driver's one that sets the same env var
    key, so a ``runtime_env.yaml`` that sets e.g. ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` wins.
    """
    taken: set[str] = set()
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if raw:
        try:
            job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
            taken = set(job_env)
        except (ValueError, AttributeError):
            logger.debug("unreadable %s; passing all driver env vars", RAY_JOB_CONFIG_ENV)
    return {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}


def alive_node_count() -> int:
    """Alive nodes of the connected cluster (the head counts)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


# --------------------------------------------------------------------------- concurrency


def default_concurrency(trial: TrialSettings | Mapping[str, Any],
                        resources: Mapping[str, float]) -> int:
    """How many trials fit the cluster at once: GPUs (or CPUs) / what one trial needs.

    A GPU search on a cluster without GPUs still gets 1 (an autoscaler may add GPU nodes) and a
    warning, since its trials wait until a GPU appears.
    """
    from coatnet.search.trial import DRIVER_CPU, IN_PROCESS, execution_mode

    if not isinstance(trial, TrialSettings):
        trial = TrialSettings.from_dict(trial)
    workers = int(trial.num_workers or 1)
    if trial.use_gpu:
        have = float(resources.get("GPU", 0.0))
        if have < workers:
            logger.warning("the Ray cluster has %g GPU(s) but a trial needs %d; trials wait "
                           "until GPU nodes join (autoscaler) or pass --no-gpu", have, workers)
        return max(1, int(have // workers))
    per_trial = workers * float(trial.cpus_per_worker or 1)
    if execution_mode(trial) != IN_PROCESS:
        per_trial += DRIVER_CPU
    return max(1, int(float(resources.get("CPU", 1.0)) // per_trial))
