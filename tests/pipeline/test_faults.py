"""Faults, with real components on this machine.

First the tracker alone: writes that meet a stopped `mlflow server` wait for it and land once.
Then whole sweeps: a 2-node Ray cluster, a PostgreSQL-backed `mlflow server`, `imbcil sweep` in
a subprocess, tiny real-data trials. Each sweep test counts what MLflow holds afterwards: every
trial, every phase's metrics exactly once, its artifacts. The cluster and the server are started
once for the module; the test that kills the worker node runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import yaml
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from method.results import PhaseResult
from pipeline import tracking
from pipeline.tracking import RunTracker, TrackingError

pytestmark = pytest.mark.timeout(900)

PHASES = 3
SWEEP_TIMEOUT_S = 480
# The sweeps of these tests count records, not accuracies: half the tiny sweep's data
# (conftest.TINY_BASE), 2% of the training images, keeps each of their many trials short.
FAULT_SWEEP_BASE = {
    "device": "cpu",
    "data": {"dataset": "cifar10", "train_fraction": 0.02, "test_fraction": 0.03},
    "protocol": {"first_task_classes": 6, "incremental_tasks": 2},
    "train": {"epochs": 1, "milestones": [1]},
}
EXPECTED_ARTIFACTS = {"acc_matrix.csv", "acc_heatmap.png", "per_class.parquet", "checkpoint.pt"}


def cli_env(cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    return {**env, **cluster.env, "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------
# The tracker through an outage


def phase_result(phase: int, num_phases: int = PHASES) -> PhaseResult:
    acc = np.full((num_phases, num_phases), np.nan)
    acc[: phase + 1, : phase + 1] = np.tril(np.full((phase + 1, phase + 1), 50.0 + phase))
    metrics = {"acc": 50.0 + phase, "avg_incremental_acc": 55.0 - phase, "loss": 1.0 / (phase + 1)}
    per_class = {"position": [0, 1], "accuracy": [50.0, 60.0]}
    return PhaseResult(phase, num_phases, [[0, 1]] * num_phases, acc, acc, metrics, per_class, {"phase": phase})


def refused(message: str = "API request failed") -> MlflowException:
    """What MLflow raises when nothing listens: an MlflowException around ConnectionRefusedError."""
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        try:
            raise MlflowException(message)
        except MlflowException as exc:
            return exc


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory) -> Path:
    """A store with MLflow's schema, built once (the migration takes seconds per database)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.check_tracking(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_uri(tmp_path, migrated_store) -> str:
    import shutil

    shutil.copyfile(migrated_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def sqlite_tracker(sqlite_uri, monkeypatch):
    sleeps: list[float] = []
    # The tracker's clock only: other threads keep their own sleeps.
    fake_time = SimpleNamespace(time=time.time, monotonic=time.monotonic, sleep=sleeps.append)
    monkeypatch.setattr(tracking, "time", fake_time)
    tracker = RunTracker(sqlite_uri, "outage", retry_timeout_s=30)
    tracker.sleeps = sleeps
    return tracker


def test_a_refused_write_is_retried_with_backoff_until_it_lands(sqlite_tracker):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise refused()
        return "landed"

    assert sqlite_tracker._call("log phase 0", flaky) == "landed"
    assert sqlite_tracker.sleeps == [0.5, 1.0, 2.0]


def test_past_the_bound_the_error_names_the_store_redacted(sqlite_uri, monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "2")
    tracker = RunTracker(sqlite_uri, "outage")
    assert tracker.retry_timeout_s == 2
    tracker.tracking_uri = "http://bob:hunter2@mlflow.example:5000"
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        tracker._call("log phase 3", lambda: (_ for _ in ()).throw(refused()))
    assert 1 <= time.monotonic() - started < 4
    message = str(info.value)
    assert message.startswith("tracking store http://bob:***@mlflow.example:5000 did not answer for ")
    assert "(could not log phase 3): " in message and "hunter2" not in message
    # Once the bound was spent, the run's last calls (marking it FAILED) try once, without waiting.
    started = time.monotonic()
    with pytest.raises(TrackingError):
        tracker._call("end the run", lambda: (_ for _ in ()).throw(refused()))
    assert time.monotonic() - started < 0.5


def test_a_rejected_write_is_not_retried(sqlite_tracker):
    def invalid():
        raise MlflowException("bad metric", error_code="INVALID_PARAMETER_VALUE")

    with pytest.raises(TrackingError, match="could not log phase 1 in sqlite:///.*: bad metric"):
        sqlite_tracker._call("log phase 1", invalid)
    assert sqlite_tracker.sleeps == []


def test_an_unanswered_create_is_retried_only_if_it_never_left(sqlite_tracker):
    import requests

    def lost_answer():
        try:
            raise requests.exceptions.ReadTimeout("read timed out")
        except requests.exceptions.ReadTimeout:
            raise MlflowException("API request failed with timeout")

    with pytest.raises(TrackingError):
        sqlite_tracker._call("create the run", lost_answer, idempotent=False)
    assert sqlite_tracker.sleeps == []
    attempts = []
    assert sqlite_tracker._call("log tags", lambda: attempts.append(1) or (len(attempts) > 1 or lost_answer())) is True


def test_driver_calls_through_retrying_are_retried_within_the_bound(sqlite_tracker, monkeypatch):
    # A sweep driver closing a trial's run while the server is away: retried, then it lands.
    client = sqlite_tracker.client
    real_set_tag, attempts = client.set_tag, []

    def set_tag(*args, **kwargs):
        attempts.append(1)
        if len(attempts) < 3:
            raise refused()
        return real_set_tag(*args, **kwargs)

    monkeypatch.setattr(client, "set_tag", set_tag)
    sqlite_tracker.retrying.set_tag(sqlite_tracker.run_id, "imbcil.stopped_early", "true")
    assert len(attempts) == 3 and sqlite_tracker.sleeps == [0.5, 1.0]
    assert client.get_run(sqlite_tracker.run_id).data.tags["imbcil.stopped_early"] == "true"
    # Past the bound: one line naming the store and the call, not MLflow's own minutes of retries.
    monkeypatch.setattr(client, "get_run", lambda *a: (_ for _ in ()).throw(refused()))
    sqlite_tracker.retry_timeout_s = 0  # this clock's sleeps are fake: a bound of 0 ends at once
    with pytest.raises(TrackingError, match=r"did not answer for \d+ s \(could not get run\)"):
        sqlite_tracker.retrying.get_run(sqlite_tracker.run_id)


def test_bad_retry_setting_is_refused(monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "soon")
    with pytest.raises(TrackingError, match="IMBCIL_TRACKING_RETRY_S: expected a number of seconds"):
        tracking.default_retry_timeout()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def test_the_sql_store_ignores_an_identical_metric_sent_twice(backend, request):
    """Why a retried log_batch cannot duplicate a point: same key, step, timestamp and value."""
    uri = request.getfixturevalue("sqlite_uri" if backend == "sqlite" else "postgres_uri")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("twice")).info.run_id
    batch = [Metric("acc", 61.25, 1_700_000_000_000, 0), Metric("loss", 0.5, 1_700_000_000_000, 0)]
    client.log_batch(run_id, metrics=batch, synchronous=True)
    client.log_batch(run_id, metrics=batch, synchronous=True)
    assert [m.step for m in client.get_metric_history(run_id, "acc")] == [0]


