"""Tracking round trips: log synthetic phases into real MLflow stores and read them back."""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from method.config import RunConfig
from method.results import METRIC_NAMES, PhaseResult
from pipeline import tracking
from pipeline.tracking import RunTracker, TrackingError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_PHASES = 3
TASK_CLASSES = [[0, 1], [2, 3], [4, 5]]
TRAIN_COUNTS = [500, 300, 120, 60, 25, 10]


def make_result(phase: int, num_phases: int = NUM_PHASES) -> PhaseResult:
    """A hand-built phase: distinct numbers per phase, NaN where nothing is defined yet."""
    acc = np.full((num_phases, num_phases), np.nan)
    task_aware = np.full((num_phases, num_phases), np.nan)
    for row in range(phase + 1):
        for col in range(row + 1):
            acc[row, col] = 90.0 - 10 * col - 5 * (row - col)
            task_aware[row, col] = 95.0 - 2 * (row - col)
    seen = [c for task in TASK_CLASSES[: phase + 1] for c in task]
    metrics = {name: float(10 * phase + i) for i, name in enumerate(METRIC_NAMES)}
    metrics["acc"] = float(np.nanmean(acc[phase, : phase + 1]))
    if phase == 0:
        metrics["acc_few"] = math.nan  # no few-shot class seen yet
    per_class = {
        "position": seen,
        "original_label": [c + 10 for c in seen],
        "name": [f"class{c}" for c in seen],
        "train_count": [TRAIN_COUNTS[c] for c in seen],
        "memory_count": [20] * len(seen),
        "test_count": [100] * len(seen),
        "accuracy": [80.0 - c for c in seen],
        "head_weight_norm": [1.0 + 0.1 * c + 0.05 * phase for c in seen],
        "shot": ["many" if TRAIN_COUNTS[c] > 100 else "medium" if TRAIN_COUNTS[c] >= 20 else "few" for c in seen],
    }
    state = {"phase": phase, "model": {"head.weight": torch.arange(6.0).reshape(2, 3) + phase}}
    return PhaseResult(phase, num_phases, TASK_CLASSES, acc, task_aware, metrics, per_class, state)


@pytest.fixture(scope="session")
def migrated_sqlite_store(tmp_path_factory):
    """One store with MLflow's schema, built once: the migration takes seconds per database."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.check_tracking(f"sqlite:///{path}")
    return path


@pytest.fixture
def uri(tmp_path, migrated_sqlite_store) -> str:
    """A private, already migrated SQLite store in the test's tmp_path."""
    shutil.copyfile(migrated_sqlite_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def download(client: MlflowClient, run_id: str, path: str, tmp_path):
    dst = tmp_path / "downloads" / f"{time.monotonic_ns()}"
    dst.mkdir(parents=True)
    return client.download_artifacts(run_id, path, str(dst))


def assert_png(path):
    data = open(path, "rb").read()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def assert_states_equal(a, b):
    assert a["phase"] == b["phase"]
    assert torch.equal(a["model"]["head.weight"], b["model"]["head.weight"])


# ---------------------------------------------------------------------------------------------
# URIs and the store check


def test_resolve_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://cli:5000") == "http://cli:5000"
    assert tracking.resolve_tracking_uri(None) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    assert tracking.resolve_tracking_uri("") == "sqlite:///mlflow.db"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("postgresql://bob:s3cret@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow"),
        ("postgresql+psycopg2://bob:p@ss:w@db/mlflow", "postgresql+psycopg2://bob:***@db/mlflow"),
        ("https://alice:tok%40en@mlflow.example.org/", "https://alice:***@mlflow.example.org/"),
        ("mysql://db/mlflow?user=bob&password=abc&ssl=1", "mysql://db/mlflow?user=bob&password=***&ssl=1"),
        ("http://h:5000/?token=xyz", "http://h:5000/?token=***"),
        ("https://alice@mlflow.example.org", "https://alice@mlflow.example.org"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("", ""),
    ],
)
def test_redact_uri(raw, expected):
    assert tracking.redact_uri(raw) == expected


