"""`imbcil sweep`: sweep-file validation, and a tiny real-data sweep read back from MLflow and Parquet."""

from __future__ import annotations

import json
import math
import re
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from method.results import METRIC_NAMES
from pipeline.cli import app
from pipeline.config import ConfigError, load_config
from pipeline.sweep.spec import (
    Distribution,
    differing_key,
    load_sweep,
    spec_from_resolved,
    sweep_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------
# Sweep files


def spec(kit, space=None, tune=None, base=None):
    return sweep_from_dict({"base": base or kit.base, "space": space or kit.space, "tune": tune or kit.tune})


def test_tiny_spec_resolves_base_space_and_tune(sweep_kit):
    s = spec(sweep_kit)
    assert s.name == "tiny" and s.max_phases == sweep_kit.phases
    assert s.base.train.epochs == 1 and s.base.train.weight_decay == 5e-4  # resolved dataset defaults
    assert s.space["train.lr"] == Distribution("categorical", (sweep_kit.good_lr, sweep_kit.bad_lr, sweep_kit.diverging_lr))
    assert s.tune.metric == "loss" and s.tune.resources_per_trial == {"cpu": 1.0, "gpu": 0.0}
    dists = s.optuna_space()
    assert dists["memory.per_class"] == optuna.distributions.IntDistribution(5, 30)
    assert dists["learner.dgr.lambda_b"] == optuna.distributions.FloatDistribution(0.1, 2.0)
    cfg = s.trial_config({"train.lr": 30.0, "learner.dgr.lambda_b": 0.5, "memory.per_class": 7})
    assert (cfg.train.lr, cfg.learner.dgr.lambda_b, cfg.memory.per_class) == (30.0, 0.5, 7)
    assert cfg.seed == s.base.seed and cfg.data.train_fraction == 0.04


def test_a_staged_sweep_searches_the_first_task_on_phase_0_alone_first(sweep_kit):
    space = {"learner.dgr.lambda_b": {"uniform": [0.1, 2.0]}}
    first_task = {"space": {"train.first_task.lr": {"loguniform": [0.02, 0.5]}}, "num_samples": 3}
    tune = {**sweep_kit.tune, "points_to_evaluate": []}
    s = sweep_from_dict({"base": sweep_kit.base, "space": space, "tune": tune, "first_task": first_task})
    first = s.first_stage()
    assert first.name == "tiny-first-task" and list(first.space) == ["train.first_task.lr"]
    assert (first.phases, first.max_phases, first.tune.num_samples, first.tune.scheduler) == (1, 1, 3, "none")
    assert first.tune.metric == s.tune.metric and first.tune.points_to_evaluate == []
    second = s.with_first_task_of({"train.first_task.lr": 0.07})
    assert second.base.train.first_task.lr == 0.07 and second.base.train.lr == s.base.train.lr and second.name == "tiny"
    again = spec_from_resolved(yaml.safe_load(yaml.safe_dump(s.to_dict())))
    assert again.to_dict() == s.to_dict() and differing_key(again, s) is None
    assert differing_key(first, spec_from_resolved(s.to_dict())) == "phases"
    unstaged = sweep_from_dict({"base": sweep_kit.base, "space": space, "tune": tune})
    assert unstaged.first_stage() is None and unstaged.max_phases == sweep_kit.phases


@pytest.mark.parametrize(
    "first_task, message",
    [
        ({"space": {"memory.per_class": {"int": [5, 10]}}}, "first_task.space.memory.per_class: does not change phase 0, so phase 0 alone cannot choose it; search it in space"),
        ({"space": {"learner.dgr.lambda_b": {"uniform": [0.1, 1.0]}}}, "first_task.space.learner.dgr.lambda_b: is searched by the main space too; search it in one stage"),
        ({"space": {"train.first_task.lr": {"loguniform": [0.02, 0.5]}}, "epochs": 3}, "first_task.epochs: unknown key (first_task has space and num_samples)"),
        ({"space": {}}, "first_task.space: empty"),
        ({"space": {"train.first_task.lr": {"loguniform": [0.02, 0.5]}}, "num_samples": 0}, "first_task.num_samples: must be"),
    ],
)
def test_a_first_stage_that_cannot_work_is_one_line(sweep_kit, first_task, message):
    space = {"learner.dgr.lambda_b": {"uniform": [0.1, 2.0]}}
    tune = {**sweep_kit.tune, "points_to_evaluate": []}
    with pytest.raises(ConfigError) as caught:
        sweep_from_dict({"base": sweep_kit.base, "space": space, "tune": tune, "first_task": first_task})
    assert str(caught.value).startswith(message)


def test_defaults_and_resolved_round_trip(sweep_kit):
    s = sweep_from_dict({"base": sweep_kit.base, "space": {"train.lr": {"loguniform": [0.01, 0.5]}}}, default_name="from-file")
    assert s.name == "from-file"
    assert (s.tune.metric, s.tune.mode, s.tune.scheduler) == ("val_avg_incremental_acc", "max", "asha")
    again = spec_from_resolved(yaml.safe_load(yaml.safe_dump(s.to_dict())))
    assert again.to_dict() == s.to_dict() and differing_key(again, s) is None
    moved = spec_from_resolved(s.to_dict())
    moved.base.data.root = "/elsewhere"  # where a resumed sweep reads its data may change
    assert differing_key(moved, s) is None
    moved.base.train.epochs = 2
    assert differing_key(moved, s) == "base.train.epochs"


def test_base_may_be_a_path_relative_to_the_sweep_file(tmp_path, sweep_kit):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml.safe_dump(sweep_kit.base))
    path = sweep_kit.write_sweep(tmp_path / "sweep.yaml", base="configs/tiny.yaml")
    s = load_sweep(path, overrides=["train.epochs=2"])
    assert s.base.data.dataset == "cifar10" and s.base.train.epochs == 2


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_sweeps_validate(path):
    s = load_sweep(path)
    assert s.name == path.stem
    if path.stem == "quickstart":
        return
    # Every file searches the lr and the memory, and the knobs of its own learner alone.
    learner = s.base.learner.name
    assert {"train.lr", "memory.budget"} <= set(s.space)
    own = {k for k in s.space if k.startswith("learner.")}
    assert own and all(k.startswith(f"learner.{learner}.") for k in own), (learner, own)
    if learner == "dgr":
        assert {"learner.dgr.lambda_b", "learner.dgr.beta_schedule"} <= own
    else:  # the paper's competitors' rows are their two-stage runs
        assert s.base.learner.two_stage == "lws" and path.stem.endswith(f"_{learner}")