@pytest.mark.e2e
def test_a_tracker_waits_out_a_stopped_server_and_logs_each_phase_once(tmp_path, cluster_kit, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = tmp_path / "server"
    root.mkdir()
    store = f"sqlite:///{root / 'db.sqlite'}"
    server = cluster_kit.launch_mlflow_server(root, store)
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with RunTracker(server.url, "outage", retry_timeout_s=120, request_timeout_s=10) as tracker:
            tracker.log_phase(phase_result(0))
            cluster_kit.stop_mlflow_server(server)
            # Back in a few seconds, on the same port, with the same store: log_phase(1) waits for it.
            restarted = {}
            restart = threading.Timer(3, lambda: restarted.update(server=cluster_kit.launch_mlflow_server(root, store, port=port)))
            restart.start()
            started = time.monotonic()
            tracker.log_phase(phase_result(1))
            waited = time.monotonic() - started
            restart.join()
            server = restarted["server"]
            tracker.log_phase(phase_result(2))
        assert waited >= 3
        client = MlflowClient(server.url)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[tracking.LAST_PHASE_TAG] == "2"
        for key in ("acc", "avg_incremental_acc", "loss"):
            assert sorted(m.step for m in client.get_metric_history(tracker.run_id, key)) == [0, 1, 2], key
        assert {a.path for a in client.list_artifacts(tracker.run_id, "phase_1")} >= {"phase_1/checkpoint.pt"}
        assert torch.load(client.download_artifacts(tracker.run_id, "phase_1/checkpoint.pt", str(tmp_path)))["phase"] == 1
    finally:
        cluster_kit.stop_mlflow_server(server)


@pytest.mark.e2e
def test_a_server_that_stays_away_fails_the_run_within_the_bound(tmp_path, cluster_kit):
    root = tmp_path / "server"
    root.mkdir()
    server = cluster_kit.launch_mlflow_server(root, f"sqlite:///{root / 'db.sqlite'}")
    tracker = RunTracker(server.url, "gone", retry_timeout_s=3, request_timeout_s=2)
    tracker.log_phase(phase_result(0))
    cluster_kit.stop_mlflow_server(server)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"^tracking store http://127\.0\.0\.1:\d+ did not answer for \d+ s \(could not log phase 1\)"):
        with tracker:
            tracker.log_phase(phase_result(1))
    assert time.monotonic() - started < 15  # the bound, plus one quick try to mark the run FAILED


