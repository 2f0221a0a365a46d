"""`imbcil run --dry-run`: the plan of a real run, its measured estimate, and nothing written."""

import math
import re

import pytest
from mlflow.tracking import MlflowClient

import pipeline.run
from method.plan import measure_rates
from pipeline.display import duration
from pipeline.run import RunPlan, run_command

from tests.pipeline.test_run_cli import REPO, TINY, invoke, only_run, sqlite_uri

MEMORY = {
    "per class": ["memory.budget=per_class", "memory.per_class=20"],
    "fixed total": ["memory.budget=total", "memory.total=50"],  # 6 classes keep 8, then 6, then 5
    # EEIL's balanced fine-tuning trains the memory and as many new images after the task.
    "eeil fine-tuning": ["memory.budget=per_class", "memory.per_class=5", "learner.name=eeil", "learner.eeil.finetune_epochs=2"],
}


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.e2e
@pytest.mark.parametrize("memory", MEMORY, ids=list(MEMORY))
def test_the_plan_has_the_images_a_real_run_trains_and_the_dry_run_writes_nothing(tmp_path, data_root, memory, monkeypatch):
    # The two dry runs below plan the same config: the second takes the rates the first measured.
    measured = []

    def measure_once(*args):
        if not measured:
            measured.append(measure_rates(*args))
        return measured[0]

    monkeypatch.setattr(pipeline.run, "measure_rates", measure_once)
    args = [REPO / "configs/quickstart.yaml", *TINY, *MEMORY[memory], "--data-root", data_root,
            "--tracking-uri", sqlite_uri(tmp_path), "--phase-store", tmp_path / "phases"]  # fmt: skip
    code, output = invoke("run", *args, "--dry-run")
    assert code == 0, output
    assert files_under(tmp_path) == []  # no store, no phase store, nothing
    assert "dry run: nothing was trained or logged" in output
    estimate = re.search(r"estimate: (.+?) wall time for this run, one run at a time", output)
    assert estimate, output

    plan = run_command(
        str(args[0]), [str(a) for a in TINY + MEMORY[memory]], data_root=str(data_root), tracking_uri=sqlite_uri(tmp_path),
        experiment=None, device=None, resume=None, phase_store="off", dry_run=True,
    )  # fmt: skip
    assert isinstance(plan, RunPlan) and files_under(tmp_path) == []
    assert [p.phase for p in plan.phases] == [0, 1, 2]
    assert plan.phases[0].memory_images == 0 and plan.phases[1].memory_images > 0
    for p in plan.phases:
        assert f" {p.train_images} " in output  # the table shows what the run below trains
    assert len(measured) == 1 and plan.rates is measured[0]
    assert 0 < plan.rates.step_s < 60 and 0 < plan.rates.score_s < 1
    assert plan.startup_s < plan.estimate_s < math.inf

    code, output = invoke("run", *args[:-2], "--phase-store", "off")
    assert code == 0, output
    client = MlflowClient(sqlite_uri(tmp_path))
    run = only_run(client)
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_images")}
    assert logged == {p.phase: float(p.train_images) for p in plan.phases}


def test_a_bad_config_under_dry_run_is_one_line_and_exit_2(tmp_path, data_root):
    code, output = invoke("run", REPO / "configs/quickstart.yaml", "train.lr=-1", "--dry-run",
                          "--data-root", data_root, "--tracking-uri", sqlite_uri(tmp_path))  # fmt: skip
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and "train.lr" in output
    assert files_under(tmp_path) == []


def test_dry_run_does_not_take_resume(tmp_path):
    code, output = invoke("run", "--resume", "0123abcd", "--dry-run", "--tracking-uri", sqlite_uri(tmp_path))
    assert code == 2 and "--dry-run" in output and len(output.strip().splitlines()) == 1


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 45, 200, 7500)] == ["0 s", "45 s", "3 min 20 s", "2 h 05 min"]


SMALL = ["data.train_fraction=0.03", "data.test_fraction=0.05", "train.epochs=1", "train.milestones=[1]"]


def test_sweep_dry_run_plans_every_stage_and_writes_nothing(tmp_path, data_root):
    code, output = invoke("sweep", REPO / "sweeps/cifar10_lt_lfh5_staged.yaml", *SMALL, "--dry-run", "--data-root", data_root,
                          "--storage", tmp_path / "ray_results", "--tracking-uri", sqlite_uri(tmp_path),
                          "--phase-store", tmp_path / "phases")  # fmt: skip
    assert code == 0, output
    assert files_under(tmp_path) == []
    assert "preflight (dry run, nothing written)" in output
    stages = re.findall(r"^sweep (\S+): (\d+) trials searching .+?, (\d+) at a time", output, re.M)
    assert [(name, int(trials)) for name, trials, _ in stages] == [("cifar10_lt_lfh5_staged-first-task", 8), ("cifar10_lt_lfh5_staged", 16)], output
    assert "phase 0 from the first stage's best, through the phase store" in output
    assert re.search(r"estimate: .+ wall time for the sweep", output)


def test_sweep_dry_run_refuses_a_bad_override_in_one_line(tmp_path, data_root):
    code, output = invoke("sweep", REPO / "sweeps/quickstart.yaml", "train.epochs=0", "--dry-run", "--data-root", data_root,
                          "--storage", tmp_path / "ray_results", "--tracking-uri", sqlite_uri(tmp_path))  # fmt: skip
    assert code == 2 and len(output.strip().splitlines()) == 1 and "train.epochs" in output
    assert files_under(tmp_path) == []


def test_reproduce_dry_run_counts_every_run_and_writes_nothing(tmp_path, data_root):
    code, output = invoke("reproduce", REPO / "configs/quickstart.yaml", *SMALL, "--seeds", "0", "1", "2", "--dry-run",
                          "--data-root", data_root, "--output", tmp_path / "out", "--tracking-uri", sqlite_uri(tmp_path),
                          "--parallel", "1")  # fmt: skip
    assert code == 0, output
    assert files_under(tmp_path) == []
    assert re.search(r"estimate: .+ wall time for 3 runs \(1 config\(s\) x seeds 0 1 2\), 1 at a time", output), output


def test_rates_timed_eagerly_for_a_graphed_run_say_so():
    from method.plan import Rates
    from pipeline.display import rates_line

    eager = rates_line(Rates(0.1, 0.2, 0.001, "cuda"))
    graphed = rates_line(Rates(0.1, 0.2, 0.001, "cuda", eager_for_graphs=True))
    assert eager == "0.100 s per training step (0.200 s with the teacher), 1000 images/s scored"
    assert graphed == eager + "; steps timed without CUDA graphs, which train faster"