def test_paper_settings_ship_one_sweep_each():
    names = {p.stem for p in SHIPPED}
    for dataset in ("cifar100_lt", "imagenet_subset_lt", "food101_lt"):
        assert {f"{dataset}_{p}" for p in ("lfs10", "lfs20", "lfh5", "lfh10")} <= names
    assert {"cifar10_lt_lfs5", "cifar10_lt_lfh5", "quickstart"} <= names
    # The competitors beside DGR, with DGR's search budget.
    for setting in ("cifar10_lt_lfs5", "cifar100_lt_lfs10"):
        dgr = load_sweep(REPO / "sweeps" / f"{setting}.yaml")
        for learner in ("lucir", "podnet", "eeil"):
            other = load_sweep(REPO / "sweeps" / f"{setting}_{learner}.yaml")
            assert other.base.learner.name == learner
            assert (other.tune.num_samples, other.tune.max_concurrent, other.base.train.epochs) == (
                dgr.tune.num_samples, dgr.tune.max_concurrent, dgr.base.train.epochs)
    food = load_sweep(REPO / "sweeps" / "food101_lt_lfs10.yaml").base.protocol
    assert (food.first_task_classes, food.incremental_tasks) == (11, 9)


# (section, value, merge into the tiny sweep's section?) -> the error's start
BAD_FILES = [
    ("space", {"train.lrr": {"uniform": [0.1, 1]}}, False, "space.train.lrr: unknown config key"),
    ("space", {}, False, "space: empty"),
    ("space", {"train.lr": {"loguniform": [0, 1]}}, False, "space.train.lr.loguniform: low must be > 0"),
    ("space", {"train.lr": {"uniform": [1.0, 0.1]}}, False, "space.train.lr.uniform: low must be < high"),
    ("space", {"train.momentum": {"uniform": [0.5, 1.0]}}, False, "space.train.momentum.uniform: 1.0 gives an invalid run config"),
    ("space", {"memory.per_class": {"uniform": [5, 30]}}, False, "space.memory.per_class.uniform: memory.per_class takes integers"),
    ("space", {"train.lr": {"normal": [0, 1]}}, False, "space.train.lr.normal: unknown distribution"),
    (
        "space", {"memory.budget": {"categorical": ["per_class", "total"]}, "memory.total": {"int": [5, 100]}}, False,
        "space: the point {memory.budget='total', memory.total=5} gives an invalid run config: memory.total",
    ),  # fmt: skip
    ("tune", {"scheduler": "hyperband"}, True, "tune.scheduler: must be one of asha, median, none"),
    ("tune", {"grace_period": 4}, True, "tune.grace_period: 4 phases exceeds the 3 phases"),
    ("tune", {"concurrency": 2}, True, "tune.concurrency: unknown key"),
    ("tune", {"resources_per_trial": {"cpu": 0}}, True, "tune.resources_per_trial.cpu: must be > 0"),
    # A trial Ray gives no GPU trains on the CPU, so a config that insists on cuda is refused.
    ("base", {"device": "cuda"}, True, "tune.resources_per_trial.gpu: the base config asks for device cuda but trials get no GPU"),
    ("base", {"learner": {"name": "sgd"}}, True, "base.learner.name: must be one of"),
    ("extra", 1, False, "extra: unknown key"),
]


