"""A password in a tracking or storage URI never reaches a param, tag, artifact or the terminal.

The end-to-end tests talk to a real `mlflow server` through `http://user:s3cret@127.0.0.1:PORT`:
a server without authentication ignores the credentials, so every code path that handles the
URI runs exactly as against a protected server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from method.config import RunConfig
from pipeline import tracking
from pipeline.tracking import RunTracker, redact_text

SECRET = "s3cret"
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.dataset=cifar10", "data.train_fraction=0.02", "data.test_fraction=0.03",
    "protocol.first_task_classes=6", "protocol.incremental_tasks=2",
    "train.epochs=1", "train.milestones=[1]", "device=cpu", "name=secret-run",
]  # fmt: skip


@pytest.mark.parametrize(
    "text, expected",
    [
        ("API request to http://bob:s3cret@h:5000/api failed", "API request to http://bob:***@h:5000/api failed"),
        ("two: postgresql://a:s3cret@db/x and s3://k:s3cret@bucket/p", "two: postgresql://a:***@db/x and s3://k:***@bucket/p"),
        ("dsn host=db user=bob password=s3cret dbname=m", "dsn host=db user=bob password=*** dbname=m"),
        ("https://h/?token=s3cret&x=1", "https://h/?token=***&x=1"),
        ("no secret in http://h:5000 or /a/b:c", "no secret in http://h:5000 or /a/b:c"),
        ("MLFLOW_TRACKING_TOKEN is unset", "MLFLOW_TRACKING_TOKEN is unset"),
    ],
)
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def stored_texts(client: MlflowClient, tmp_path: Path):
    """(where, bytes) for every experiment, run name, param, tag and artifact file in a store."""
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        yield f"experiment {experiment.experiment_id}", repr((experiment.name, experiment.tags)).encode()
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL):
            run_id = run.info.run_id
            yield f"run {run_id} name", (run.info.run_name or "").encode()
            for key, value in {**run.data.params, **run.data.tags}.items():
                yield f"run {run_id} {key}", f"{key}={value}".encode()
            local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
            for path in local.rglob("*"):
                if path.is_file():
                    yield f"run {run_id} artifact {path.relative_to(local)}", path.read_bytes()


def assert_no_secret(client: MlflowClient, tmp_path: Path, *outputs: str) -> int:
    """Fails naming where the secret leaked; returns how many stored items were searched."""
    count = 0
    for where, data in stored_texts(client, tmp_path / "downloads"):
        count += 1
        assert SECRET.encode() not in data, f"the password is in {where}"
    for output in outputs:
        assert SECRET not in output, output[-2000:]
    return count


def test_tracker_redacts_config_tags_run_name_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RunConfig()
    cfg.data.root = f"s3://alice:{SECRET}@bucket/data"
    with pytest.raises(RuntimeError):
        with RunTracker(uri, "secrets", run_name=f"from postgresql://bob:{SECRET}@db/m",
                        tags={"imbcil.storage": f"s3://alice:{SECRET}@bucket/ray"}) as tracker:  # fmt: skip
            tracker.log_config(cfg, extra_tags={"where": f"dsn password={SECRET} host=db"})
            raise RuntimeError(f"could not reach http://bob:{SECRET}@mlflow:5000/api/2.0/runs")
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["data.root"] == "s3://alice:***@bucket/data"
    assert run.data.tags["imbcil.storage"] == "s3://alice:***@bucket/ray"
    assert run.data.tags[tracking.ERROR_TAG] == "could not reach http://bob:***@mlflow:5000/api/2.0/runs"
    assert run.info.status == "FAILED"
    config_yaml = yaml.safe_load(Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config_yaml["data"]["root"] == "s3://alice:***@bucket/data"
    assert assert_no_secret(client, tmp_path) > 50
    # A resumed run compares redacted values with redacted values: the same config passes.
    with RunTracker(uri, "secrets", run_id=tracker.run_id) as again:
        again.log_config(cfg)


@pytest.mark.e2e
def test_run_check_and_sweep_through_a_uri_with_a_password(tmp_path, mlflow_server, data_root, capsys):
    server = mlflow_server("sqlite")
    port = server.url.rsplit(":", 1)[1]
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["PYTHONUNBUFFERED"] = "1"

    def cli(*args, timeout=600):
        command = [sys.executable, "-m", "pipeline.cli", *[str(a) for a in args]]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    code, run_out, run_err = cli("run", REPO / "configs" / "quickstart.yaml", *TINY, "--data-root", data_root, "--tracking-uri", uri)
    assert code == 0, run_out + run_err
    assert f"http://127.0.0.1:{port}/#/experiments/" in run_out  # the link, without credentials

    code, check_out, check_err = cli("check", "--tracking-uri", uri)
    assert code == 0, check_out + check_err
    assert "alice:***@" in check_out

    sweep = {
        "base": {k: v for k, v in (item.split("=", 1) for item in TINY)},
        "space": {"train.lr": {"loguniform": [0.01, 0.1]}},
        "tune": {"name": "secret-sweep", "num_samples": 1, "max_concurrent": 1, "scheduler": "none", "resources_per_trial": {"cpu": 1}},
    }
    sweep["base"] = yaml.safe_load(yaml.safe_dump(_nested(sweep["base"])))
    sweep_file = tmp_path / "secret.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    storage = tmp_path / "ray_results"
    code, sweep_out, sweep_err = cli("sweep", sweep_file, "--data-root", data_root, "--tracking-uri", uri, "--storage", storage)
    assert code == 0, sweep_out + sweep_err

    # A dead server: the error line names it, redacted.
    code, dead_out, dead_err = cli("run", REPO / "configs" / "quickstart.yaml", *TINY, "--data-root", data_root,
                                   "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:9")  # fmt: skip
    assert code == 2 and "alice:***@127.0.0.1:9" in dead_err

    # A run ended straight through MLflow's client (as the sweep driver ends stopped trials):
    # MLflow's own "View run ... at <URI>" line stays silent.
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("secret-sweep").experiment_id).info.run_id
    client.set_terminated(run_id, status="KILLED")
    printed = capsys.readouterr()

    searched = assert_no_secret(MlflowClient(server.url), tmp_path, run_out, run_err, check_out, check_err,
                                sweep_out, sweep_err, dead_out, dead_err, printed.out, printed.err)  # fmt: skip
    assert searched > 100
    # Ray's own records of the sweep (experiment state, trial results and params) too.
    for path in storage.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the password is in {path}"


def _nested(flat: dict) -> dict:
    """{"data.dataset": "cifar10"} -> {"data": {"dataset": "cifar10"}}, values parsed as YAML."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out
