"""`imbcil check`: preflight checks, so that a sweep fails in seconds rather than an hour in.

A sweep on a cluster depends on things no single machine can see: the tracking store must
answer and accept artifacts, the Ray cluster must answer and have room for a trial, every node
must see the same storage folder and the dataset. `preflight` checks each of them and returns
one `CheckResult` per check; `raise_on_failure` turns the first failure into one line.

The Ray part runs in a child process with a hard time limit: `ray.init` against an address
that is not a Ray head (or a head that wants an auth token) retries for minutes, and a probe
must not hang the command that asked for it. Per node it runs tiny tasks pinned to that node
(NodeAffinitySchedulingStrategy): write a file under the storage path, read every other node's
file back, look for the dataset, log an artifact to the tracking store.

This module imports only the standard library at the top: Ray workers import it to run the
node probes, and must not pay for torch or MLflow unless a probe needs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

from pipeline.names import DEFAULT_STORAGE, PROBE_TAG
from pipeline.runtime import error_line, scoped_env

if TYPE_CHECKING:
    from method.config import DataConfig, RunConfig

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
TRACKING, ARTIFACTS, RAY, STORAGE, DATASET = "tracking store", "artifacts", "ray cluster", "storage", "dataset"

PREFLIGHT_EXPERIMENT = "imbcil-preflight"
PROBE_FOLDER = ".imbcil-preflight"
# The Ray child process as a whole; connecting takes a second or two, the first task on a node
# a few more (a worker process starts, and the artifact probe imports MLflow).
RAY_PROBE_TIMEOUT_S = 90.0
RAY_CONNECT_TIMEOUT_S = 5.0
# ray.init against a port that is not a Ray head retries for minutes; a head answers in seconds.
RAY_CONNECT_STAGE_S = 30.0
_PROBE_MARK = "IMBCIL-PROBE "


class PreflightError(RuntimeError):
    """A preflight check failed; the message is one line naming the check and the problem."""


@dataclass
class CheckResult:
    check: str  # one of TRACKING, ARTIFACTS, RAY, STORAGE, DATASET
    status: str  # OK, FAILED or SKIPPED
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != FAILED


# ---------------------------------------------------------------------------------------------
# The checks


def preflight(
    tracking_uri: str,
    address: Optional[str] = None,
    storage: Optional[str] = None,
    cfg: Optional["RunConfig"] = None,
    *,
    resources_per_trial: Optional[Mapping[str, float]] = None,
    timeout_s: float = 10.0,
    ray_timeout_s: float = RAY_PROBE_TIMEOUT_S,
    dry_run: bool = False,
) -> list[CheckResult]:
    """Check everything a sweep or reproduction needs before it starts; never raises for a failed check.

    - the tracking store answers and its schema is current (a fresh SQLite store is created);
    - an artifact can be written and read back (also from every Ray node, with `address`);
    - with `address`: the Ray cluster answers, and some node fits `resources_per_trial`
      (e.g. {"cpu": 1, "gpu": 0.5}); without it, this machine's CPUs and GPUs are reported;
    - `storage` (a folder, or a URI pyarrow understands) is writable from every node and
      every node sees the files the others wrote;
    - `cfg.data` is found (on every node, with `address`).

    Checks that depend on a failed one are reported as skipped. `dry_run` writes nothing: the
    store is checked without creating its schema, no artifact is written, and the storage
    folder's permissions stand in for a written file.
    """
    from pipeline.tracking import redact_text

    results: list[CheckResult] = []
    tracking_ok = _check_tracking(tracking_uri, timeout_s, results, read_only=dry_run)
    probe = _ArtifactProbe(tracking_uri) if tracking_ok and not dry_run else None
    if probe is not None:
        _check_local_artifacts(probe, results)
    else:
        reason = "dry run: no artifact written" if dry_run else "the tracking store is not usable"
        results.append(CheckResult(ARTIFACTS, SKIPPED, reason))
    storage_root = normalise_storage(storage) if storage else None
    expected_data = _dataset_expectations(cfg.data) if cfg is not None else None
    if dry_run:
        if address:
            report = _probe_cluster({"address": address, "storage": None, "dataset": expected_data, "tracking_uri": None,
                                     "run_id": None, "task_timeout_s": max(10.0, ray_timeout_s - 30)}, ray_timeout_s)  # fmt: skip
            _cluster_results(report, address, resources_per_trial, None, {STORAGE: False, DATASET: expected_data is not None}, results)
        else:
            results.append(_local_resources(resources_per_trial))
            results.append(_dataset_result([_node_probe(None, "", "this machine", expected_data, None, None)]))
        results.append(_storage_writable(storage_root))
        for result in results:
            result.detail = redact_text(result.detail)
        return results

    if address:
        node_artifacts = probe is not None and results[-1].ok
        request = {
            "address": address,
            "storage": storage_root,
            "dataset": expected_data,
            "tracking_uri": tracking_uri if node_artifacts else None,
            "run_id": probe.run_id if node_artifacts else None,
            "task_timeout_s": max(10.0, ray_timeout_s - 30),
        }
        report = _probe_cluster(request, ray_timeout_s)
        wanted = {STORAGE: storage_root is not None, DATASET: expected_data is not None}
        _cluster_results(report, address, resources_per_trial, probe if node_artifacts else None, wanted, results)
    else:
        results.append(_local_resources(resources_per_trial))
        local = _node_probe(storage_root, _token_name("local"), "this machine", expected_data, None, None)
        if storage_root:
            _cleanup_tokens(storage_root, [local["token"]])
        results.append(_storage_result({"reads": []}, [local]))
        results.append(_dataset_result([local]))
    if probe is not None:
        probe.clean()
    for result in results:
        # Library messages may quote a URI with its password.
        result.detail = redact_text(result.detail)
    return results


def raise_on_failure(results: Sequence[CheckResult]) -> None:
    """Raise PreflightError naming the first failed check, in one line."""
    for result in results:
        if result.status == FAILED:
            raise PreflightError(f"preflight: {result.check}: {result.detail}")


def results_table(results: Sequence[CheckResult], title: str = "preflight"):
    """A short rich table: check, status, detail."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    colours = {OK: "green", FAILED: "bold red", SKIPPED: "dim"}
    for result in results:
        table.add_row(result.check, f"[{colours[result.status]}]{result.status}[/]", _escape(result.detail))
    return table


