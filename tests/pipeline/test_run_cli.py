"""`imbcil run` end to end on real CIFAR-10-LT, read back through MlflowClient."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from method.metrics import VALIDATION_METRIC_VERSION
from method.results import METRIC_NAMES
from pipeline.cli import app
from pipeline.config import resolve
from pipeline.tracking import RunTracker

REPO = Path(__file__).resolve().parents[2]
# CIFAR-10-LT, 6 base classes + 2 tasks of 2: three phases on 3% of the data, one epoch.
TINY = [
    "data.dataset=cifar10", "data.train_fraction=0.03", "data.test_fraction=0.05",
    "protocol.first_task_classes=6", "protocol.incremental_tasks=2",
    "train.epochs=1", "train.milestones=[1]", "device=cpu", "name=tiny-run",
]
PHASES = 3


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def only_run(client):
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return runs[0]


def assert_complete_run(client, run, phases=PHASES):
    assert run.info.status == "FINISHED"
    for name in ("acc", "avg_incremental_acc", "forgetting", "loss", "train_images_per_s", "phase_seconds"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(phases)), name
    assert set(METRIC_NAMES) - {"acc_few", "acc_medium", "acc_many"} <= set(run.data.metrics)
    assert run.data.params["train.epochs"] == "1" and run.data.tags["learner"] == "dgr"
    assert run.data.tags["protocol"] == "LFH-2"
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "class_order.csv", "acc_curve.png"} <= paths
    last = f"phase_{phases - 1}"
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, last)}
    assert {"acc_matrix.csv", "acc_heatmap.png", "weight_norms.png", "per_class.parquet", "checkpoint.pt"} <= files
    local = Path(client.download_artifacts(run.info.run_id, last))
    matrix = np.loadtxt(local / "acc_matrix.csv", delimiter=",")
    assert matrix.shape == (phases, phases)
    assert (local / "acc_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pq.read_table(local / "per_class.parquet").num_rows == 10
    state = torch.load(local / "checkpoint.pt", weights_only=False)
    assert state["phase"] == phases - 1 and "model" in state


@pytest.mark.e2e
def test_run_logs_every_phase_into_a_sqlite_store(tmp_path, data_root):
    code, output = invoke("run", REPO / "configs/quickstart.yaml", *TINY, "--data-root", data_root,
                          "--tracking-uri", sqlite_uri(tmp_path))
    assert code == 0, output
    assert "average incremental accuracy" in output and "MLflow run:" in output
    client = MlflowClient(sqlite_uri(tmp_path))
    run = only_run(client)
    assert run.info.run_id in output
    assert_complete_run(client, run)
    final = client.get_metric_history(run.info.run_id, "avg_incremental_acc")
    assert f"{max(final, key=lambda m: m.step).value:.2f}%" in output
    assert run.data.tags["imbcil.validation_metric"] == str(VALIDATION_METRIC_VERSION)
    assert_val_acc_is_the_mean_of_class_accuracies(client, run.info.run_id, tmp_path)


def assert_val_acc_is_the_mean_of_class_accuracies(client, run_id, tmp_path):
    """Each phase's val_acc: the mean over seen tasks of the mean val_accuracy of their classes that have held-out images."""
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")}
    order = client.download_artifacts(run_id, "class_order.csv", str(tmp_path))
    positions = [int(line.split(",")[0]) for line in Path(order).read_text().splitlines()[1:]]
    assert positions == list(range(10))
    for phase in range(PHASES):
        local = client.download_artifacts(run_id, f"phase_{phase}/per_class.parquet", str(tmp_path))
        table = pq.read_table(local).to_pydict()
        assert len(table["val_count"]) == len(table["val_accuracy"]) == 6 + 2 * phase
        by_class = dict(zip(table["position"], zip(table["val_count"], table["val_accuracy"])))
        tasks = [range(6), range(6, 8), range(8, 10)][: phase + 1]  # TINY: 6 base classes + 2 tasks of 2
        task_means = []
        for task in tasks:
            present = [by_class[c][1] for c in task if by_class[c][0] > 0]
            assert all(not math.isnan(a) for a in present)
            if present:
                task_means.append(np.mean(present))
        assert logged[phase] == pytest.approx(np.mean(task_means), abs=1e-9)


@pytest.mark.e2e
def test_run_against_a_real_mlflow_server(tmp_path, data_root, mlflow_server):
    server = mlflow_server()
    code, output = invoke("run", REPO / "configs/quickstart.yaml", *TINY, "--data-root", data_root,
                          "--tracking-uri", server.url)
    assert code == 0, output
    assert f"{server.url}/#/experiments/" in output
    client = MlflowClient(server.url)
    assert_complete_run(client, only_run(client))