def test_run_url():
    assert (
        tracking.run_url("https://bob:pw@mlflow.example.org/", "3", "abc")
        == "https://mlflow.example.org/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert tracking.run_url("http://127.0.0.1:5000", "3") == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    hint = tracking.run_url("sqlite:///mlflow.db", "1", "r1")
    assert hint.startswith("mlflow ui --backend-store-uri sqlite:////")
    assert hint.endswith("http://127.0.0.1:5000/#/experiments/1/runs/r1?workflowType=machine_learning")
    assert "s3cret" not in tracking.run_url("postgresql://u:s3cret@db/m", "1")


def test_check_tracking_unreachable_server_fails_fast(unused_port):
    port = unused_port
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        tracking.check_tracking(f"http://user:hunter2@127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port} is not reachable" in message
    assert "hunter2" not in message


def test_check_tracking_creates_sqlite_store_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'store.db'}"
    tracking.check_tracking(uri)
    assert (tmp_path / "new" / "store.db").is_file()
    experiments = MlflowClient(uri).search_experiments()
    assert [e.name for e in experiments] == ["Default"]  # MLflow's own; nothing of ours
    tracking.check_tracking(uri)  # an existing store is fine


def test_check_tracking_rejects_unwritable_location(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingError, match="not writable"):
        tracking.check_tracking(f"sqlite:///{blocker / 'mlflow.db'}")


def test_check_tracking_missing_database_fails_fast(postgres_uri):
    missing = postgres_uri.rsplit("/", 1)[0] + "/imbcil_no_such_database"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="does not exist") as info:
        tracking.check_tracking(missing)
    assert time.monotonic() - start < 10  # MLflow's own engine setup would retry for ~100 s
    assert "\n" not in str(info.value)


def test_experiment_get_or_create_is_tagged(tmp_path, uri):
    client = MlflowClient(uri)
    first = tracking.experiment_id(client, "sweep a/b")
    assert tracking.experiment_id(client, "sweep a/b") == first
    experiment = client.get_experiment(first)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # Artifacts stay beside the database, not in the working directory.
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    client.delete_experiment(first)
    with pytest.raises(TrackingError, match="deleted"):
        tracking.experiment_id(client, "sweep a/b")


# ---------------------------------------------------------------------------------------------
# A full run