def normalise_storage(storage: str) -> str:
    """A local storage folder as an absolute path (nodes resolve relative paths differently); URIs as given."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().absolute())


# ---------------------------------------------------------------------------------------------
# Tracking and artifacts


def _check_tracking(uri: str, timeout_s: float, results: list[CheckResult], read_only: bool = False) -> bool:
    from pipeline.tracking import TrackingError, _sqlite_path, check_tracking, redact_uri

    try:
        check_tracking(uri, timeout_s=timeout_s, read_only=read_only)
    except TrackingError as exc:
        results.append(CheckResult(TRACKING, FAILED, str(exc)))
        return False
    new_file = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if read_only and new_file is not None and not new_file.exists():
        results.append(CheckResult(TRACKING, OK, f"a new SQLite store would be created at {new_file}"))
        return True  # opening it to read its schema would create it
    results.append(CheckResult(TRACKING, OK, f"{redact_uri(uri)} answers; {_store_version(uri, timeout_s)}"))
    return True


def _storage_writable(storage_root: Optional[str]) -> CheckResult:
    """A dry run's storage check: the folder, or the nearest one that exists, is writable here."""
    if not storage_root:
        return CheckResult(STORAGE, SKIPPED, "no storage path given")
    if "://" in storage_root:
        return CheckResult(STORAGE, SKIPPED, f"dry run: {storage_root} is not written to")
    from pipeline.runtime import unwritable_ancestor

    blocker = unwritable_ancestor(Path(storage_root))
    if blocker is not None:
        return CheckResult(STORAGE, FAILED, f"{storage_root}: {blocker} is not a writable folder")
    return CheckResult(STORAGE, OK, f"{storage_root} can be written here (dry run: nothing written)")


