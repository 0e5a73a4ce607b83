"""Helpers for benchmarks/gpu_check.sh (standard library only, so it runs before the site exists).

    python gpu_check_env.py deps SITE [FALLBACK_DIR]   # Requires-Dist of SITE vs this interpreter
    python gpu_check_env.py imports                    # import everything the search needs
    python gpu_check_env.py trials EXPERIMENT_DIR      # device / images/s of each trial
    python gpu_check_env.py debug EXPERIMENT_DIR OUT   # error.txt files + Ray log tails

``deps`` compares every requirement of the distributions unpacked in SITE with what SITE and the
image provide; an unmet one is fixed from a wheel in FALLBACK_DIR when one fits (unzipped into
SITE), and anything still unmet is printed (a warning: the import check decides).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import sys
import time
import traceback
import warnings
import zipfile
from pathlib import Path

import harness  # standard library only at import, like this script

# extras that the project installs (pyproject: ray[default,tune,train])
EXTRAS = {"ray": {"default", "tune", "train"}}

# Requirements that .whl/site.tar.xz leaves out on purpose: nothing the search runs imports them.
DROPPED = {"virtualenv": "Ray runtime_env pip/uv/conda only", "py-spy": "dashboard stack dumps only"}

# What the search and the benchmark import, including what Ray's dashboard and agents need
# (they run as separate processes, so a missing package there would not show in the driver).
MODULES = [
    "torch", "torchvision", "timm", "numpy", "sklearn", "yaml", "pydantic", "pydantic_core",
    "annotated_types", "typing_inspection",
    "ray", "ray.tune", "ray.train", "ray.train.torch", "ray.tune.search.optuna",
    "ray.tune.schedulers", "ray.util.queue", "ray.air", "ray.data",
    "ray.dashboard.dashboard", "ray.dashboard.agent", "ray.dashboard.modules.reporter.reporter_agent",
    "ray._private.runtime_env.agent.main", "ray._private.prometheus_exporter",
    "aiohttp", "aiohttp_cors", "colorful", "opencensus", "opencensus.stats.stats",
    "opentelemetry.exporter.prometheus", "prometheus_client", "smart_open", "jsonschema",
    "grpc", "msgpack", "pyarrow", "pandas",
    "optuna", "sqlalchemy", "alembic", "colorlog",
    "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
    "coatnet", "coatnet.search.space", "coatnet.search.runner", "coatnet.search.tracking",
    "coatnet.search.trial", "coatnet.search.train_loop",
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dists(paths: list[str]) -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions(path=paths):
        name = dist.metadata["Name"]
        if name and _norm(name) not in found:
            found[_norm(name)] = dist
    return found


def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return _norm(name), version


def _unzip_wheel(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            target = site / info.filename
            if info.filename.split("/", 1)[0].endswith(".data"):
                continue  # scripts/headers; the fallback wheels have none that matter
            zf.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode)


def cmd_deps(site: Path, fallback: Path | None) -> int:
    try:
        from packaging.requirements import Requirement
    except ImportError:
        print("deps: 'packaging' is not importable; skipping the requirement check")
        return 0
    site_s = str(site.resolve())
    image_paths = [p for p in sys.path if p and not os.path.realpath(p).startswith(site_s)]
    image = _dists(image_paths)
    wheels = {}
    if fallback and fallback.is_dir():
        for whl in sorted(fallback.glob("*.whl")):
            wheels[_wheel_name(whl)[0]] = whl
    env = {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    used: list[str] = []
    for _ in range(10):  # a fallback wheel brings requirements of its own: repeat to a fixpoint
        carried = _dists([site_s])
        problems: list[tuple[str, str, str, str]] = []
        for key, dist in sorted(carried.items()):
            extras = EXTRAS.get(key, set()) | {""}
            for line in dist.requires or []:
                req = Requirement(line)
                if req.marker and not any(req.marker.evaluate({**env, "extra": e})
                                          for e in extras):
                    continue
                dep = _norm(req.name)
                have = carried.get(dep) or image.get(dep)
                version = have.version if have else None
                if version is not None and (not req.specifier or
                                            req.specifier.contains(version, prereleases=True)):
                    continue
                problems.append((dist.metadata["Name"], str(req), dep, version or "missing"))
        fixed = False
        for owner, req, dep, version in problems:
            whl = wheels.get(dep)
            if whl is None or dep in used:
                continue
            if not Requirement(req).specifier.contains(_wheel_name(whl)[1], prereleases=True):
                continue
            print(f"deps: {owner} needs {req}, the image has {version}: unpacking {whl.name}")
            _unzip_wheel(whl, site)
            used.append(dep)
            fixed = True
        if not fixed:
            break
    for owner, req, dep, version in problems:
        if dep in DROPPED and version == "missing":
            print(f"deps: {owner} needs {req}; not carried on purpose ({DROPPED[dep]})")
        else:
            print(f"deps: WARNING {owner} needs {req}; found {version}")
    print(f"deps: {len(_dists([site_s]))} carried distributions, {len(problems)} unmet "
          f"requirement(s), fallback wheels used: {', '.join(used) or 'none'}")
    return 0


def cmd_imports() -> int:
    failed: list[str] = []
    missing: set[str] = set()
    for name in MODULES:
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - report everything, keep going
            failed.append(name)
            if isinstance(exc, ModuleNotFoundError) and exc.name:
                missing.add(exc.name.split(".")[0])
            print(f"imports: FAIL {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=-3)
            continue
        if "." not in name:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                version = getattr(module, "__version__", "")
            origin = getattr(module, "__file__", "") or ""
            print(f"imports: ok   {name:20s} {str(version):22s} "
                  f"{time.perf_counter() - start:5.1f}s  {origin}")
    if failed:
        print(f"imports: {len(failed)} FAILED: {' '.join(failed)}")
        if missing:
            print(f"imports: MISSING top-level modules: {' '.join(sorted(missing))}")
        return 1
    print(f"imports: all {len(MODULES)} modules import")
    return 0


def _last_result(trial_dir: Path) -> dict:
    path = trial_dir / "result.json"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def cmd_trials(experiment: Path) -> int:
    rows = []
    for trial_dir in sorted(p for p in experiment.glob("trial_*") if p.is_dir()):
        last = _last_result(trial_dir)
        rows.append((trial_dir.name, str(last.get("device", "-")), last.get("epochs_done", "-"),
                     last.get("val_accuracy", "-"), last.get("images_per_s", "-"),
                     last.get("epoch_time_s", "-"), (trial_dir / "error.txt").exists()))
    print("\n".join(harness.table("trial", "device", "epochs_done", "val_accuracy",
                                  "images_per_s", "epoch_time_s", "error")))
    for row in rows:
        print(harness.row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row)))
    cuda = [r for r in rows if r[1].startswith("cuda")]
    print(f"trials: {len(rows)} with results, {len(cuda)} trained on cuda")
    return 0 if rows else 1


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text[-lines:])


def cmd_debug(experiment: Path, out: Path) -> int:
    parts = []
    for err in sorted(experiment.rglob("error.txt")) if experiment.exists() else []:
        parts.append(f"===== {err}\n{_tail(err, 80)}")
    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "session_latest", "logs")
    if logs.is_dir():
        for log in sorted(logs.iterdir()):
            if not log.is_file():
                continue
            text = log.read_text(errors="replace")
            if log.suffix == ".err" and ("Traceback" in text or "Error" in text) \
                    or log.name in ("raylet.out", "gcs_server.err", "dashboard.err",
                                    "dashboard_agent.log", "runtime_env_agent.err"):
                parts.append(f"===== {log}\n{_tail(log, 60)}")
    text = "\n\n".join(parts) or "(no error.txt and no Ray logs found)"
    out.write_text(text[-2_000_000:])
    print(f"debug: {len(parts)} file excerpt(s) written to {out}")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "deps":
        return cmd_deps(Path(args[0]), Path(args[1]) if len(args) > 1 else None)
    if cmd == "imports":
        return cmd_imports()
    if cmd == "trials":
        return cmd_trials(Path(args[0]))
    if cmd == "debug":
        return cmd_debug(Path(args[0]), Path(args[1]))
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