def test_run_logs_config_phases_and_artifacts(tmp_path, uri):
    cfg = RunConfig()
    cfg.data.dataset = "cifar10"
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    results = [make_result(t) for t in range(NUM_PHASES)]
    with RunTracker(uri, "imbcil-test", "run-0", tags={"imbcil.verb": "run"}) as tracker:
        tracker.log_config(cfg, extra_tags={"trial": "t0"})
        tracker.log_class_order([13, 10, 11, 12, 15, 14], [f"name{i}" for i in range(16)])
        assert tracker.last_logged_phase() is None
        for result in results:
            tracker.log_phase(result)
            assert tracker.last_logged_phase() == result.phase
        assert tracker.phase_logged(1) and not tracker.phase_logged(3)
        assert_states_equal(tracker.load_checkpoint(), results[-1].state)
        assert_states_equal(tracker.load_checkpoint(0), results[0].state)
        run_id = tracker.run_id

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run-0"
    assert run.info.experiment_id == tracker.experiment_id
    assert run.data.params["train.lr"] == "0.1"
    assert run.data.params["train.milestones"] == "None"
    assert run.data.params["data.dataset"] == "cifar10"
    tags = run.data.tags
    assert (tags["learner"], tags["dataset"], tags["scenario"], tags["seed"]) == ("dgr", "cifar10", "shuffled", "0")
    assert tags["protocol"] == "LFS-5"
    assert tags["trial"] == "t0" and tags["imbcil.verb"] == "run"
    assert tags["version.torch"] == torch.__version__.split("+")[0] or tags["version.torch"] == torch.__version__
    assert "version.mlflow" in tags and "version.python" in tags
    assert tags[tracking.LAST_PHASE_TAG] == "2"
    assert tracking.ERROR_TAG not in tags

    for name in METRIC_NAMES:
        history = client.get_metric_history(run_id, name)
        expected = [(r.phase, r.metrics[name]) for r in results if not math.isnan(r.metrics[name])]
        logged = sorted((m.step, m.value) for m in history)
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected])
    assert [m.step for m in client.get_metric_history(run_id, "acc_few")] == [1, 2]

    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "class_order.csv", "acc_curve.png", "phase_0", "phase_1", "phase_2"} <= top
    assert "dataset: cifar10" in open(download(client, run_id, "config.yaml", tmp_path)).read()
    order = open(download(client, run_id, "class_order.csv", tmp_path)).read().splitlines()
    assert order[0] == "position,original_label,name" and order[1] == "0,13,name13"
    assert_png(download(client, run_id, "acc_curve.png", tmp_path))

    for result in results:
        t = result.phase
        names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, f"phase_{t}")}
        assert names == {
            "acc_matrix.csv",
            "task_aware_matrix.csv",
            "acc_heatmap.png",
            "weight_norms.png",
            "per_class.parquet",
            "checkpoint.pt",
        }
        matrix = np.loadtxt(download(client, run_id, f"phase_{t}/acc_matrix.csv", tmp_path), delimiter=",", ndmin=2)
        assert matrix.shape == (t + 1, t + 1)
        np.testing.assert_allclose(matrix, result.acc_matrix[: t + 1, : t + 1], atol=1e-4)  # NaNs included
        aware = np.loadtxt(download(client, run_id, f"phase_{t}/task_aware_matrix.csv", tmp_path), delimiter=",", ndmin=2)
        assert aware.shape == (t + 1, t + 1)
        assert_png(download(client, run_id, f"phase_{t}/acc_heatmap.png", tmp_path))
        assert_png(download(client, run_id, f"phase_{t}/weight_norms.png", tmp_path))
        table = pq.read_table(download(client, run_id, f"phase_{t}/per_class.parquet", tmp_path))
        assert table.num_rows == 2 * (t + 1)
        assert table.column("position").to_pylist() == result.per_class["position"]
        assert table.column("shot").to_pylist() == result.per_class["shot"]
        state = torch.load(download(client, run_id, f"phase_{t}/checkpoint.pt", tmp_path), weights_only=False)
        assert_states_equal(state, result.state)


def test_error_inside_run_marks_it_failed(uri):
    with pytest.raises(ValueError, match="boom"):
        with RunTracker(uri, "imbcil-test") as tracker:
            tracker.log_phase(make_result(0))
            raise ValueError("boom\n  in the second line " + "x" * 1000)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    error = run.data.tags[tracking.ERROR_TAG]
    assert error.startswith("boom in the second line x") and "\n" not in error
    assert len(error) <= tracking.ERROR_MESSAGE_LIMIT


def test_keyboard_interrupt_marks_run_killed(uri):
    with pytest.raises(KeyboardInterrupt):
        with RunTracker(uri, "imbcil-test") as tracker:
            raise KeyboardInterrupt
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert tracking.ERROR_TAG not in run.data.tags


def test_child_run_carries_parent(uri):
    with RunTracker(uri, "sweep", "parent") as parent:
        with RunTracker(uri, "sweep", "trial-0", parent_run_id=parent.run_id) as child:
            pass
    client = MlflowClient(uri)
    assert client.get_run(child.run_id).data.tags[tracking.PARENT_RUN_TAG] == parent.run_id
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert child.url.endswith(f"#/experiments/{parent.experiment_id}/runs/{child.run_id}?workflowType=machine_learning")