# ---------------------------------------------------------------------------------------------
# Module-wide components


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cluster_kit):
    """Head and worker, 2 CPUs each: 4 one-CPU trials at a time, on both nodes."""
    ray_cluster = cluster_kit.start_ray_cluster(tmp_path_factory.mktemp("ray"), cpus=(2, 2))
    yield ray_cluster
    ray_cluster.stop()


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory, cluster_kit):
    """A PostgreSQL-backed `mlflow server` with proxied artifacts; `restart` brings it back on its port."""
    with cluster_kit.fresh_postgres_database() as store:
        root = tmp_path_factory.mktemp("mlflow-pg")
        holder = SimpleNamespace(server=cluster_kit.launch_mlflow_server(root, store))
        holder.url = holder.server.url

        def stop():
            cluster_kit.stop_mlflow_server(holder.server)

        def start():
            port = int(holder.url.rsplit(":", 1)[1])
            holder.server = cluster_kit.launch_mlflow_server(root, store, port=port)

        holder.stop, holder.start = stop, start
        yield holder
        stop()


@pytest.fixture
def quick_mlflow(monkeypatch):
    """This process's own MLflow reads fail fast instead of retrying for minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# ---------------------------------------------------------------------------------------------
# Running a sweep and reading it back


@dataclass
class SweepResult:
    name: str
    returncode: int
    stdout: str
    stderr: str
    storage: Path
    # pid of every `ray::` process seen on a node while the sweep ran -> node name
    node_of_pid: dict[int, str] = field(default_factory=dict)

    @property
    def experiment_dir(self) -> Path:
        return self.storage / self.name

    def trial_results(self) -> dict[str, list[dict]]:
        """Tune's per-trial result rows (each carries the pid of the process that reported it)."""
        out = {}
        for path in sorted(self.experiment_dir.glob("trial_*/result.json")):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            out[path.parent.name.removeprefix("trial_")] = rows
        return out

    def nodes_by_trial(self) -> dict[str, set[str]]:
        return {
            trial: {self.node_of_pid[r["pid"]] for r in rows if r.get("pid") in self.node_of_pid}
            for trial, rows in self.trial_results().items()
        }