@pytest.mark.parametrize("section, value, merge, expected", BAD_FILES, ids=[c[-1].split(":")[0] for c in BAD_FILES])
def test_bad_sweep_files_fail_with_one_line_before_ray_starts(tmp_path, sweep_kit, section, value, merge, expected):
    import ray

    sections = {"base": sweep_kit.base, "space": sweep_kit.space, "tune": sweep_kit.tune}
    sections[section] = {**sections[section], **value} if merge else value
    path = sweep_kit.write_sweep(tmp_path / "bad.yaml", **sections)
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        load_sweep(path)
    result = CliRunner().invoke(app, ["sweep", str(path), "--storage", str(tmp_path / "store")], catch_exceptions=False)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.output
    assert not ray.is_initialized() and not (tmp_path / "store").exists()


@pytest.mark.parametrize("case", ["tracking server down", "unwritable storage", "dataset missing", "no room for a trial"])
def test_preflight_failures_stop_the_sweep_before_ray_with_one_line(tmp_path, sweep_kit, data_root, unused_port, case):
    import ray

    tune = dict(sweep_kit.tune, resources_per_trial={"cpu": 1, "gpu": 1}) if case == "no room for a trial" else sweep_kit.tune
    base = dict(sweep_kit.base, device="auto") if case == "no room for a trial" else sweep_kit.base
    path = sweep_kit.write_sweep(tmp_path / "tiny.yaml", base=base, tune=tune)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage, data = tmp_path / "store", data_root
    expected = {
        "tracking server down": f"error: preflight: tracking store: tracking server http://127.0.0.1:{unused_port} is not reachable",
        "unwritable storage": f"error: preflight: storage: {tmp_path / 'a_file' / 'store'} is not writable",
        "dataset missing": "error: preflight: dataset: CIFAR-10 not found",
        "no room for a trial": "error: preflight: ray cluster: a trial asks for 1 CPU + 1 GPU",
    }[case]
    if case == "tracking server down":
        uri = f"http://127.0.0.1:{unused_port}"
    elif case == "unwritable storage":
        (tmp_path / "a_file").write_text("not a folder")
        storage = tmp_path / "a_file" / "store"
    elif case == "dataset missing":
        data = tmp_path / "empty"
        data.mkdir()
    args = ["sweep", path, "--storage", storage, "--data-root", data, "--tracking-uri", uri]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.output
    assert not ray.is_initialized()
    if case != "tracking server down":  # nothing of the sweep reached the store
        assert {e.name for e in MlflowClient(uri).search_experiments()} <= {"Default", "imbcil-preflight"}