def _store_version(uri: str, timeout_s: float) -> str:
    """The schema revision of a database store, or the MLflow version of a server (best effort)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    try:
        if scheme in ("http", "https"):
            import requests

            reply = requests.get(uri.rstrip("/") + "/version", timeout=timeout_s)
            reply.raise_for_status()
            return f"MLflow server {reply.text.strip()[:40]}"
        if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            import sqlalchemy
            from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
            try:
                found = _get_schema_version(engine)
            finally:
                engine.dispose()
            latest = _get_latest_schema_revision()
            # An outdated schema already failed check_tracking; this names what is there.
            return f"schema {found} (current)" if found == latest else f"schema {found}, this MLflow expects {latest}"
    except Exception:
        pass
    return "schema current"


class _ArtifactProbe:
    """A throwaway run that artifacts are written to and read back from, then deleted.

    One run in the experiment `imbcil-preflight` serves every check: it is soft-deleted after
    the first (so it shows in no run list) and reused by later checks, whose probe files are
    deleted again, so repeated checks leave nothing behind.
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.entities import ViewType
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import experiment_id

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.paths: list[str] = []
        self.error: Optional[str] = None
        self.run_id: Optional[str] = None
        try:
            with _quick_http():
                experiment = experiment_id(self.client, PREFLIGHT_EXPERIMENT)
                found = self.client.search_runs(
                    [experiment], filter_string=f"tags.`{PROBE_TAG}` = 'true'", run_view_type=ViewType.DELETED_ONLY, max_results=1
                )
                if found:
                    self.run_id = found[0].info.run_id
                else:
                    run = self.client.create_run(experiment, tags={PROBE_TAG: "true"}, run_name="artifact-probe")
                    self.run_id = run.info.run_id
                    self.client.delete_run(self.run_id)
                self.artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        except Exception as exc:
            self.error = f"could not open a probe run in experiment {PREFLIGHT_EXPERIMENT!r}: {_reason(exc)}"

    def write_and_read(self, name: str) -> Optional[str]:
        """None if a file written under `name` reads back identical, else why not."""
        payload = f"imbcil preflight {uuid.uuid4().hex}\n"
        path = f"preflight/{name}.txt"
        self.paths.append(path)
        try:
            with _quick_http():
                self.client.log_text(self.run_id, payload, path)
        except Exception as exc:
            return f"could not write {path} to {self.artifact_uri}: {_reason(exc)}"
        return self.read(path, payload)

    def read(self, path: str, expected: str) -> Optional[str]:
        import tempfile

        try:
            with _quick_http(), tempfile.TemporaryDirectory(prefix="imbcil-preflight-") as tmp:
                local = self.client.download_artifacts(self.run_id, path, tmp)
                text = Path(local).read_text()
        except Exception as exc:
            return f"could not read {path} back from {self.artifact_uri}: {_reason(exc)}"
        if text != expected:
            return f"{path} read back from {self.artifact_uri} differs from what was written"
        return None

    def clean(self) -> None:
        """Delete the probe files (where the artifact store can delete; a failure here is harmless)."""
        if not self.paths or self.run_id is None:
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            with _quick_http():
                repository = get_artifact_repository(self.artifact_uri, tracking_uri=self.tracking_uri)
                for path in self.paths:
                    with contextlib.suppress(Exception):
                        repository.delete_artifacts(path)
        except Exception:
            pass
        self.paths = []


def _check_local_artifacts(probe: _ArtifactProbe, results: list[CheckResult]) -> None:
    error = probe.error or probe.write_and_read(f"driver-{uuid.uuid4().hex[:8]}")
    if error:
        results.append(CheckResult(ARTIFACTS, FAILED, error))
    else:
        results.append(CheckResult(ARTIFACTS, OK, f"written and read back at {probe.artifact_uri}"))


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """A probe fails in seconds: no MLflow HTTP retries, a short wait per request."""
    knobs = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with scoped_env(knobs):
        yield


# ---------------------------------------------------------------------------------------------
# Resources, storage and data


def _local_resources(resources_per_trial: Optional[Mapping[str, float]]) -> CheckResult:
    """No --address: the verb starts Ray here, so this machine's CPUs and GPUs are what trials get."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = 0
    with contextlib.suppress(Exception):
        import torch

        gpus = torch.cuda.device_count()
    detail = f"no --address: Ray starts on this machine ({cpus} CPUs, {gpus} GPUs)"
    need = _needs(resources_per_trial)
    if need and (need["CPU"] > cpus or need["GPU"] > gpus):
        return CheckResult(RAY, FAILED, f"a trial asks for {_describe_need(need)}, this machine has {cpus} CPUs and {gpus} GPUs")
    return CheckResult(RAY, OK, detail)


def _needs(resources: Optional[Mapping[str, float]]) -> dict[str, float]:
    if not resources:
        return {}
    lowered = {str(k).lower(): float(v) for k, v in resources.items()}
    return {"CPU": lowered.get("cpu", 0.0), "GPU": lowered.get("gpu", 0.0)}


def _describe_need(need: Mapping[str, float]) -> str:
    return f"{need['CPU']:g} CPU" + (f" + {need['GPU']:g} GPU" if need.get("GPU") else "")


def _token_name(node: str) -> str:
    return f"{node}-{uuid.uuid4().hex[:12]}.txt"


def _storage_fs(storage: str):
    """(pyarrow filesystem, root path) for a local folder or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def _write_token(storage: str, name: str, payload: str) -> Optional[str]:
    try:
        fs, root = _storage_fs(storage)
        folder = f"{root.rstrip('/')}/{PROBE_FOLDER}"
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/{name}") as stream:
            stream.write(payload.encode())
        with fs.open_input_stream(f"{folder}/{name}") as stream:
            if stream.read().decode() != payload:
                return f"{storage}: a file written there reads back different"
    except Exception as exc:
        return f"{storage} is not writable: {_reason(exc)}"
    return None