def test_resume_continues_the_same_run(uri):
    cfg = RunConfig()
    results = [make_result(t) for t in range(NUM_PHASES)]
    with pytest.raises(RuntimeError, match="node lost"):
        with RunTracker(uri, "imbcil-test", "resumable") as first:
            first.log_config(cfg)
            first.log_phase(results[0])
            first.log_phase(results[1])
            raise RuntimeError("node lost")
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    with RunTracker(uri, "imbcil-test", run_id=first.run_id) as resumed:
        assert resumed.resumed and resumed.run_id == first.run_id
        assert client.get_run(first.run_id).info.status == "RUNNING"
        assert resumed.last_logged_phase() == 1
        assert resumed.phase_logged(1) and not resumed.phase_logged(2)
        assert resumed.accuracy_per_phase == pytest.approx([results[0].metrics["acc"], results[1].metrics["acc"]])
        assert_states_equal(resumed.load_checkpoint(), results[1].state)
        resumed.log_config(cfg)  # same config: nothing to change
        changed = RunConfig()
        changed.train.lr = 0.05
        with pytest.raises(TrackingError, match="train.lr"):
            resumed.log_config(changed)
        moved = RunConfig()
        moved.data.root = "/elsewhere"
        resumed.log_config(moved, allow_changed={"data.root"})  # where it runs may change
        resumed.log_phase(results[2])
        assert resumed.accuracy_per_phase == pytest.approx([r.metrics["acc"] for r in results])

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.root"] == "None"  # the first value stays
    assert run.data.tags[tracking.LAST_PHASE_TAG] == "2"
    assert [m.step for m in client.get_metric_history(first.run_id, "acc")] == [0, 1, 2]


def test_resume_refuses_unknown_or_foreign_runs(uri):
    with pytest.raises(TrackingError, match="not found"):
        RunTracker(uri, "imbcil-test", run_id="0" * 32)
    with RunTracker(uri, "one") as tracker:
        pass
    with pytest.raises(TrackingError, match="belongs to experiment 'one'"):
        RunTracker(uri, "other", run_id=tracker.run_id)


def test_load_checkpoint_without_phases(uri):
    with RunTracker(uri, "imbcil-test") as tracker:
        with pytest.raises(TrackingError, match="no fully logged phase"):
            tracker.load_checkpoint()


# ---------------------------------------------------------------------------------------------
# Real servers


def _log_two_phases_over_http(server_url: str, tmp_path, capsys) -> str:
    tracking.check_tracking(server_url)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the probe's knobs are undone
    results = [make_result(0), make_result(1)]
    with RunTracker(server_url, "imbcil-server-test", "over-http") as tracker:
        tracker.log_config(RunConfig())
        for result in results:
            tracker.log_phase(result)
        assert_states_equal(tracker.load_checkpoint(), results[1].state)
        assert tracker.url == f"{server_url}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}?workflowType=machine_learning"
    assert "View run" not in capsys.readouterr().out  # MLflow's own link print is suppressed
    client = MlflowClient(server_url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "acc")] == [0, 1]
    matrix = np.loadtxt(download(client, tracker.run_id, "phase_1/acc_matrix.csv", tmp_path), delimiter=",")
    assert matrix.shape == (2, 2)
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    return tracker.run_id


def test_real_server_with_sqlite_backend(mlflow_server, tmp_path, capsys):
    server = mlflow_server("sqlite")
    run_id = _log_two_phases_over_http(server.url, tmp_path, capsys)
    # Uploads went through the server's proxy into its artifact destination.
    assert list(server.artifacts_dir.rglob(f"{run_id}/artifacts/phase_1/checkpoint.pt"))


def test_real_server_with_postgres_backend(mlflow_server, tmp_path, capsys):
    server = mlflow_server("postgres")
    assert server.backend_store_uri.startswith("postgresql")
    run_id = _log_two_phases_over_http(server.url, tmp_path, capsys)
    assert list(server.artifacts_dir.rglob(f"{run_id}/artifacts/phase_0/per_class.parquet"))
