"""`imbcil reproduce` and `imbcil report`: seeds aggregated in MLflow, the Parquet table, the report."""

from __future__ import annotations

import statistics

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from method.config import RunConfig
from method.results import METRIC_NAMES
from pipeline.cli import app
from pipeline.config import ConfigError
from pipeline.reproduce import parse_seeds, split_arguments

# CIFAR-10-LT, 6 base classes + 2 tasks of 2: three phases on 3% of the data, one epoch.
TINY = {
    "device": "cpu",
    "data": {"dataset": "cifar10", "train_fraction": 0.03, "test_fraction": 0.05},
    "protocol": {"first_task_classes": 6, "incremental_tasks": 2},
    "train": {"epochs": 1, "milestones": [1]},
}
PHASES = 3


def write_config(folder, name, learner="dgr"):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **TINY, "learner": {"name": learner}}))
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def final_value(client, run_id, metric):
    history = client.get_metric_history(run_id, metric)
    return next(m.value for m in history if m.step == PHASES - 1)


def all_runs(client):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.e2e
def test_two_seeds_child_runs_parent_aggregate_table_and_report(tmp_path, data_root):
    config = write_config(tmp_path, "tiny-repro")
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results"
    code, stdout, stderr = invoke(
        "reproduce", config, "--seeds", "0", "1", "--data-root", data_root, "--tracking-uri", uri, "--output", out
    )
    assert code == 0, stdout + stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("reproduce/tiny-repro")
    parents = client.search_runs([experiment.experiment_id], "tags.`imbcil.kind` = 'reproduction'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted(int(c.data.params["seed"]) for c in children) == [0, 1]
    assert parent.info.status == "FINISHED"

    # The parent's mean and sample std, recomputed by hand from the children's final phase.
    for summary, metric in (("avg_incremental_acc", "avg_incremental_acc"), ("last_acc", "acc"), ("forgetting", "forgetting")):
        values = [final_value(client, c.info.run_id, metric) for c in children]
        assert parent.data.metrics[f"{summary}_mean"] == pytest.approx(statistics.mean(values))
        assert parent.data.metrics[f"{summary}_std"] == pytest.approx(statistics.stdev(values))
    assert {"results.parquet", "report.md", "acc_per_phase.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # One row per seed x phase x metric, each pointing at its child run.
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 2 * PHASES * len(METRIC_NAMES)
    assert {(r["seed"], r["phase"], r["metric"]) for r in table} == {
        (s, p, m) for s in (0, 1) for p in range(PHASES) for m in METRIC_NAMES
    }
    assert {r["mlflow_run_id"] for r in table} == {c.info.run_id for c in children}
    assert {(r["dataset"], r["scenario"], r["protocol"], r["learner"]) for r in table} == {("cifar10", "shuffled", "LFH-2", "dgr")}
    by_run = {c.info.run_id: c for c in children}
    for row in table:
        if row["metric"] == "avg_incremental_acc" and row["phase"] == PHASES - 1:
            assert row["value"] == final_value(client, row["mlflow_run_id"], "avg_incremental_acc")
            assert int(by_run[row["mlflow_run_id"]].data.params["seed"]) == row["seed"]

    text = (out / "report.md").read_text()
    aia = parent.data.metrics
    assert f"| tiny-repro | dgr | 2 | {aia['avg_incremental_acc_mean']:.2f} ± {aia['avg_incremental_acc_std']:.2f} |" in text
    assert "no paper number exists for this setting" in text
    assert "![accuracy per phase, one line per seed](acc_per_phase.png)" in text
    assert "1 epoch per task (the paper: 160)" in text
    for child in children:
        assert child.info.run_id in text

    # `imbcil report` re-renders the same text from the Parquet file alone.
    (out / "report.md").unlink()
    (out / "acc_per_phase.png").unlink()
    code, stdout, stderr = invoke("report", out)
    assert code == 0, stdout + stderr
    assert (out / "report.md").read_text() == text
    assert (out / "acc_per_phase.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.e2e
def test_several_configs_give_one_row_each(tmp_path, data_root):
    dgr, replay = write_config(tmp_path, "tiny-dgr", "dgr"), write_config(tmp_path, "tiny-replay", "replay")
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "compare"
    code, stdout, stderr = invoke(
        "reproduce", dgr, replay, "--seeds", "0", "--experiment", "compare",
        "--data-root", data_root, "--tracking-uri", uri, "--output", out,
    )  # fmt: skip
    assert code == 0, stdout + stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("reproduce/compare")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("imbcil.kind") == "reproduction")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["learner"] for c in children) == ["dgr", "replay"]
    for child in children:
        name = child.data.tags["imbcil.config_name"]
        final = final_value(client, child.info.run_id, "avg_incremental_acc")
        assert parent.data.metrics[f"{name}/avg_incremental_acc_mean"] == pytest.approx(final)
        assert parent.data.metrics[f"{name}/avg_incremental_acc_std"] == 0.0

    text = (out / "report.md").read_text()
    section = text.split("## Mean ± std over seeds")[1].split("## Per seed")[0]
    rows = [line for line in section.splitlines() if line.startswith("| tiny-")]
    assert [row.split(" | ")[:3] for row in rows] == [["| tiny-dgr", "dgr", "1"], ["| tiny-replay", "replay", "1"]]
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["config_name"] for r in table} == {"tiny-dgr", "tiny-replay"}
    assert len(table) == 2 * PHASES * len(METRIC_NAMES)