def _read_tokens(storage: str, tokens: Mapping[str, str]) -> Optional[str]:
    """None if every token file is there with its payload, else which one is missing."""
    try:
        fs, root = _storage_fs(storage)
    except Exception as exc:
        return f"{storage} cannot be opened: {_reason(exc)}"
    for name, payload in tokens.items():
        path = f"{root.rstrip('/')}/{PROBE_FOLDER}/{name}"
        try:
            with fs.open_input_stream(path) as stream:
                if stream.read().decode() == payload:
                    continue
        except Exception:
            pass
        return f"{path} is missing"
    return None


def _cleanup_tokens(storage: str, names: Sequence[str]) -> None:
    with contextlib.suppress(Exception):
        fs, root = _storage_fs(storage)
        folder = f"{root.rstrip('/')}/{PROBE_FOLDER}"
        for name in names:
            with contextlib.suppress(Exception):
                fs.delete_file(f"{folder}/{name}")
        # Removed only when empty: another check may be writing its own files.
        if "://" not in storage:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _dataset_expectations(data: "DataConfig") -> dict[str, Any]:
    """Where `load_raw` will look, as plain data a node can check without importing torch.

    `alternatives`: lists of paths; the dataset is there when every path of one list exists.
    `missing`: what to say when none is complete (the wording of method.data's DataError).
    """
    from method.data import CIFAR_FOLDERS, PARQUET_FILE, no_data_root

    if not data.root:
        return {"root": None, "alternatives": [], "missing": no_data_root(data.dataset), "download": False}
    root = Path(data.root).expanduser().absolute()
    source = data.source
    if source == "auto":
        # resolve_source looks at this machine's disk; a node decides by its own, so keep both.
        source = {"cifar10": "parquet-or-folder", "cifar100": "folder"}.get(data.dataset, "filelist")
    parquet = str(root if root.suffix == ".parquet" else root / PARQUET_FILE)
    folder = root / CIFAR_FOLDERS.get(data.dataset, "")
    batch_files = {
        "cifar10": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
        "cifar100": ["train", "test", "meta"],
    }.get(data.dataset, [])
    folder_paths = [str(folder / name) for name in batch_files]
    if source == "parquet":
        alternatives = [[parquet]]
        missing = (
            f"CIFAR-10 Parquet file not found at {parquet}: point --data-root / IMBCIL_DATA at the folder "
            f"holding {PARQUET_FILE}, or use a cifar-10-batches-py folder (data.source=folder)"
        )
    elif source == "parquet-or-folder":
        alternatives = [[parquet], folder_paths]
        missing = (
            f"CIFAR-10 not found: neither {parquet} nor {folder} exists; point --data-root / IMBCIL_DATA "
            f"at the folder holding {PARQUET_FILE} (or cifar-10-batches-py)"
        )
    elif source == "folder":
        alternatives = [folder_paths]
        missing = (
            f"{data.dataset} folder not found at {folder} (or incomplete): put the extracted python version of the "
            f"dataset there (--data-root / IMBCIL_DATA names its parent), or set data.download=true where the "
            f"internet is reachable"
        )
    else:
        alternatives = [[str(root / "train.txt"), str(root / "test.txt")]]
        missing = f"file lists not found in {root}: --data-root must hold train.txt and test.txt"
    return {
        "root": str(root),
        "alternatives": alternatives,
        "missing": missing,
        # torchvision fetches a missing CIFAR folder itself when the config allows it.
        "download": bool(data.download and source in ("folder", "parquet-or-folder")),
    }