def write_sweep(path: Path, name: str, *, num_samples: int, max_concurrent: int, max_failures: int = 2) -> Path:
    sweep = {
        "base": {**FAULT_SWEEP_BASE, "name": name},
        "space": {"train.lr": {"loguniform": [0.01, 0.1]}},
        "tune": {
            "name": name, "metric": "avg_incremental_acc", "mode": "max", "num_samples": num_samples,
            "max_concurrent": max_concurrent, "scheduler": "none", "resources_per_trial": {"cpu": 1},
            "max_failures": max_failures,
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


class _NodeSampler(threading.Thread):
    """Records which node each Ray worker process belongs to (by the session of its `ray start`)."""

    def __init__(self, cluster, cluster_kit) -> None:
        super().__init__(daemon=True)
        self.cluster, self.kit = cluster, cluster_kit
        self.seen: dict[int, str] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for node in self.cluster.nodes:
                for pid in self.kit.session_processes(node.session):
                    if pid not in self.seen and _cmdline(pid).startswith("ray::"):
                        self.seen[pid] = node.name
            self.halt.wait(0.3)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_sweep(
    tmp_path: Path, name: str, cluster, cluster_kit, tracking_uri: str, data_root: Path, *,
    num_samples: int, max_concurrent: int, max_failures: int = 2,
    during: Optional[Callable[[subprocess.Popen, Path, "_NodeSampler"], None]] = None,
) -> SweepResult:  # fmt: skip
    """`imbcil sweep` on the cluster in a subprocess; `during(process, storage, sampler)` injects a fault meanwhile."""
    sweep_file = write_sweep(tmp_path / f"{name}.yaml", name, num_samples=num_samples, max_concurrent=max_concurrent, max_failures=max_failures)
    storage = tmp_path / "ray_results"
    command = [
        sys.executable, "-m", "pipeline.cli", "sweep", str(sweep_file), "--address", cluster.address,
        "--storage", str(storage), "--tracking-uri", tracking_uri, "--data-root", str(data_root),
    ]  # fmt: skip
    out_path, err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    sampler = _NodeSampler(cluster, cluster_kit)
    sampler.start()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, cwd=tmp_path, env=cli_env(cluster), stdout=out, stderr=err, start_new_session=True)
        try:
            if during is not None:
                during(process, storage, sampler)
            process.wait(timeout=SWEEP_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            sampler.halt.set()
            sampler.join()
    return SweepResult(name, process.returncode, out_path.read_text(), err_path.read_text(), storage, sampler.seen)


def trial_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return client.search_runs([found.experiment_id], filter_string="tags.`imbcil.kind` = 'trial'", max_results=1000)


@dataclass
class Ledger:
    """What MLflow holds for a sweep's trials, counted."""

    trials: int = 0
    finished: int = 0
    phases_logged: int = 0
    metric_points: int = 0
    duplicates: int = 0
    missing: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self, label: str) -> str:
        return (
            f"[{label}] trials {self.trials} (finished {self.finished}), phases logged {self.phases_logged}, "
            f"metric points {self.metric_points}, duplicated {self.duplicates}, missing {self.missing}"
        )


def audit(client: MlflowClient, experiment: str) -> Ledger:
    """Every trial run: FINISHED, all phases marked, each metric at each step exactly once, artifacts there."""
    ledger = Ledger()
    for run in trial_runs(client, experiment):
        run_id = run.info.run_id
        ledger.trials += 1
        ledger.finished += run.info.status == "FINISHED"
        last = int(run.data.tags.get("imbcil.last_phase", -1))
        ledger.phases_logged += last + 1
        if run.info.status != "FINISHED" or last != PHASES - 1:
            ledger.problems.append(f"{run_id}: status {run.info.status}, last phase {last}")
        for key in ("acc", "avg_incremental_acc", "loss", "phase_seconds"):
            if key not in run.data.metrics:
                ledger.missing += PHASES
                ledger.problems.append(f"{run_id}: no {key}")
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            ledger.metric_points += len(steps)
            ledger.duplicates += len(steps) - len(set(steps))
            ledger.missing += len(set(range(PHASES)) - set(steps))
            if sorted(steps) != list(range(PHASES)) and not (key.startswith("acc_") and len(set(steps)) == len(steps)):
                ledger.problems.append(f"{run_id}: {key} at steps {sorted(steps)}")
        top = {a.path for a in client.list_artifacts(run_id)}
        if not {"config.yaml", "class_order.csv", "acc_curve.png"} <= top:
            ledger.problems.append(f"{run_id}: top-level artifacts {sorted(top)}")
        for phase in range(PHASES):
            names = {Path(a.path).name for a in client.list_artifacts(run_id, f"phase_{phase}")}
            if not EXPECTED_ARTIFACTS <= names:
                ledger.problems.append(f"{run_id}: phase_{phase} artifacts {sorted(names)}")
                ledger.missing += 1
    return ledger


def wait_until(predicate: Callable[[], bool], process: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the sweep ended (code {process.returncode}) before {what}"
        try:
            if predicate():
                return
        except Exception:  # the store may be starting, or the file half-written
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


def logged_phases(client: MlflowClient, experiment: str) -> dict[str, int]:
    """MLflow run id -> last fully logged phase, for the trial runs that have one."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], filter_string="tags.`imbcil.kind` = 'trial'")
    return {r.info.run_id: int(r.data.tags["imbcil.last_phase"]) for r in runs if "imbcil.last_phase" in r.data.tags}


def worker_log_count(cluster, text: str) -> int:
    """How often `text` appears in the Ray workers' logs (trials log through Python logging)."""
    return sum(path.read_text(errors="replace").count(text) for path in cluster.temp_dir.glob("session_*/logs/worker-*"))


def assert_sweep_ok(result: SweepResult) -> None:
    assert result.returncode == 0, f"sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# The tests (in this order: the last one kills the worker node)


@pytest.mark.e2e
def test_check_passes_on_the_two_node_cluster(tmp_path, cluster, pg_server, data_root):
    sweep_file = write_sweep(tmp_path / "check.yaml", "check", num_samples=1, max_concurrent=1)
    command = [
        sys.executable, "-m", "pipeline.cli", "check", str(sweep_file), "--address", cluster.address,
        "--storage", str(tmp_path / "shared"), "--tracking-uri", pg_server.url, "--data-root", str(data_root),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=cli_env(cluster), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 nodes, 4 CPUs" in done.stdout and "all checks passed" in done.stdout
    assert "from all 2 nodes" in done.stdout  # artifacts and storage, each node in turn
    assert not list((tmp_path / "shared").rglob("*.txt"))  # the probe files are gone


@pytest.mark.e2e
def test_sweep_spreads_trials_over_both_nodes_and_logs_each_phase_once(
    tmp_path, cluster, cluster_kit, pg_server, data_root, quick_mlflow
):
    result = run_sweep(tmp_path, "two-nodes", cluster, cluster_kit, pg_server.url, data_root, num_samples=8, max_concurrent=4)
    assert_sweep_ok(result)
    nodes = result.nodes_by_trial()
    assert len(nodes) == 8
    assert set().union(*nodes.values()) == {"head", "worker1"}, nodes
    ledger = audit(MlflowClient(pg_server.url), "two-nodes")
    print(ledger.line("two nodes, 8 trials"))
    assert (ledger.trials, ledger.finished, ledger.phases_logged) == (8, 8, 8 * PHASES), ledger.problems
    assert ledger.duplicates == 0 and ledger.missing == 0 and not ledger.problems, ledger.problems


@pytest.mark.e2e
def test_tracking_server_outage_mid_sweep_loses_and_duplicates_nothing(
    tmp_path, cluster, cluster_kit, pg_server, data_root, quick_mlflow
):
    client = MlflowClient(pg_server.url)
    outage = {}
    retried_before = worker_log_count(cluster, "does not answer")

    def stop_and_restart(process, storage, sampler):
        # Down once a trial has logged phase 0, while all of them still have phases to go.
        wait_until(lambda: logged_phases(client, "outage"), process, "a phase is logged")
        outage["unfinished"] = sum(phase < PHASES - 1 for phase in logged_phases(client, "outage").values())
        pg_server.stop()
        started = time.monotonic()
        time.sleep(5)
        pg_server.start()
        outage["seconds"] = time.monotonic() - started

    result = run_sweep(
        tmp_path, "outage", cluster, cluster_kit, pg_server.url, data_root, num_samples=4, max_concurrent=4, during=stop_and_restart
    )
    assert_sweep_ok(result)
    assert outage["unfinished"] >= 1  # the outage hit trials that still had phases to log
    retried = worker_log_count(cluster, "does not answer") - retried_before
    assert retried >= 1, "no trial write met the outage"
    ledger = audit(client, "outage")
    print(ledger.line(f"server down {outage['seconds']:.0f} s, {retried} trial writes waited for it, 4 trials"))
    assert (ledger.trials, ledger.finished, ledger.phases_logged) == (4, 4, 4 * PHASES), ledger.problems
    assert ledger.duplicates == 0 and ledger.missing == 0 and not ledger.problems, ledger.problems


@pytest.mark.e2e
def test_fresh_sqlite_store_and_a_kill_9_trial_resumes_from_its_last_phase(
    tmp_path, cluster, cluster_kit, data_root, quick_mlflow
):
    # A store that does not exist yet, four trials starting at once: the driver creates the
    # schema before any trial opens it, so no trial runs a migration.
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    client = MlflowClient(uri)
    killed = {}

    def kill_a_trial(process, storage, sampler):
        def running_trial():
            for path in (storage / "kill-9").glob("trial_*/result.json"):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if rows and rows[-1]["phases_done"] < PHASES and _cmdline(rows[-1]["pid"]).startswith("ray::"):
                    return rows[-1]
            return None

        wait_until(lambda: running_trial() is not None, process, "a trial reported a phase")
        row = running_trial()
        os.kill(row["pid"], signal.SIGKILL)
        killed.update(pid=row["pid"], run_id=row["mlflow_run_id"], phase=row["phase"])

    result = run_sweep(
        tmp_path, "kill-9", cluster, cluster_kit, uri, data_root, num_samples=4, max_concurrent=4, during=kill_a_trial
    )
    assert_sweep_ok(result)
    for text in (result.stdout, result.stderr):
        assert "alembic" not in text.lower() and "database is locked" not in text and "migration" not in text.lower()
    ledger = audit(client, "kill-9")
    print(ledger.line(f"fresh SQLite, trial killed after phase {killed['phase']}, 4 trials"))
    assert (ledger.trials, ledger.finished, ledger.phases_logged) == (4, 4, 4 * PHASES), ledger.problems
    assert ledger.duplicates == 0 and ledger.missing == 0 and not ledger.problems, ledger.problems
    # The same MLflow run went on in a new process, after the phase it had logged.
    trial = next(rows for rows in result.trial_results().values() if any(r["pid"] == killed["pid"] for r in rows))
    after = [r for r in trial if r["pid"] != killed["pid"]]
    assert after and {r["mlflow_run_id"] for r in trial} == {killed["run_id"]}
    assert min(r["phase"] for r in after) >= killed["phase"] and after[-1]["phases_done"] == PHASES


@pytest.mark.e2e
def test_killing_the_worker_node_mid_sweep_finishes_on_the_head(tmp_path, cluster, cluster_kit, pg_server, data_root, quick_mlflow):
    client = MlflowClient(pg_server.url)
    worker = next(node for node in cluster.nodes if node.name == "worker1")
    seen = {}

    def kill_worker_node(process, storage, sampler):
        def trial_on_worker():
            # A trial process that reported a phase and lives on the worker node.
            for path in (storage / "node-loss").glob("trial_*/result.json"):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                if rows and sampler.seen.get(rows[-1]["pid"]) == "worker1" and rows[-1]["phases_done"] < PHASES:
                    return rows[-1]["pid"]
            return None

        wait_until(lambda: trial_on_worker() is not None, process, "a trial on the worker node reported a phase")
        seen["phases"] = logged_phases(client, "node-loss")
        worker.kill()

    result = run_sweep(
        tmp_path, "node-loss", cluster, cluster_kit, pg_server.url, data_root, num_samples=4, max_concurrent=4,
        max_failures=3, during=kill_worker_node,
    )  # fmt: skip
    assert_sweep_ok(result)
    ledger = audit(client, "node-loss")
    moved = [trial for trial, nodes in result.nodes_by_trial().items() if nodes == {"head", "worker1"}]
    print(ledger.line(f"worker node killed, {len(moved)} trial(s) moved to the head, 4 trials"))
    assert moved, result.nodes_by_trial()
    assert (ledger.trials, ledger.finished, ledger.phases_logged) == (4, 4, 4 * PHASES), ledger.problems
    assert ledger.duplicates == 0 and ledger.missing == 0 and not ledger.problems, ledger.problems
    assert len(result.trial_results()) == 4