# ------------------------------------------------------------------------------- bad input


def assert_one_line_exit_2(code, stdout, stderr):
    assert code == 2, stdout + stderr
    # MLflow may log its INFO lines while creating a fresh store; the error itself is one line.
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr + stdout
    return errors[0]


def test_missing_config_file(tmp_path):
    line = assert_one_line_exit_2(*invoke("reproduce", tmp_path / "nope.yaml", "--seeds", "0", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"))
    assert "nope.yaml: config file not found" in line
    assert not (tmp_path / "m.db").exists()


def test_unknown_override_key(tmp_path):
    config = write_config(tmp_path, "tiny")
    line = assert_one_line_exit_2(*invoke("reproduce", config, "train.epochz=3", "--seeds", "0", "1"))
    assert "train.epochz: unknown key" in line


def test_configs_on_different_settings_are_refused(tmp_path):
    a = write_config(tmp_path, "a")
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({"name": "b", **TINY, "protocol": {"first_task_classes": 2, "incremental_tasks": 4}}))
    line = assert_one_line_exit_2(*invoke("reproduce", a, b, "--seeds", "0"))
    assert "cifar10 shuffled LFS-5" in line and "cifar10 shuffled LFH-2" in line


def test_seed_without_seeds_option_and_repeated_seed(tmp_path):
    config = write_config(tmp_path, "tiny")
    assert "seeds go after --seeds" in assert_one_line_exit_2(*invoke("reproduce", config, "3"))
    assert "seed 1 is given twice" in assert_one_line_exit_2(*invoke("reproduce", config, "--seeds", "1", "0", "1"))


def test_missing_data_fails_before_any_run(tmp_path):
    config = write_config(tmp_path, "tiny")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    line = assert_one_line_exit_2(*invoke("reproduce", config, "--seeds", "0", "--data-root", tmp_path / "empty", "--tracking-uri", uri))
    assert "empty" in line
    assert not (tmp_path / "m.db").exists()


def test_unreachable_tracking_server_and_ray_address(tmp_path, data_root, unused_port):
    config = write_config(tmp_path, "tiny")
    line = assert_one_line_exit_2(
        *invoke("reproduce", config, "--seeds", "0", "1", "--data-root", data_root, "--tracking-uri", f"http://127.0.0.1:{unused_port}")
    )
    assert "not reachable" in line
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    line = assert_one_line_exit_2(
        *invoke("reproduce", config, "--seeds", "0", "1", "--data-root", data_root, "--tracking-uri", uri,
                "--address", f"127.0.0.1:{unused_port}", "--output", tmp_path / "out")
    )  # fmt: skip
    assert f"preflight: ray cluster: no Ray cluster answers at 127.0.0.1:{unused_port}" in line
    assert all_runs(MlflowClient(uri)) == []


def test_report_of_a_folder_without_results(tmp_path):
    line = assert_one_line_exit_2(*invoke("report", tmp_path))
    assert "no results table" in line


def test_in_process_runs_continue_past_a_failed_seed():
    """One seed that fails must not cost the others their runs (the Ray path reports the same way)."""
    from pipeline.reproduce import InProcess, SeedJob

    jobs = [SeedJob("a", RunConfig(seed=s)) for s in (0, 1, 2)]
    outcomes = []

    def submit(job):
        if job.cfg.seed == 1:
            raise RuntimeError("out of\nmemory")
        return job.cfg.seed

    InProcess().run(jobs, submit, lambda job, result, error: outcomes.append((job.cfg.seed, result, error)))
    assert outcomes == [(0, 0, None), (1, None, "RuntimeError: out of memory"), (2, 2, None)]


# ----------------------------------------------------------------------- argument parsing


def test_seeds_in_every_written_form(tmp_path):
    config = write_config(tmp_path, "tiny")
    # `--seeds 0 1 2`: click hands 1 and 2 over as positional tokens.
    paths, overrides, seeds = split_arguments([str(config), "1", "2", "train.lr=0.05"], seeds_given=True)
    assert (paths, overrides, seeds) == ([str(config)], ["train.lr=0.05"], ["1", "2"])
    assert parse_seeds(["0", *seeds]) == [0, 1, 2]
    assert parse_seeds(["0,1, 2"]) == [0, 1, 2]
    assert parse_seeds(["3", "4"]) == [3, 4]
    with pytest.raises(ConfigError, match="not a non-negative integer"):
        parse_seeds(["x"])