def wait_for_phase(client, experiment_name, phase, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            for run in client.search_runs([experiment.experiment_id]):
                if int(run.data.tags.get("imbcil.last_phase", -1)) >= phase:
                    return run.info.run_id
        time.sleep(0.3)
    raise AssertionError(f"phase {phase} was not logged within {timeout} s")


@pytest.mark.e2e
def test_killed_run_resumes_without_duplicates_and_equals_a_straight_run(tmp_path, data_root):
    # Slower phases than TINY (3 epochs), so that the kill lands inside phase 2.
    config = [*TINY, "train.epochs=3", "train.milestones=[2]", "data.train_fraction=0.05"]
    uri = sqlite_uri(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "configs/quickstart.yaml"), *config,
               "--data-root", str(data_root), "--tracking-uri", uri, "--experiment", "interrupted"]
    client = MlflowClient(uri)
    client.search_experiments()  # create the store before two processes use it
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        run_id = wait_for_phase(client, "interrupted", 1, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert client.get_run(run_id).data.tags["imbcil.last_phase"] == "1"

    code, output = invoke("run", "--resume", run_id, "--data-root", data_root, "--tracking-uri", uri)
    assert code == 0, output
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    for name in ("acc", "avg_incremental_acc", "loss"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == [0, 1, 2], f"{name} logged at steps {steps}"

    code, output = invoke("run", REPO / "configs/quickstart.yaml", *config, "--data-root", data_root,
                          "--tracking-uri", uri, "--experiment", "straight")
    assert code == 0, output
    straight = client.search_runs([client.get_experiment_by_name("straight").experiment_id])[0]
    for name in ("acc", "avg_incremental_acc", "forgetting", "loss"):
        assert resumed.data.metrics[name] == straight.data.metrics[name], name


def test_a_run_logged_with_the_image_weighted_validation_metric_is_not_resumed(tmp_path, data_root):
    # A run as an imbcil of before the class-balanced metric left it: phase 0 logged, no version tag.
    uri = sqlite_uri(tmp_path)
    cfg = resolve(REPO / "configs/quickstart.yaml", TINY, data_root=str(data_root))
    with RunTracker(uri, "old-metric", "old") as tracker:
        tracker.log_config(cfg)
    client = MlflowClient(uri)
    client.delete_tag(tracker.run_id, "imbcil.validation_metric")
    client.set_tag(tracker.run_id, "imbcil.last_phase", "0")
    client.log_metric(tracker.run_id, "val_acc", 61.0, step=0)

    code, output = invoke("run", "--resume", tracker.run_id, "--data-root", data_root, "--tracking-uri", uri)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "version 1 (image-weighted)" in output and "version 2 (class-balanced)" in output
    assert [m.value for m in client.get_metric_history(tracker.run_id, "val_acc")] == [61.0]  # nothing added
    assert client.get_run(tracker.run_id).data.tags["imbcil.last_phase"] == "0"


def test_a_run_logged_with_cuda_graphs_resumes_without_them_from_the_same_checkpoint(tmp_path, data_root, monkeypatch):
    # A graphed run that stopped after phase 0, as a CUDA machine would have logged it; here it
    # goes on without graphs (a placement choice, like the device), from phase 0's checkpoint.
    uri = sqlite_uri(tmp_path)
    monkeypatch.chdir(tmp_path)  # the store's artifacts land beside it
    code, output = invoke("run", REPO / "configs/quickstart.yaml", *TINY, "--data-root", data_root, "--tracking-uri", uri)
    assert code == 0, output
    client = MlflowClient(uri)
    run_id = only_run(client).info.run_id
    straight = {name: [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)] for name in ("acc", "loss")}
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "cuda_graph: false" in config and "device: cpu" in config
    graphed = config.replace("cuda_graph: false", "cuda_graph: true").replace("device: cpu", "device: cuda")
    client.log_text(run_id, graphed, "config.yaml")
    client.set_tag(run_id, "imbcil.last_phase", "0")

    code, output = invoke("run", "--resume", run_id, "train.cuda_graph=false", "--device", "cpu", "--data-root", data_root, "--tracking-uri", uri)
    assert code == 0, output
    for name, values in straight.items():
        resumed = [m.value for m in client.get_metric_history(run_id, name) if m.step > 0]
        assert sorted(resumed) == sorted(values[1:] * 2), name  # phases 1 and 2 again, the same numbers
    # Anything but placement stays refused.
    client.set_tag(run_id, "imbcil.last_phase", "0")
    code, output = invoke("run", "--resume", run_id, "train.cuda_graph=false", "train.lr=0.05", "--device", "cpu",
                          "--data-root", data_root, "--tracking-uri", uri)
    assert code == 2 and "train.lr: the run to resume was logged with 0.1" in output, output


def store_is_empty(tmp_path):
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return True
    client = MlflowClient(sqlite_uri(tmp_path))
    return all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.lrr=0.1"], "train.lrr: unknown key"),
        (["train.lr=-1"], "train.lr: "),
        (["protocol.incremental_tasks=0"], "protocol.incremental_tasks"),
        (["--data-root", "/nonexistent/data"], "/nonexistent/data"),
        (["--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_root, extra, message):
    args = ["run", REPO / "configs/quickstart.yaml", *TINY]
    if "--data-root" not in extra:
        args += ["--data-root", data_root]
    if "--tracking-uri" not in extra:
        args += ["--tracking-uri", sqlite_uri(tmp_path)]
    code, output = invoke(*args, *extra)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert store_is_empty(tmp_path)


def test_help_lists_the_verbs():
    code, output = invoke("--help")
    assert code == 0
    for verb in ("run", "show-config", "data"):
        assert verb in output


@pytest.mark.e2e
def test_ctrl_c_ends_the_run_killed_with_exit_130(tmp_path, data_root):
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    client.search_experiments()
    command = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "configs/quickstart.yaml"), *TINY,
               "train.epochs=3", "--data-root", str(data_root), "--tracking-uri", uri, "--experiment", "ctrl-c"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A runner started as a background job (`cmd &`) ignores SIGINT, and a child inherits that
    # and never raises KeyboardInterrupt: give the run Ctrl-C's default meaning, as in a terminal.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    seen = []
    try:
        # Interrupt as the second phase starts (its progress line), not when MLflow shows the
        # first: a reader polling a busy SQLite file may see that only after the run has ended.
        for line in process.stdout:
            seen.append(line)
            if line.startswith("[run] phase 2/"):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    (run,) = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["imbcil.last_phase"] == "0"
    assert "error: interrupted" in output and "Traceback" not in output


def test_command_line_options_are_validated_with_the_config_before_anything_is_created(tmp_path, data_root):
    # --device is part of the one config resolution: CUDA graphs on the CPU are refused up front.
    code, output = invoke(
        "run", REPO / "configs/quickstart.yaml", "--device", "cpu", "train.cuda_graph=true",
        "--data-root", data_root, "--tracking-uri", sqlite_uri(tmp_path),
    )  # fmt: skip
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("error: train.cuda_graph: CUDA graphs need device cuda")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_config_file_that_is_not_text_is_one_line_and_exit_2(tmp_path):
    garbage = tmp_path / "random.yaml"
    garbage.write_bytes(b"\xff\xfe\x9c\x00" + bytes(range(128, 256)) * 4)
    code, output = invoke("run", garbage, "--tracking-uri", sqlite_uri(tmp_path))
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and lines == [f"error: {garbage}: not a text file (a YAML config is UTF-8 text)"], output
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def toy_learner():
    """A learner written outside the package: registering it is all it takes to run it."""
    import torch.nn.functional as F

    from method.learners import LEARNERS, Learner, register

    @register("toy_half_ce")
    class HalfCrossEntropy(Learner):
        uses_memory = needs_memory = False

        def loss_terms(self, logits, old_logits, targets):
            return {"ce": 0.5 * F.cross_entropy(logits, targets)}

    yield "toy_half_ce"
    LEARNERS.pop("toy_half_ce")


def test_a_learner_registered_in_a_test_runs_end_to_end(tmp_path, data_root, toy_learner):
    code, output = invoke(
        "run", REPO / "configs/quickstart.yaml", *TINY, f"learner.name={toy_learner}", "memory.budget=none",
        "--data-root", data_root, "--tracking-uri", sqlite_uri(tmp_path),
    )  # fmt: skip
    assert code == 0, output
    client = MlflowClient(sqlite_uri(tmp_path))
    run = only_run(client)
    assert run.data.params["learner.name"] == toy_learner and run.data.tags["imbcil.last_phase"] == str(PHASES - 1)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == PHASES and all(math.isfinite(v) for v in losses)
    # The registry is the only list of names: one not registered is refused like any typo.
    code, output = invoke("run", REPO / "configs/quickstart.yaml", *TINY, "learner.name=toy_unregistered", "--data-root", data_root)
    assert code == 2 and "learner.name: must be one of replay, finetune, lwf, icarl, wa, dgr, lucir, podnet, eeil, toy_half_ce (got" in output