def _find_dataset(expected: Mapping[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(where it was found, None) or (None, why not), checking paths only: no decoding."""
    for paths in expected["alternatives"]:
        if paths and all(os.path.exists(path) for path in paths):
            return (paths[0] if len(paths) == 1 else os.path.dirname(paths[0])), None
    if expected.get("download"):
        return f"{expected['root']} (downloaded on first use: data.download=true)", None
    return None, expected["missing"]


# ---------------------------------------------------------------------------------------------
# What runs on each node (in a Ray worker, or in this process without --address)


def _node_probe(
    storage: Optional[str],
    token: str,
    label: str,
    expected_data: Optional[Mapping[str, Any]],
    tracking_uri: Optional[str],
    run_id: Optional[str],
) -> dict[str, Any]:
    """Write a token file under the storage path, look for the dataset, log one artifact."""
    out: dict[str, Any] = {"label": label, "token": token, "payload": f"{label} {uuid.uuid4().hex}\n"}
    if storage:
        out["storage_root"] = storage
        out["storage"] = _write_token(storage, token, out["payload"])
    if expected_data is not None:
        out["dataset_found"], out["dataset_error"] = _find_dataset(expected_data)
    if tracking_uri and run_id:
        out["artifact_path"] = f"preflight/node-{token.rsplit('.', 1)[0]}.txt"
        out["artifact_error"] = _node_artifact(tracking_uri, run_id, out["artifact_path"], out["payload"])
    return out


def _node_artifact(tracking_uri: str, run_id: str, path: str, payload: str) -> Optional[str]:
    """Log one text artifact from this node; the caller reads it back where it runs."""
    knobs = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    try:
        from mlflow.tracking import MlflowClient

        with scoped_env(knobs):  # a pooled Ray worker: put them back afterwards
            MlflowClient(tracking_uri).log_text(run_id, payload, path)
    except Exception as exc:
        return f"could not write an artifact: {_reason(exc)}"
    return None


def _node_read(storage: str, tokens: Mapping[str, str]) -> Optional[str]:
    return _read_tokens(storage, tokens)


def _node_cleanup(storage: str, names: Sequence[str]) -> None:
    _cleanup_tokens(storage, names)


# ---------------------------------------------------------------------------------------------
# The Ray child process


def _probe_cluster(request: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `_cluster_main` in a child process; its report, or what stage it reached and why it stopped.

    The child gets RAY_CONNECT_STAGE_S to connect and `timeout_s` in all, then it is killed.
    """
    import selectors
    import tempfile

    address = request["address"]
    refused = _tcp_refusal(address)
    if refused:
        return {"stage": "start", "error": refused}
    command = [sys.executable, "-c", "from pipeline.check import _cluster_main; _cluster_main()"]
    report: dict[str, Any] = {"stage": "start"}
    started = time.monotonic()
    timed_out = False
    with tempfile.TemporaryFile(mode="w+") as stderr:
        # stderr to a file: Ray repeats its connection warnings, which could fill a pipe.
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
        )  # fmt: skip
        try:
            process.stdin.write(json.dumps(dict(request)))
            process.stdin.close()
            selector = selectors.DefaultSelector()
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                limit = RAY_CONNECT_STAGE_S if report["stage"] == "start" else timeout_s
                left = started + limit - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if not selector.select(timeout=left):
                    continue
                line = process.stdout.readline()
                if not line:
                    break
                if line.startswith(_PROBE_MARK):
                    report.update(json.loads(line[len(_PROBE_MARK) :]))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process.stdout.close()
        stderr.seek(0)
        errors = stderr.read()
    if "error" not in report and report["stage"] != "done":
        waited = time.monotonic() - started
        if _auth_refused(errors):
            report["error"] = (
                f"the Ray cluster at {address} refused the connection: it uses token authentication; set "
                "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) for this command"
            )
        elif timed_out and report["stage"] == "start":
            report["error"] = f"no Ray cluster answered at {address} within {waited:.0f} s (is it the head's GCS port?)"
        elif timed_out:
            report["error"] = f"the node probes did not finish within {waited:.0f} s"
        else:
            report["error"] = error_line(errors) or f"the probe process exited with code {process.returncode}"
    return report


def _tcp_refusal(address: str) -> Optional[str]:
    """One plain connect first: a dead address is refused at once, where ray.init would retry."""
    if address in ("auto", "local"):
        return None
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return f"--address: expected HOST:PORT (got {address!r})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or type(exc).__name__)
        return f"no Ray cluster answers at {address}: {reason}"
    return None


def _auth_refused(stderr: str) -> bool:
    return "InvalidAuthToken" in stderr or "Unauthenticated" in stderr or "AuthenticationError" in stderr


def _emit(**fields: Any) -> None:
    print(_PROBE_MARK + json.dumps(fields), flush=True)


def _cluster_main() -> None:
    """Child process: connect, list the nodes, run the pinned probes, print JSON lines."""
    request = json.loads(sys.stdin.read())
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        ray.init(address=request["address"], logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:
        _emit(stage="start", error=f"could not connect: {_reason(exc)}")
        return
    nodes = [
        {
            "id": node["NodeID"],
            "ip": node.get("NodeManagerAddress", "?"),
            "cpus": float(node.get("Resources", {}).get("CPU", 0)),
            "gpus": float(node.get("Resources", {}).get("GPU", 0)),
            "head": "node:__internal_head__" in node.get("Resources", {}),
        }
        for node in ray.nodes()
        if node.get("Alive")
    ]
    _emit(stage="connected", nodes=nodes)
    storage, expected = request.get("storage"), request.get("dataset")
    tracking_uri, run_id = request.get("tracking_uri"), request.get("run_id")
    if not (storage or expected is not None or run_id):
        _emit(stage="done")
        return

    def pinned(function, node_id):
        # num_cpus=0: the probe runs even while trials hold every CPU of the node.
        return ray.remote(function).options(
            num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        )

    try:
        refs = [
            pinned(_node_probe, n["id"]).remote(storage, _token_name(n["id"][:12]), f"{n['id'][:12]} ({n['ip']})", expected, tracking_uri, run_id)
            for n in nodes
        ]
        written = ray.get(refs, timeout=request["task_timeout_s"])
        _emit(stage="written", probes=written)
        if storage:
            tokens = {p["token"]: p["payload"] for p in written if not p.get("storage")}
            reads = ray.get([pinned(_node_read, n["id"]).remote(storage, tokens) for n in nodes], timeout=30)
            _emit(stage="read", reads=[{"label": p["label"], "error": e} for p, e in zip(written, reads)])
            ray.get([pinned(_node_cleanup, n["id"]).remote(storage, [p["token"]]) for n, p in zip(nodes, written)], timeout=30)
    except Exception as exc:
        _emit(error=f"a node probe failed: {_reason(exc)}")
        return
    _emit(stage="done")
    ray.shutdown()


def _cluster_results(
    report: Mapping[str, Any],
    address: str,
    resources_per_trial: Optional[Mapping[str, float]],
    probe: Optional[_ArtifactProbe],
    wanted: Mapping[str, bool],
    results: list[CheckResult],
) -> None:
    """Turn the child's report into the Ray, artifacts, storage and dataset rows.

    `probe` is the artifact probe when each node should write an artifact too; `wanted` says
    whether storage and dataset were asked for (otherwise they are skipped).
    """
    nodes = report.get("nodes")
    if not nodes:
        results.append(CheckResult(RAY, FAILED, report.get("error") or f"no alive node at {address}"))
        for check in (STORAGE, DATASET):
            results.append(CheckResult(check, SKIPPED, "the Ray cluster did not answer"))
        return
    cpus, gpus = sum(n["cpus"] for n in nodes), sum(n["gpus"] for n in nodes)
    need = _needs(resources_per_trial)
    fits = [n for n in nodes if n["cpus"] >= need.get("CPU", 0) and n["gpus"] >= need.get("GPU", 0)]
    detail = f"{address}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs, {gpus:g} GPUs"
    if need and not fits:
        results.append(CheckResult(RAY, FAILED, f"no node has the {_describe_need(need)} a trial asks for ({detail})"))
    else:
        results.append(CheckResult(RAY, OK, detail))

    probes = report.get("probes")
    if probes is None:
        error = report.get("error") or "the node probes did not run"
        if probe is not None:
            _replace(results, ARTIFACTS, CheckResult(ARTIFACTS, FAILED, f"from the nodes: {error}"))
        for check in (STORAGE, DATASET):
            results.append(CheckResult(check, FAILED, error) if wanted[check] else CheckResult(check, SKIPPED, "not asked for"))
        return
    if probe is not None:
        for item in probes:
            error = item.get("artifact_error") or probe.read(item["artifact_path"], item["payload"])
            probe.paths.append(item["artifact_path"])
            if error:
                _replace(results, ARTIFACTS, CheckResult(ARTIFACTS, FAILED, f"from node {item['label']}: {error}"))
                break
        else:
            artifacts = next(r for r in results if r.check == ARTIFACTS)
            artifacts.detail += f", and from all {len(probes)} nodes"
    results.append(_storage_result(report, probes))
    results.append(_dataset_result(probes))


def _replace(results: list[CheckResult], check: str, new: CheckResult) -> None:
    for index, result in enumerate(results):
        if result.check == check:
            results[index] = new
            return
    results.append(new)


def _storage_result(report: Mapping[str, Any], probes: Sequence[Mapping[str, Any]]) -> CheckResult:
    """Per node: its own write; across nodes: whether each saw every other node's file."""
    if not any("storage" in p for p in probes):
        return CheckResult(STORAGE, SKIPPED, "no storage path given")
    where = _where(probes)
    for item in probes:
        if item.get("storage"):
            return CheckResult(STORAGE, FAILED, item["storage"] + where(item))
    reads = report.get("reads")
    if reads is None:
        return CheckResult(STORAGE, FAILED, report.get("error") or "the storage read-back did not run")
    for item in reads:
        if item["error"]:
            return CheckResult(
                STORAGE, FAILED, f"not shared by all nodes: node {item['label']} does not see a file another node wrote ({item['error']})"
            )
    root = _storage_root_of(probes)
    if len(probes) == 1:
        return CheckResult(STORAGE, OK, f"{root} is writable" + where(probes[0]))
    return CheckResult(STORAGE, OK, f"{root} is writable from all {len(probes)} nodes, and each sees the others' files")


def _dataset_result(probes: Sequence[Mapping[str, Any]]) -> CheckResult:
    if not any("dataset_found" in p for p in probes):
        return CheckResult(DATASET, SKIPPED, "no config given")
    where = _where(probes)
    for item in probes:
        if item.get("dataset_error"):
            return CheckResult(DATASET, FAILED, item["dataset_error"] + where(item))
    found = probes[0].get("dataset_found")
    return CheckResult(DATASET, OK, f"found at {found}" + (f" on all {len(probes)} nodes" if len(probes) > 1 else ""))


def _where(probes: Sequence[Mapping[str, Any]]):
    """" (on node X)" on a cluster; nothing for this machine alone."""
    return lambda item: f" (on node {item['label']})" if len(probes) > 1 or item["label"] != "this machine" else ""


def _storage_root_of(probes: Sequence[Mapping[str, Any]]) -> str:
    return probes[0].get("storage_root", "the storage path")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _reason(exc: BaseException) -> str:
    """One short line, credentials redacted, without importing the tracking module (Ray workers)."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    # Not redacted here (Ray workers do not import the tracking module): preflight redacts every detail.
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ---------------------------------------------------------------------------------------------
# The verb


def check_command(
    path: Optional[str],
    overrides: Sequence[str],
    *,
    tracking_uri: Optional[str],
    address: Optional[str],
    storage: Optional[str],
    data_root: Optional[str],
) -> list[CheckResult]:
    """What `imbcil check` checks: a sweep file brings its base config, trial resources and
    default storage folder; a run config brings its data section; without either, the store
    (and, with --address, the cluster) alone."""
    from pipeline.config import ConfigError, read_yaml, resolve
    from pipeline.tracking import resolve_tracking_uri

    cfg, resources = None, None
    if path is not None:
        raw = read_yaml(path)
        if isinstance(raw, dict) and ({"base", "space", "tune"} & set(raw)):
            from pipeline.sweep.spec import load_sweep

            spec = load_sweep(path, overrides, data_root=data_root)
            cfg, resources = spec.base, spec.tune.resources_per_trial
            if storage is None:
                storage = DEFAULT_STORAGE
        else:
            cfg = resolve(path, overrides, data_root=data_root)
    elif overrides:
        raise ConfigError("overrides need a config or sweep file to apply to")
    elif data_root:
        # A bare --data-root: check for the offline CIFAR-10 that the default configs use.
        cfg = resolve(overrides=["data.dataset=cifar10", "protocol.first_task_classes=2", "protocol.incremental_tasks=4"], data_root=data_root)
    return preflight(resolve_tracking_uri(tracking_uri), address=address, storage=storage, cfg=cfg, resources_per_trial=resources)
