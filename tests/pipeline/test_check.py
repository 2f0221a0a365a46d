"""`imbcil check` / `preflight`: each failure is one line naming the problem and exit 2; a
passing check leaves nothing behind in the store or the storage folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from method.config import RunConfig
from pipeline import check
from pipeline.check import CheckResult, PreflightError, preflight, raise_on_failure
from pipeline.cli import app

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory):
    """A store with MLflow's schema, built once (the migration takes seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    from pipeline.tracking import check_tracking

    check_tracking(f"sqlite:///{path}")
    return path


@pytest.fixture
def uri(tmp_path, migrated_store) -> str:
    shutil.copyfile(migrated_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def cifar10(root) -> RunConfig:
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.root = "cifar10", str(root)
    return cfg


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_all_checks_pass_and_leave_nothing_behind(tmp_path, uri, data_root):
    storage = tmp_path / "shared"
    for _ in range(2):  # a second check reuses the probe run
        results = preflight(uri, storage=str(storage), cfg=cifar10(data_root))
        assert [r.check for r in results] == ["tracking store", "artifacts", "ray cluster", "storage", "dataset"]
        assert all(r.status == "ok" for r in results), results
        raise_on_failure(results)
    assert "(current)" in results[0].detail
    assert str(data_root / "cifar10-jpeg.parquet") in results[-1].detail
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(check.PREFLIGHT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    assert len(runs) == 1 and runs[0].info.lifecycle_stage == "deleted"  # hidden from every run list
    assert client.list_artifacts(runs[0].info.run_id, "preflight") == []
    assert list(storage.rglob("*")) == []  # the storage folder is there, empty


def test_without_config_or_storage_those_checks_are_skipped(uri):
    results = preflight(uri)
    assert {r.check: r.status for r in results} == {
        "tracking store": "ok", "artifacts": "ok", "ray cluster": "ok", "storage": "skipped", "dataset": "skipped",
    }  # fmt: skip


def test_a_trial_larger_than_this_machine_fails(uri):
    results = preflight(uri, resources_per_trial={"cpu": 1, "gpu": 4})
    with pytest.raises(PreflightError, match=r"^preflight: ray cluster: a trial asks for 1 CPU \+ 4 GPU"):
        raise_on_failure(results)


def test_raise_on_failure_names_the_first_failed_check():
    results = [
        CheckResult("tracking store", "ok", "fine"),
        CheckResult("storage", "failed", "/x is not writable"),
        CheckResult("dataset", "failed", "not found"),
    ]
    with pytest.raises(PreflightError) as info:
        raise_on_failure(results)
    assert str(info.value) == "preflight: storage: /x is not writable"
    raise_on_failure(results[:1])


@pytest.mark.parametrize(
    "case, expected",
    [
        ("server down", "preflight: tracking store: tracking server http://127.0.0.1:{port} is not reachable"),
        ("unwritable storage", "preflight: storage: {blocker}/ray_results is not writable"),
        ("missing data", "preflight: dataset: CIFAR-10 not found: neither /nonexistent/data/cifar10-jpeg.parquet"),
        ("wrong ray address", "preflight: ray cluster: no Ray cluster answers at 127.0.0.1:{port}: connection refused"),
    ],
)
def test_each_failure_is_one_line_and_exit_2(tmp_path, uri, data_root, unused_port, case, expected):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    args = ["check", CONFIG, "--tracking-uri", uri, "--data-root", data_root, "--storage", tmp_path / "storage"]
    if case == "server down":
        args[3] = f"http://127.0.0.1:{unused_port}"
    elif case == "unwritable storage":
        args[-1] = blocker / "ray_results"
    elif case == "missing data":
        args[5] = "/nonexistent/data"
    else:
        args += ["--address", f"127.0.0.1:{unused_port}"]
    code, stdout, stderr = invoke(*args)
    assert code == 2, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: " + expected.format(port=unused_port, blocker=blocker)), stderr
    assert "Traceback" not in stdout + stderr
    assert "failed" in stdout  # the table still shows every check


def test_a_storage_uri_is_refused_as_the_sweep_refuses_it(uri):
    code, stdout, stderr = invoke("check", "--tracking-uri", uri, "--storage", "s3://bucket/ray_results")
    assert code == 2 and stdout == ""
    assert stderr.strip() == "error: --storage: give a folder (on a cluster, one every node sees), not a URI (s3://bucket/ray_results); imbcil sweep takes only a folder"


def test_a_password_in_the_tracking_uri_is_never_printed(unused_port):
    code, stdout, stderr = invoke("check", "--tracking-uri", f"http://bob:hunter2@127.0.0.1:{unused_port}")
    assert code == 2
    assert "hunter2" not in stdout + stderr and "bob:***@" in stderr


def test_a_sweep_file_brings_its_data_resources_and_default_storage(tmp_path, uri, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = invoke("check", REPO / "sweeps" / "quickstart.yaml", "--tracking-uri", uri, "--data-root", data_root)
    assert code == 0, stdout + stderr
    assert "all checks passed" in stdout
    assert (tmp_path / "ray_results").is_dir()  # the sweep's default storage, checked writable


def test_dataset_expectations_follow_the_source(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(b"")
    cfg = cifar10(tmp_path)
    found, error = check._find_dataset(check._dataset_expectations(cfg.data))
    assert found is None and "neither" in error  # batches.meta is missing
    (folder / "batches.meta").write_bytes(b"")
    found, error = check._find_dataset(check._dataset_expectations(cfg.data))
    assert error is None and found == str(folder)
    cfg.data.source = "parquet"
    found, error = check._find_dataset(check._dataset_expectations(cfg.data))
    assert found is None and error.startswith("CIFAR-10 Parquet file not found")
    imagenet = RunConfig()
    imagenet.data.dataset, imagenet.data.root = "imagenet_subset", str(tmp_path)
    assert "train.txt" in check._find_dataset(check._dataset_expectations(imagenet.data))[1]
    cfg.data.root = None
    assert check._find_dataset(check._dataset_expectations(cfg.data))[1].startswith("no data root for cifar10")


@pytest.mark.e2e
def test_artifacts_round_trip_through_a_real_server_and_are_deleted(mlflow_server):
    server = mlflow_server("sqlite")
    results = preflight(server.url)
    assert results[0].status == "ok" and "MLflow server" in results[0].detail
    assert results[1].status == "ok" and results[1].detail.startswith("written and read back at mlflow-artifacts:")
    assert not [p for p in server.artifacts_dir.rglob("*") if p.is_file()]


def cluster_rows(report, resources=None, wanted=None):
    results = [CheckResult("tracking store", "ok", ""), CheckResult("artifacts", "ok", "written")]
    wanted = wanted or {"storage": True, "dataset": True}
    check._cluster_results(report, "10.0.0.5:6380", resources, None, wanted, results)
    return {r.check: (r.status, r.detail) for r in results}


NODES = [
    {"id": "a" * 56, "ip": "10.0.0.5", "cpus": 8.0, "gpus": 0.0, "head": True},
    {"id": "b" * 56, "ip": "10.0.0.6", "cpus": 8.0, "gpus": 2.0, "head": False},
]


def probes(**per_node):
    return [
        {"label": f"{n['id'][:12]} ({n['ip']})", "token": f"t{i}", "payload": "x", "storage_root": "/shared/ray_results",
         "storage": None, "dataset_found": "/data/cifar10-jpeg.parquet", "dataset_error": None, **per_node.get(str(i), {})}
        for i, n in enumerate(NODES)
    ]  # fmt: skip


def test_cluster_report_all_good():
    rows = cluster_rows({"nodes": NODES, "probes": probes(), "reads": [{"label": "a", "error": None}] * 2}, {"cpu": 1, "gpu": 1})
    assert rows["ray cluster"] == ("ok", "10.0.0.5:6380: 2 nodes, 16 CPUs, 2 GPUs")
    assert rows["storage"][0] == "ok" and "from all 2 nodes" in rows["storage"][1]
    assert rows["dataset"] == ("ok", "found at /data/cifar10-jpeg.parquet on all 2 nodes")


def test_cluster_report_storage_local_to_each_node_is_not_shared():
    reads = [{"label": "aaaaaaaaaaaa (10.0.0.5)", "error": None}, {"label": "bbbbbbbbbbbb (10.0.0.6)", "error": "/shared/x/t0 is missing"}]
    rows = cluster_rows({"nodes": NODES, "probes": probes(), "reads": reads})
    assert rows["storage"][0] == "failed"
    assert rows["storage"][1].startswith("not shared by all nodes: node bbbbbbbbbbbb (10.0.0.6) does not see a file")


def test_cluster_report_names_the_node_without_data_and_the_trial_that_fits_nowhere():
    report = {"nodes": NODES, "probes": probes(**{"1": {"dataset_error": "CIFAR-10 not found: ..."}}), "reads": []}
    rows = cluster_rows(report, {"cpu": 1, "gpu": 4})
    assert rows["dataset"] == ("failed", "CIFAR-10 not found: ... (on node bbbbbbbbbbbb (10.0.0.6))")
    assert rows["ray cluster"][0] == "failed" and rows["ray cluster"][1].startswith("no node has the 1 CPU + 4 GPU")


def test_cluster_report_when_the_probes_did_not_run():
    report = {"nodes": NODES, "error": "the node probes did not finish within 60 s"}
    assert cluster_rows(report)["storage"] == ("failed", "the node probes did not finish within 60 s")
    assert cluster_rows(report, wanted={"storage": False, "dataset": False})["storage"][0] == "skipped"
    rows = cluster_rows({"stage": "start", "error": "no Ray cluster answered at 10.0.0.5:6380 within 30 s"})
    assert rows["ray cluster"][0] == "failed" and rows["storage"][0] == "skipped"
