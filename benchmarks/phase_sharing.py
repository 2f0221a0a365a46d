"""What the phase store saves a sweep: the same sweep with sharing off, then on, side by side.

    python benchmarks/phase_sharing.py --data-root ../shared/data      # about 30 min on 2 cores
    python benchmarks/phase_sharing.py --data-root ../shared/data --epochs 1 --milestones 1 \
        --train-fraction 0.05 --test-fraction 0.1                         # a check, a few minutes

CIFAR-10-LT shuffled LFH-5 (5 + 5 x 1 classes), DGR, 8 trials over the beta schedule and the
memory budget (`learner.dgr.lambda_b`, `learner.dgr.beta_schedule`, `memory.per_class`), the first
task's settings fixed, so every trial needs the same phase 0. The 8 points are given to the
searcher (points_to_evaluate) and no scheduler stops a trial, so both sweeps run exactly the same
trials whatever order they finish in. Each sweep is `imbcil sweep` in a subprocess, as a user runs
it; this one process starts both and then reads both MLflow stores.

It prints each sweep's wall time, the speed-up, how many phases the shared sweep took from the
store, and whether every trial's metrics are identical in both (timings aside). Run it on an idle
machine: anything else on the cores changes the wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from method.results import METRIC_NAMES  # noqa: E402
from pipeline.names import KIND_TAG, PARAMS_TAG, TRIAL_KIND, phase_from_tag  # noqa: E402

POINTS = [
    {"learner.dgr.lambda_b": lam, "learner.dgr.beta_schedule": schedule, "memory.per_class": per_class}
    for lam, schedule, per_class in [
        (0.3, "sqrt", 10), (0.7, "sqrt", 20), (1.2, "sqrt", 30), (0.7, "constant", 20),
        (1.5, "constant", 10), (0.5, "linear", 20), (1.0, "linear", 30), (2.0, "sqrt", 15),
    ]
]
UNSHARED = {"train_seconds", "phase_seconds", "train_images_per_s", "phase_reused"}


def sweep_file(folder: Path, epochs: int, milestones: list[int], train_fraction: float, test_fraction: float, concurrent: int) -> Path:
    spec = {
        "base": {
            "name": "phase-sharing", "device": "cpu",
            "data": {"dataset": "cifar10", "scenario": "shuffled", "rho": 100.0,
                     "train_fraction": train_fraction, "test_fraction": test_fraction},
            "protocol": {"first_task_classes": 5, "incremental_tasks": 5},
            "train": {"epochs": epochs, "milestones": milestones, "first_task": {"lr": 0.1}},
            "learner": {"name": "dgr"},
        },
        "space": {
            "learner.dgr.lambda_b": {"uniform": [0.2, 2.0]},
            "learner.dgr.beta_schedule": {"categorical": ["sqrt", "constant", "linear"]},
            "memory.per_class": {"int": [10, 30]},
        },
        "tune": {
            "name": "phase-sharing", "metric": "val_avg_incremental_acc", "mode": "max", "num_samples": len(POINTS),
            "max_concurrent": concurrent, "searcher_seed": 0, "scheduler": "none", "points_to_evaluate": POINTS,
            "resources_per_trial": {"cpu": 1, "gpu": 0}, "max_failures": 0,
        },
    }  # fmt: skip
    path = folder / "phase_sharing.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_sweep(sweep: Path, data_root: str, workdir: Path, store: str) -> float:
    workdir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "pipeline.cli", "sweep", str(sweep), "--data-root", data_root,
        "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--phase-store", store,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    done = subprocess.run(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed with exit code {done.returncode}")
    return time.monotonic() - start


def trial_metrics(workdir: Path) -> dict[str, dict]:
    """Per trial (by its sampled values): every phase's metrics, and how many phases it trained itself."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("phase-sharing")
    trials = {}
    for run in client.search_runs([experiment.experiment_id]):
        if run.data.tags.get(KIND_TAG) != TRIAL_KIND:
            continue
        by_phase: dict[int, dict[str, float]] = {}
        for name in set(METRIC_NAMES) - UNSHARED:
            for point in client.get_metric_history(run.info.run_id, name):
                by_phase.setdefault(point.step, {})[name] = point.value
        trained = sum(run.data.tags.get(phase_from_tag(p)) == run.info.run_id for p in by_phase)
        trials[run.data.tags[PARAMS_TAG]] = {"metrics": by_phase, "trained": trained}
    return trials


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for phase in a:
        for name, value in a[phase].items():
            other = b[phase].get(name, math.nan)
            if not (value == other or (math.isnan(value) and math.isnan(other))):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--milestones", type=int, nargs="+", default=[3])
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once (one CPU each)")
    args = parser.parse_args()
    data_root = str(Path(args.data_root).expanduser().absolute())
    with tempfile.TemporaryDirectory(prefix="imbcil-phase-sharing-") as tmp:
        folder = Path(tmp)
        sweep = sweep_file(folder, args.epochs, args.milestones, args.train_fraction, args.test_fraction, args.concurrent)
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        off = run_sweep(sweep, data_root, folder / "off", "off")
        on = run_sweep(sweep, data_root, folder / "on", str(folder / "phases"))
        off_trials, on_trials = trial_metrics(folder / "off"), trial_metrics(folder / "on")
    identical = off_trials.keys() == on_trials.keys() and all(same(off_trials[k]["metrics"], on_trials[k]["metrics"]) for k in off_trials)
    phases = sum(len(t["metrics"]) for t in on_trials.values())
    trained = sum(t["trained"] for t in on_trials.values())
    print(json.dumps({
        "trials": len(on_trials), "epochs": args.epochs, "train_fraction": args.train_fraction,
        "test_fraction": args.test_fraction, "concurrent": args.concurrent,
        "wall_s_sharing_off": round(off, 1), "wall_s_sharing_on": round(on, 1), "speed_up": round(off / on, 2),
        "phases_trained_with_sharing": trained, "phases_reused": phases - trained, "metrics_identical": identical,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
