"""`imbcil export`: the best trial of the session's tiny sweep, as a config `imbcil run` accepts."""

from __future__ import annotations

import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.sweep.spec import load_sweep


def invoke(*args):
    result = CliRunner().invoke(app, ["export", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def final_values(sweep, metric: str, phases: int) -> dict[str, float]:
    """Final `metric` of each finished trial, from the sweep's Parquet table."""
    rows = pq.read_table(sweep.results_dir / "trials.parquet").to_pylist()
    return {
        r["trial_id"]: r["value"]
        for r in rows
        if r["status"] == "finished" and r["metric"] == metric and r["phase"] == phases - 1
    }


def header(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("#")]


@pytest.mark.e2e
def test_export_from_the_sweep_folder_writes_the_best_trials_complete_config(tiny_sweep, sweep_kit, tmp_path):
    out = tmp_path / "best.yaml"
    code, output = invoke(tiny_sweep.experiment_dir, "-o", out)
    assert code == 0, output
    finals = final_values(tiny_sweep, "loss", sweep_kit.phases)  # the sweep ranks by loss, lowest first
    best = min(finals, key=finals.get)
    assert f"trial {best}" in output
    exported = load_config(out)
    assert exported == load_config(tiny_sweep.results_dir / "trial_configs" / f"{best}.yaml")
    # ...which is the config the trial logged to MLflow, every field of it.
    client = MlflowClient(tiny_sweep.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`imbcil.trial_id` = '{best}'")
    logged = load_config(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert exported == logged
    lines = header(out)
    assert any("sweep: tiny" in line for line in lines) and any(f"trial: {best}" in line for line in lines)
    assert any(f"final loss = {finals[best]:.6g}" in line for line in lines)
    assert any("Exported by imbcil export on 20" in line for line in lines)


@pytest.mark.e2e
def test_export_ranks_by_another_metric_and_rank(tiny_sweep, sweep_kit, tmp_path):
    finals = final_values(tiny_sweep, "avg_incremental_acc", sweep_kit.phases)
    ordered = sorted(finals, key=lambda t: (-finals[t], t))
    code, output = invoke(tiny_sweep.experiment_dir, "--metric", "avg_incremental_acc", "--mode", "max", "-o", tmp_path / "a.yaml")
    assert code == 0 and f"trial {ordered[0]}" in output
    code, output = invoke(tiny_sweep.experiment_dir, "--rank", len(ordered) + 1, "-o", tmp_path / "b.yaml")
    assert code == 2 and output.startswith(f"error: --rank: {len(ordered) + 1} asked for")
    assert not (tmp_path / "b.yaml").exists()


@pytest.mark.e2e
def test_export_by_mlflow_experiment_name_picks_the_same_trial(tiny_sweep, tmp_path):
    code, _ = invoke(tiny_sweep.experiment_dir, "-o", tmp_path / "from_folder.yaml")
    assert code == 0
    # The sweep's metric and mode (loss, min) come from its parent run's params.
    code, output = invoke("tiny", "--tracking-uri", tiny_sweep.tracking_uri, "-o", tmp_path / "from_mlflow.yaml")
    assert code == 0, output
    assert load_config(tmp_path / "from_mlflow.yaml") == load_config(tmp_path / "from_folder.yaml")
    assert any("MLflow experiment 'tiny'" in line for line in header(tmp_path / "from_mlflow.yaml"))


@pytest.mark.e2e
def test_the_exported_config_runs_unchanged_and_reproduces_the_trials_metric(tiny_sweep, sweep_kit, tmp_path):
    best_yaml = tmp_path / "best.yaml"
    code, _ = invoke(tiny_sweep.experiment_dir, "--metric", "avg_incremental_acc", "--mode", "max", "-o", best_yaml)
    assert code == 0
    finals = final_values(tiny_sweep, "avg_incremental_acc", sweep_kit.phases)
    best = max(finals, key=lambda t: (finals[t], t))
    uri = f"sqlite:///{tmp_path / 'run.db'}"
    # One thread, as the trial had (one CPU per trial): CPU kernels sum in thread-dependent order.
    done = subprocess.run(
        sweep_kit.cli_command("run", best_yaml, "--tracking-uri", uri, "--experiment", "rerun"),
        cwd=tmp_path, env=sweep_kit.cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert run.data.metrics["avg_incremental_acc"] == pytest.approx(finals[best], abs=1e-6)


def test_export_errors_are_one_line(tmp_path, unfinished_sweep):
    code, output = invoke(tmp_path / "no-such-sweep", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2 and output.startswith("error: ") and len(output.strip().splitlines()) == 1
    assert "no such sweep folder" in output and not (tmp_path / "none.db").exists()
    (tmp_path / "empty").mkdir()
    code, output = invoke(tmp_path / "empty")
    assert code == 2 and "not an imbcil sweep folder" in output and len(output.strip().splitlines()) == 1
    code, output = invoke(unfinished_sweep, "-o", tmp_path / "x.yaml")
    assert code == 2 and "no trial finished every phase" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
    code, output = invoke(unfinished_sweep, "--metric", "accuracy")
    assert code == 2 and output.startswith("error: --metric: must be one of")


@pytest.fixture
def unfinished_sweep(tmp_path, sweep_kit):
    """A sweep folder whose table holds no finished trial (only stopped and diverged ones)."""
    folder = tmp_path / "unfinished"
    (folder / "imbcil").mkdir(parents=True)
    spec = sweep_kit.write_sweep(tmp_path / "spec-source.yaml")
    (folder / "imbcil" / "sweep.yaml").write_text(yaml.safe_dump(load_sweep(spec).to_dict()))
    table = pa.table({
        "trial_id": ["a", "a"], "mlflow_run_id": ["r", "r"], "phase": pa.array([0, 0], pa.int32()),
        "metric": ["loss", "acc"], "value": [1.0, 10.0], "status": ["stopped", "stopped"],
    })  # fmt: skip
    pq.write_table(table, folder / "imbcil" / "trials.parquet")
    return folder


def recorded_sweep(tmp_path, sweep_kit, finals: dict[str, dict[str, float]], metric: str = "val_avg_incremental_acc"):
    """A sweep folder with recorded results: every trial finished, `finals` its last-phase values."""
    from pipeline.config import save_config

    folder = tmp_path / "recorded"
    (folder / "imbcil" / "trial_configs").mkdir(parents=True)
    spec = load_sweep(sweep_kit.write_sweep(tmp_path / "spec-source.yaml", tune={**sweep_kit.tune, "metric": metric, "mode": "max"}))
    (folder / "imbcil" / "sweep.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    rows = []
    for number, (trial_id, values) in enumerate(finals.items()):
        save_config(spec.trial_config({"train.lr": 0.05, "learner.dgr.lambda_b": 0.5 + number, "memory.per_class": 10}),
                    folder / "imbcil" / "trial_configs" / f"{trial_id}.yaml")  # fmt: skip
        for phase in range(sweep_kit.phases):
            for name, value in values.items():
                # Earlier phases score higher (accuracy falls as classes arrive): only the last counts.
                rows.append((trial_id, f"run-{trial_id}", phase, name, value + 10 * (sweep_kit.phases - 1 - phase), "finished"))
    columns = list(zip(*rows))
    table = pa.table({
        "trial_id": list(columns[0]), "mlflow_run_id": list(columns[1]), "phase": pa.array(columns[2], pa.int32()),
        "metric": list(columns[3]), "value": list(columns[4]), "status": list(columns[5]),
    })  # fmt: skip
    pq.write_table(table, folder / "imbcil" / "trials.parquet")
    return folder


def test_export_ranks_by_validation_where_the_best_test_value_is_another_trials(tmp_path, sweep_kit):
    from pipeline.export import read_selection

    finals = {
        "a": {"val_avg_incremental_acc": 40.0, "avg_incremental_acc": 30.0},
        "b": {"val_avg_incremental_acc": 35.0, "avg_incremental_acc": 38.0},  # the best on test
        "c": {"val_avg_incremental_acc": 20.0, "avg_incremental_acc": 25.0},
    }
    folder = recorded_sweep(tmp_path, sweep_kit, finals)
    out = tmp_path / "best.yaml"
    code, output = invoke(folder, "-o", out)
    assert code == 0, output
    assert "trial a (rank 1 of 3, final val_avg_incremental_acc 40.0000, test avg_incremental_acc 30.0000)" in " ".join(output.split())
    assert load_config(out) == load_config(folder / "imbcil" / "trial_configs" / "a.yaml")
    lines = header(out)
    assert "# selected by: val_avg_incremental_acc = 40 (validation data), sweep tiny, trial a; max is best" in lines
    assert "# final validation val_avg_incremental_acc = 40, test avg_incremental_acc = 30" in lines
    selection = read_selection(out)
    assert (selection.sweep, selection.trial_id, selection.metric, selection.value, selection.split) == (
        "tiny", "a", "val_avg_incremental_acc", 40.0, "validation"
    )
    # Asked to rank by the test metric, export picks b (and says the selection is on test data).
    code, output = invoke(folder, "--metric", "avg_incremental_acc", "-o", tmp_path / "test.yaml")
    assert code == 0 and "trial b" in output
    assert read_selection(tmp_path / "test.yaml").split == "test"
    assert read_selection(tmp_path / "spec-source.yaml") is None  # not an exported config
