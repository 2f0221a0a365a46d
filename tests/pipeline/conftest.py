"""A tiny real-data sweep, run once per session and read by the sweep and export tests.

Test modules here are not a package, so they reach the shared constants and helpers through the
`sweep_kit` fixture rather than by importing this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SWEEP_TIMEOUT_S = 900

# CIFAR-10-LT, 6 base classes + 2 tasks of 2: three phases on 4% of the data, one epoch each.
TINY_BASE = {
    "name": "tiny",
    "device": "cpu",
    "data": {"dataset": "cifar10", "train_fraction": 0.04, "test_fraction": 0.05},
    "protocol": {"first_task_classes": 6, "incremental_tasks": 2},
    "train": {"epochs": 1, "milestones": [1]},
}
PHASES = 3
# The phase-0 loss depends on the learning rate alone (distillation and memory start in phase 1):
# 1.24 at lr 0.05, 4.34 at lr 30, NaN at 1e20. The sweep proposes these four points first, in
# this order (two at a time): the two 0.05 trials tie at ASHA's first rung and go on, the lr-30
# trial meets that rung later, worse, and is stopped after phase 0, and the 1e20 trial diverges.
GOOD_LR, BAD_LR, DIVERGING_LR = 0.05, 30.0, 1.0e20
TINY_SPACE = {
    "train.lr": {"categorical": [GOOD_LR, BAD_LR, DIVERGING_LR]},
    "learner.dgr.lambda_b": {"uniform": [0.1, 2.0]},
    "memory.per_class": {"int": [5, 30]},
}
TINY_POINTS = [
    {"train.lr": GOOD_LR, "learner.dgr.lambda_b": 0.5, "memory.per_class": 10},
    {"train.lr": GOOD_LR, "learner.dgr.lambda_b": 1.5, "memory.per_class": 20},
    {"train.lr": BAD_LR, "learner.dgr.lambda_b": 1.0, "memory.per_class": 15},
    {"train.lr": DIVERGING_LR, "learner.dgr.lambda_b": 0.7, "memory.per_class": 25},
]
# The sweep tests hold whatever seed Optuna is given: IMBCIL_TEST_SEARCHER_SEED=123 pytest ... shows it.
SEARCHER_SEED = int(os.environ.get("IMBCIL_TEST_SEARCHER_SEED", "0"))
TINY_TUNE = {
    "name": "tiny", "metric": "loss", "mode": "min", "num_samples": 4, "max_concurrent": 2,
    "searcher_seed": SEARCHER_SEED, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
    "resources_per_trial": {"cpu": 1}, "max_failures": 1, "points_to_evaluate": TINY_POINTS,
}  # fmt: skip


def write_sweep(path: Path, base=None, space=None, tune=None, **sections) -> Path:
    data = {"base": TINY_BASE if base is None else base, "space": TINY_SPACE if space is None else space}
    data["tune"] = TINY_TUNE if tune is None else tune
    data.update(sections)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *[str(a) for a in args]]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(extra)
    return env


@dataclass
class SweepRun:
    root: Path
    sweep_file: Path
    experiment_dir: Path
    tracking_uri: str
    stdout: str
    stderr: str

    @property
    def results_dir(self) -> Path:
        return self.experiment_dir / "imbcil"


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, data_root) -> SweepRun:
    """`imbcil sweep` on the tiny space above, in a subprocess (Ray keeps process-wide state)."""
    root = tmp_path_factory.mktemp("tiny-sweep")
    sweep_file = write_sweep(root / "tiny.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done = subprocess.run(
        cli_command("sweep", sweep_file, "--data-root", data_root, "--storage", root / "ray_results", "--tracking-uri", uri),
        cwd=root, env=cli_env(), capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, f"sweep failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return SweepRun(root, sweep_file, root / "ray_results" / "tiny", uri, done.stdout, done.stderr)


@pytest.fixture(scope="session")
def sweep_kit() -> SimpleNamespace:
    return SimpleNamespace(
        base=TINY_BASE, space=TINY_SPACE, tune=TINY_TUNE, phases=PHASES, repo=REPO,
        good_lr=GOOD_LR, bad_lr=BAD_LR, diverging_lr=DIVERGING_LR,
        write_sweep=write_sweep, cli_command=cli_command, cli_env=cli_env,
    )  # fmt: skip