def test_cli_refuses_searched_overrides_missing_files_data_and_resumes(tmp_path, sweep_kit, monkeypatch):
    monkeypatch.delenv("IMBCIL_DATA", raising=False)
    path = sweep_kit.write_sweep(tmp_path / "tiny.yaml")

    def invoke(*args):
        result = CliRunner().invoke(app, ["sweep", *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert invoke(path, "train.lr=0.1").startswith("error: train.lr: is searched by the sweep")
    assert "config file not found" in invoke(tmp_path / "missing.yaml")
    assert invoke(path, "--storage", tmp_path / "store").startswith("error: no data root for cifar10")
    assert invoke(path, "--data-root", tmp_path / "nowhere").startswith(f"error: data root {tmp_path / 'nowhere'} does not exist")
    resumed = invoke(path, "--resume", "--storage", tmp_path / "store", "--data-root", tmp_path)
    assert resumed.startswith("error: --resume: no sweep 'tiny'")
    assert not (tmp_path / "store").exists()


def test_a_sweep_measured_with_the_image_weighted_validation_metric_is_not_resumed(tmp_path, data_root, sweep_kit):
    # A sweep folder as an imbcil of before the class-balanced metric left it: its parent-run record
    # has no metric version.
    path = sweep_kit.write_sweep(tmp_path / "tiny.yaml")
    results = tmp_path / "store" / "tiny" / "imbcil"
    results.mkdir(parents=True)
    saved = load_sweep(path, data_root=str(data_root))
    (results / "sweep.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
    (results / "parent_run.json").write_text(json.dumps({"run_id": "0" * 32, "experiment": "tiny"}))
    result = CliRunner().invoke(app, ["sweep", str(path), "--resume", "--storage", str(tmp_path / "store"),
                                      "--data-root", str(data_root), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "sweep 'tiny'" in result.output and "version 1 (image-weighted)" in result.output
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was opened


# ---------------------------------------------------------------------------------------------
# Driver pieces that need no Ray cluster


def test_trials_rank_finished_first_by_their_final_value():
    from pipeline.sweep.results import TrialSummary, rank_trials

    def trial(trial_id, status, *values):
        return TrialSummary(trial_id, status, {}, 3, {p: {"acc": v} for p, v in enumerate(values)})

    trials = [
        trial("a", "finished", 50.0, 40.0, 30.0), trial("b", "stopped", 90.0), trial("c", "finished", 50.0, 45.0, 35.0),
        trial("d", "diverged"), trial("e", "failed"), trial("f", "finished", 60.0, 50.0, math.nan),
    ]  # fmt: skip
    assert [t.trial_id for t in rank_trials(trials, "acc", "max")] == ["c", "a", "f", "b", "d", "e"]
    assert [t.trial_id for t in rank_trials(trials, "acc", "min")][:3] == ["a", "c", "f"]


def test_a_sweep_that_selects_on_test_data_is_named_so(sweep_kit):
    from pipeline.sweep.spec import test_selection_warning

    assert test_selection_warning(spec(sweep_kit, tune={**sweep_kit.tune, "metric": "val_avg_incremental_acc"})) is None
    assert test_selection_warning(spec(sweep_kit)) is None  # loss: training data, not the test set
    line = test_selection_warning(spec(sweep_kit, tune={**sweep_kit.tune, "metric": "avg_incremental_acc"}))
    assert line == (
        "warning: tune.metric avg_incremental_acc is measured on the test set, so this sweep selects on test data; "
        "val_avg_incremental_acc is its validation counterpart"
    )


def test_the_cli_prints_the_test_selection_line_first(tmp_path, sweep_kit, monkeypatch):
    monkeypatch.delenv("IMBCIL_DATA", raising=False)
    path = sweep_kit.write_sweep(tmp_path / "tiny.yaml", tune={**sweep_kit.tune, "metric": "acc", "mode": "max"})
    result = CliRunner().invoke(app, ["sweep", str(path), "--storage", str(tmp_path / "store")], catch_exceptions=False)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2, result.output  # the warning, then the data-root error
    assert lines[0].startswith("warning: tune.metric acc is measured on the test set, so this sweep selects on test data")
    assert lines[1].startswith("error: no data root")


def test_a_sweep_says_where_its_trials_run():
    from pipeline.sweep.driver import trial_placement

    assert trial_placement({"cpu": 1.0, "gpu": 0.0}) == "trials run on the CPU (1 core(s) each; tune.resources_per_trial.gpu is 0)"
    assert trial_placement({"cpu": 4.0, "gpu": 0.5}) == "trials run on the GPU (0.5 GPU and 4 core(s) each)"


def test_the_leaderboard_ranks_by_validation_and_shows_the_test_metric_beside(sweep_kit):
    from pipeline.sweep.results import TrialSummary, leaderboard_markdown, leaderboard_rows, rank_trials

    s = spec(sweep_kit, tune={**sweep_kit.tune, "metric": "val_avg_incremental_acc", "mode": "max"})

    def trial(trial_id, val, test, reused=()):
        phases = {
            p: {"val_avg_incremental_acc": val + 10 - 5 * p, "avg_incremental_acc": test + 10 - 5 * p, "phase_reused": float(p in reused)}
            for p in range(3)
        }
        return TrialSummary(trial_id, "finished", {"train.lr": 0.05}, 3, phases)

    trials = rank_trials([trial("a", 30.0, 40.0), trial("b", 35.0, 20.0, reused=(0, 1))], s.tune.metric, s.tune.mode)
    assert [t.trial_id for t in trials] == ["b", "a"]  # b is better on validation, a on test
    rows = leaderboard_rows(trials, s)
    assert (rows[0]["final"], rows[0]["final avg_incremental_acc"]) == (35.0, 20.0)
    lines = leaderboard_markdown(trials, s).splitlines()
    assert lines[0].endswith("| val_avg_incremental_acc by phase | final | final avg_incremental_acc | reused |")
    assert lines[2].startswith("| 1 | b |") and lines[2].endswith("| 45.00 40.00 35.00 | 35.00 | 20.00 | 2/3 |")
    assert lines[3].endswith("| 0/3 |")
    assert lines[-1] == "2 of 6 phases reused from the phase store"
    assert [row["phases_reused"] for row in rows] == [2, 0]


# ---------------------------------------------------------------------------------------------
# A tiny sweep on real data (the session fixture `tiny_sweep` runs it once)


def trial_runs(client: MlflowClient, experiment: str = "tiny"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("imbcil.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("imbcil.kind") == "trial"]
    return exp, parents, trials


def by_lr(client, trials):
    grouped: dict[float, list] = {}
    for run in trials:
        grouped.setdefault(float(run.data.params["train.lr"]), []).append(run)
    return grouped


@pytest.mark.e2e
def test_proposals_lie_in_the_space_and_differ(tiny_sweep, sweep_kit):
    good_lr, bad_lr, diverging_lr = sweep_kit.good_lr, sweep_kit.bad_lr, sweep_kit.diverging_lr
    configs = {p.stem: load_config(p) for p in (tiny_sweep.results_dir / "trial_configs").glob("*.yaml")}
    assert len(configs) == 4
    points = []
    for trial_id, cfg in configs.items():
        assert cfg.train.lr in (good_lr, bad_lr, diverging_lr)
        assert 0.1 <= cfg.learner.dgr.lambda_b <= 2.0
        assert 5 <= cfg.memory.per_class <= 30 and isinstance(cfg.memory.per_class, int)
        point = (cfg.train.lr, cfg.learner.dgr.lambda_b, cfg.memory.per_class)
        # Everything but the sampled keys is the base config.
        expected = load_sweep(tiny_sweep.sweep_file).trial_config(
            {"train.lr": point[0], "learner.dgr.lambda_b": point[1], "memory.per_class": point[2]}
        )
        expected.data.root = cfg.data.root
        assert cfg == expected, trial_id
        points.append(point)
    assert len(set(points)) == 4
    assert sorted(p[0] for p in points) == [good_lr, good_lr, bad_lr, diverging_lr]  # the sweep's points, see conftest


@pytest.mark.e2e
def test_mlflow_holds_the_parent_and_one_child_per_trial_with_each_phase_once(tiny_sweep):
    client = MlflowClient(tiny_sweep.tracking_uri)
    exp, parents, trials = trial_runs(client)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    trial_ids = [r.data.tags["imbcil.trial_id"] for r in trials]
    assert len(set(trial_ids)) == 4
    assert set(trial_ids) == {p.stem for p in (tiny_sweep.results_dir / "trial_configs").glob("*.yaml")}
    for run in trials:
        assert run.data.tags["imbcil.sweep"] == "tiny"
        logged = run.data.tags.get("imbcil.last_phase")
        phases = 0 if logged is None else int(logged) + 1
        for name in ("acc", "avg_incremental_acc", "loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert steps == sorted(set(steps)) and steps == list(range(phases)), (name, steps)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_file.yaml", "sweep.yaml", "search_space.json", "leaderboard.csv", "leaderboard.md", "trials.parquet", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "optimization_history.png" in plots
    assert parent.data.metrics["trials_finished"] >= 1 and parent.data.metrics["trials_diverged"] == 1


@pytest.mark.e2e
def test_asha_stops_the_weak_trial_at_a_phase_boundary(tiny_sweep, sweep_kit):
    good_lr, bad_lr, phases = sweep_kit.good_lr, sweep_kit.bad_lr, sweep_kit.phases
    client = MlflowClient(tiny_sweep.tracking_uri)
    _, _, trials = trial_runs(client)
    (weak,) = by_lr(client, trials)[bad_lr]
    assert weak.info.status == "FINISHED"  # stopped early is not a failure
    assert weak.data.tags["imbcil.stopped_early"] == "true"
    assert weak.data.tags["imbcil.last_phase"] == "0"
    assert [m.step for m in client.get_metric_history(weak.info.run_id, "loss")] == [0]
    for good in by_lr(client, trials)[good_lr]:
        assert good.info.status == "FINISHED" and int(good.data.tags["imbcil.last_phase"]) >= 1
    finished = [r for r in by_lr(client, trials)[good_lr] if r.data.tags.get("imbcil.stopped_early") != "true"]
    assert finished and all(r.data.tags["imbcil.last_phase"] == str(phases - 1) for r in finished)


@pytest.mark.e2e
def test_a_diverging_trial_fails_with_its_reason_once_and_the_others_go_on(tiny_sweep, sweep_kit):
    diverging_lr = sweep_kit.diverging_lr
    client = MlflowClient(tiny_sweep.tracking_uri)
    _, _, trials = trial_runs(client)
    (diverged,) = by_lr(client, trials)[diverging_lr]  # one run: Ray did not retry it
    assert diverged.info.status == "FAILED"
    error = diverged.data.tags["imbcil.error"]
    assert error.startswith("diverged: training loss became nan in phase 0"), error
    assert diverged.data.tags["imbcil.diverged"] == "true"
    trial_dir = tiny_sweep.experiment_dir / f"trial_{diverged.data.tags['imbcil.trial_id']}"
    assert not (trial_dir / "error.txt").exists()  # ended by the trial itself, not as a Ray error
    assert sum(r.info.status == "FINISHED" for r in trials) == 3
    assert "diverged" in tiny_sweep.stdout and "diverged: training loss became nan" in tiny_sweep.stdout


@pytest.mark.e2e
def test_the_parquet_table_has_one_row_per_trial_phase_and_metric(tiny_sweep, sweep_kit):
    phases = sweep_kit.phases
    table = pq.read_table(tiny_sweep.results_dir / "trials.parquet")
    assert {"trial_id", "mlflow_run_id", "phase", "metric", "value", "status", "params", *sweep_kit.space} <= set(table.column_names)
    rows = table.to_pylist()
    keys = [(r["trial_id"], r["phase"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    status = {r["trial_id"]: r["status"] for r in rows}
    seen_phases: dict[str, set] = {}
    for r in rows:
        seen_phases.setdefault(r["trial_id"], set()).add(r["phase"])
        assert r["metric"] in METRIC_NAMES and r["train.lr"] == json.loads(r["params"])["train.lr"]
    for trial_id, seen in seen_phases.items():
        expected = phases if status[trial_id] == "finished" else len(seen)
        assert seen == set(range(expected))
        metrics = {r["metric"] for r in rows if r["trial_id"] == trial_id and r["phase"] == 0}
        assert {"acc", "avg_incremental_acc", "loss", "forgetting"} <= metrics
    assert sorted(status.values()).count("finished") >= 1 and "stopped" in status.values()
    # The diverged trial has no completed phase, so it has no rows; the leaderboard lists it.
    assert len(seen_phases) == 3
    client = MlflowClient(tiny_sweep.tracking_uri)
    for r in rows:
        if r["metric"] == "avg_incremental_acc":
            history = client.get_metric_history(r["mlflow_run_id"], "avg_incremental_acc")
            assert math.isclose(next(m.value for m in history if m.step == r["phase"]), r["value"], rel_tol=1e-12)


@pytest.mark.e2e
def test_the_leaderboard_is_printed_best_first(tiny_sweep, sweep_kit):
    phases = sweep_kit.phases
    title = "sweep tiny: loss per phase (min is best)"
    assert title in tiny_sweep.stdout
    out = tiny_sweep.stdout[tiny_sweep.stdout.index(title):]  # the progress lines name trials too
    table = pq.read_table(tiny_sweep.results_dir / "trials.parquet").to_pylist()
    finals = {r["trial_id"]: r["value"] for r in table if r["metric"] == "loss" and r["phase"] == phases - 1 and r["status"] == "finished"}
    best = min(finals, key=finals.get)
    assert f"best trial {best}" in out
    assert out.index(best) < min(out.index(t) for t in {r["trial_id"] for r in table} - {best})


# ---------------------------------------------------------------------------------------------
# Resume after the driver is killed


def wait_for(predicate, timeout_s: float, process: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended early with {process.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"nothing happened within {timeout_s:g} s")


def finished_trial_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`imbcil.kind` = 'trial' and attributes.status = 'FINISHED'")


@pytest.mark.e2e
def test_a_killed_sweep_resumes_without_rerunning_or_duplicating_trials(tmp_path, data_root, sweep_kit):
    kit, phases = sweep_kit, sweep_kit.phases
    tune = {**kit.tune, "name": "resumable", "num_samples": 3, "scheduler": "none", "metric": "avg_incremental_acc", "mode": "max", "points_to_evaluate": []}
    space = {"train.lr": {"categorical": [kit.good_lr]}, "learner.dgr.lambda_b": {"uniform": [0.1, 2.0]}}
    sweep_file = kit.write_sweep(tmp_path / "resumable.yaml", space=space, tune=tune)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", sweep_file, "--data-root", data_root, "--storage", tmp_path / "ray_results", "--tracking-uri", uri]
    log = open(tmp_path / "first.log", "w")
    # A session of its own: the kill takes Ray's processes (same process group) with the driver.
    first = subprocess.Popen(kit.cli_command(*args), cwd=tmp_path, env=kit.cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        (done_first,) = wait_for(lambda: finished_trial_runs(uri, "resumable")[:1], 600, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        log.close()
    killed_at = int(time.time() * 1000)
    time.sleep(1)

    resumed = subprocess.run(kit.cli_command(*args, "--resume"), cwd=tmp_path, env=kit.cli_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client = MlflowClient(uri)
    exp, parents, trials = trial_runs(client, "resumable")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3, [(r.data.tags.get("imbcil.trial_id"), r.info.status) for r in trials]
    assert len({r.data.tags["imbcil.trial_id"] for r in trials}) == 3
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["imbcil.last_phase"] == str(phases - 1)
        for name in ("avg_incremental_acc", "val_avg_incremental_acc"):  # each phase once, on both splits
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert steps == list(range(phases)), (name, steps)
    # The trial that had finished before the kill was not trained again.
    history = client.get_metric_history(done_first.info.run_id, "avg_incremental_acc")
    assert len(history) == phases and all(m.timestamp < killed_at for m in history)
    table = pq.read_table(tmp_path / "ray_results" / "resumable" / "imbcil" / "trials.parquet").to_pylist()
    assert {r["trial_id"] for r in table} == {r.data.tags["imbcil.trial_id"] for r in trials}
    assert {r["status"] for r in table} == {"finished"}
    assert "resuming sweep resumable" in resumed.stdout


# ---------------------------------------------------------------------------------------------
# Selection on validation, and a resumed sweep that decides as the uninterrupted one


# A good and a bad learning rate first, so that ASHA has a trial to stop; then three of TPE's own.
ONE_AT_A_TIME = {
    "name": "steady", "metric": "val_avg_incremental_acc", "mode": "max", "num_samples": 5, "max_concurrent": 1,
    "scheduler": "asha", "grace_period": 1, "reduction_factor": 2, "resources_per_trial": {"cpu": 1}, "max_failures": 1,
    "points_to_evaluate": [{"train.lr": 0.05, "learner.dgr.lambda_b": 1.0}, {"train.lr": 30.0, "learner.dgr.lambda_b": 1.0}],
}  # fmt: skip
STEADY_SPACE = {"train.lr": {"loguniform": [0.005, 30.0]}, "learner.dgr.lambda_b": {"uniform": [0.1, 2.0]}}


def sweep_args(kit, folder: Path, data_root):
    tune = {**ONE_AT_A_TIME, "searcher_seed": kit.tune["searcher_seed"]}
    sweep_file = kit.write_sweep(folder / "steady.yaml", space=STEADY_SPACE, tune=tune)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, ["sweep", sweep_file, "--data-root", data_root, "--storage", folder / "ray_results", "--tracking-uri", uri]


def decisions(uri: str) -> list[tuple[dict, int, bool]]:
    """Each trial in the order it started: its sampled values, last phase and whether ASHA stopped it."""
    client = MlflowClient(uri)
    _, _, trials = trial_runs(client, "steady")
    return [
        (json.loads(r.data.tags["imbcil.params"]), int(r.data.tags.get("imbcil.last_phase", -1)), r.data.tags.get("imbcil.stopped_early") == "true")
        for r in sorted(trials, key=lambda r: r.info.start_time)
    ]


@pytest.fixture(scope="module")
def steady_sweep(tmp_path_factory, data_root, sweep_kit):
    """The one-trial-at-a-time sweep, run without interruption."""
    folder = tmp_path_factory.mktemp("steady")
    uri, args = sweep_args(sweep_kit, folder, data_root)
    done = subprocess.run(sweep_kit.cli_command(*args), cwd=folder, env=sweep_kit.cli_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return SimpleNamespace(folder=folder, uri=uri, experiment_dir=folder / "ray_results" / "steady", stdout=done.stdout)


@pytest.mark.e2e
def test_trials_report_the_validation_metric_each_phase_and_optuna_learns_it(steady_sweep, sweep_kit):
    client = MlflowClient(steady_sweep.uri)
    _, _, trials = trial_runs(client, "steady")
    finals = {}
    for run in trials:
        trial_id = run.data.tags["imbcil.trial_id"]
        reported = [json.loads(line) for line in (steady_sweep.experiment_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_avg_incremental_acc")}
        assert [r["phase"] for r in reported] == sorted(logged) == list(range(int(run.data.tags["imbcil.last_phase"]) + 1))
        assert all(math.isclose(r["val_avg_incremental_acc"], logged[r["phase"]]) for r in reported)
        if run.data.tags.get("imbcil.stopped_early") != "true":
            finals[json.dumps(json.loads(run.data.tags["imbcil.params"]), sort_keys=True)] = (
                logged[sweep_kit.phases - 1], run.data.metrics["avg_incremental_acc"],
            )  # fmt: skip
    assert finals, "no trial finished"
    # The searcher's own study (Tune's saved searcher state) holds the validation values.
    (state_file,) = steady_sweep.experiment_dir.glob("searcher-state-*.pkl")
    with open(state_file, "rb") as handle:
        study = pickle.load(handle)["_ot_study"]
    complete = {json.dumps(t.params, sort_keys=True): t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert complete.keys() == finals.keys()
    for params, value in complete.items():
        validation, test = finals[params]
        assert value == pytest.approx(validation) and value != pytest.approx(test)
    # The leaderboard ranks by validation and shows the test metric beside it.
    assert "final avg_incremental_acc" in steady_sweep.stdout and "warning: tune.metric" not in steady_sweep.stdout


@pytest.mark.e2e
def test_a_sweep_killed_and_resumed_decides_as_the_uninterrupted_one(steady_sweep, tmp_path, data_root, sweep_kit):
    expected = decisions(steady_sweep.uri)
    assert any(stopped for _, _, stopped in expected), "the uninterrupted sweep should stop a trial for this test to mean anything"
    uri, args = sweep_args(sweep_kit, tmp_path, data_root)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(
            sweep_kit.cli_command(*args), cwd=tmp_path, env=sweep_kit.cli_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:  # killed after four phase reports: the second trial has reported its first phase
            wait_for(lambda: len(re.findall(r"phase \d+/\d+:", log_path.read_text())) >= 4, 600, first)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    resumed = subprocess.run(sweep_kit.cli_command(*args, "--resume"), cwd=tmp_path, env=sweep_kit.cli_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert decisions(uri) == expected
    # Each phase of each trial once, the validation metric as the test metric.
    client = MlflowClient(uri)
    for run in trial_runs(client, "steady")[2]:
        phases = int(run.data.tags["imbcil.last_phase"]) + 1
        for name in ("avg_incremental_acc", "val_avg_incremental_acc", "val_acc"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(phases)), name


def test_a_failed_trials_error_tag_is_redacted_like_every_other_tag():
    from pipeline.sweep.driver import close_trial_run

    class Client:
        def __init__(self):
            self.tags, self.status = {}, "RUNNING"

        def get_run(self, run_id):
            return SimpleNamespace(data=SimpleNamespace(tags=dict(self.tags)), info=SimpleNamespace(status=self.status))

        def set_tag(self, run_id, key, value):
            self.tags[key] = value

        def set_terminated(self, run_id, status):
            self.status = status

    client = Client()
    error = "MlflowException: API request to http://alice:s3cret@tracking.example:5000/api failed; password=hunter2 " + "x" * 600
    close_trial_run(client, "run-1", "failed", error=error)
    tag = client.tags["imbcil.error"]
    assert client.status == "FAILED" and "s3cret" not in tag and "hunter2" not in tag
    assert "http://alice:***@tracking.example:5000/api" in tag and "password=***" in tag
    assert len(tag) <= 500 and "\n" not in tag


def test_points_to_evaluate_are_checked_against_the_space(sweep_kit):
    good = sweep_kit.tune["points_to_evaluate"][0]
    cases = [
        ([{"train.lr": 0.05}], "tune.points_to_evaluate[0]: give a value for every searched key and no other (missing"),
        ([{**good, "train.momentum": 0.5}], "tune.points_to_evaluate[0]: give a value for every searched key and no other (train.momentum not searched)"),
        ([good, {**good, "memory.per_class": 99}], "tune.points_to_evaluate[1].memory.per_class: 99 is outside space.memory.per_class (int(5, 30))"),
        ("0.05", "tune.points_to_evaluate: expected a list of points"),
    ]
    for points, expected in cases:
        with pytest.raises(ConfigError) as info:
            spec(sweep_kit, tune={**sweep_kit.tune, "points_to_evaluate": points})
        assert str(info.value).startswith(expected), str(info.value)
    assert spec(sweep_kit).tune.points_to_evaluate[0] == good
