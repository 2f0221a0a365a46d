"""A sweep on a 2-node Ray cluster with a PostgreSQL-backed MLflow server, all on this machine.

    .venv/bin/python benchmarks/cluster_sweep.py --data-root ../shared/data --trials 32

Starts what docs/deployment.md describes, on loopback: a fresh PostgreSQL database (local
server at 127.0.0.1:5432, user postgres), `mlflow server` on it with proxied artifacts, a Ray
head and one worker node (each `ray start` in its own session, free ports, token auth), then
runs `imbcil sweep` of tiny real-data trials (CIFAR-10-LT, 6 + 2x2 classes, 2% of the images,
one epoch per phase) and prints:

- the sweep's wall time, and per trial: Tune's trial time, the trainer's own time (the sum of
  `phase_seconds`), the overhead inside the trial (process, data, MLflow, checkpoints: trial
  time minus trainer time), and the driver's share (slots x wall - sum of trial times, per trial);
- what MLflow holds: trials, phases logged, metric points, duplicated and missing points;
- where the trials ran (trials per node).

Everything it starts is stopped at the end. The helpers that start the servers and the cluster
are the test suite's (tests/conftest.py), so the benchmark measures exactly what the tests run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PHASES = 3


def helpers():
    spec = importlib.util.spec_from_file_location("imbcil_test_helpers", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def sweep_file(path: Path, trials: int, concurrent: int) -> Path:
    data = {
        "base": {
            "name": "cluster-bench", "device": "cpu",
            "data": {"dataset": "cifar10", "train_fraction": 0.02, "test_fraction": 0.03},
            "protocol": {"first_task_classes": 6, "incremental_tasks": 2},
            "train": {"epochs": 1, "milestones": [1]},
        },
        "space": {"train.lr": {"loguniform": [0.01, 0.1]}},
        "tune": {
            "name": "cluster-bench", "metric": "avg_incremental_acc", "mode": "max", "num_samples": trials,
            "max_concurrent": concurrent, "scheduler": "none", "resources_per_trial": {"cpu": 1}, "max_failures": 1,
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _is_trial(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc")
    except OSError:
        return False


def audit(uri: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cluster-bench")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`imbcil.kind` = 'trial'", max_results=1000)
    counts = dict(trials=len(runs), finished=0, phases_logged=0, metric_points=0, duplicated=0, missing=0)
    for run in runs:
        counts["finished"] += run.info.status == "FINISHED"
        counts["phases_logged"] += int(run.data.tags.get("imbcil.last_phase", -1)) + 1
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            counts["metric_points"] += len(steps)
            counts["duplicated"] += len(steps) - len(set(steps))
            if not key.startswith("acc_"):  # acc_few etc. are undefined in early phases
                counts["missing"] += len(set(range(PHASES)) - set(steps))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    args = parser.parse_args()
    kit = helpers()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    with tempfile.TemporaryDirectory(prefix="imbcil-cluster-bench-") as tmp, kit.fresh_postgres_database() as store:
        root = Path(tmp)
        (root / "mlflow").mkdir()
        server = kit.launch_mlflow_server(root / "mlflow", store)
        cluster = kit.start_ray_cluster(root, cpus=(args.cpus_per_node, args.cpus_per_node))
        seen: dict[int, str] = {}
        peak = {"rss_gb": 0.0, "trial_rss_gb": 0.0}
        halt = threading.Event()

        def sample() -> None:
            while not halt.is_set():
                total = 0.0
                for node in cluster.nodes:
                    for pid in kit.session_processes(node.session):
                        seen.setdefault(pid, node.name)
                        rss = _rss_gb(pid)
                        total += rss
                        if _is_trial(pid):
                            peak["trial_rss_gb"] = max(peak["trial_rss_gb"], rss)
                peak["rss_gb"] = max(peak["rss_gb"], total)
                halt.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
            env.update(cluster.env)
            command = [
                sys.executable, "-m", "pipeline.cli", "sweep", str(sweep_file(root / "bench.yaml", args.trials, args.concurrent)),
                "--address", cluster.address, "--storage", str(root / "ray_results"), "--tracking-uri", server.url,
                "--data-root", str(Path(args.data_root).absolute()),
            ]  # fmt: skip
            print("running:", " ".join(command), flush=True)
            started = time.monotonic()
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
                return done.returncode
            trial_times, train_times, nodes = [], [], {}
            for path in (root / "ray_results" / "cluster-bench").glob("trial_*/result.json"):
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                trial_times.append(rows[-1]["time_total_s"])
                train_times.append(sum(r.get("phase_seconds", 0.0) for r in rows))
                for name in {seen.get(r["pid"], "?") for r in rows}:
                    nodes[name] = nodes.get(name, 0) + 1
            counts = audit(server.url)
        finally:
            halt.set()
            cluster.stop()
            kit.stop_mlflow_server(server)
    n = len(trial_times)
    in_trial = [t - s for t, s in zip(trial_times, train_times)]
    driver = (wall * args.concurrent - sum(trial_times)) / n
    print(f"\n{n} trials, {args.concurrent} at a time on 2 nodes x {args.cpus_per_node} CPUs (this machine: {os.cpu_count()} cores)")
    print(f"sweep wall time:                 {wall:.0f} s ({wall / n:.1f} s per trial)")
    print(f"trial time (Tune), mean:         {statistics.mean(trial_times):.1f} s")
    print(f"trainer time (phase_seconds):    {statistics.mean(train_times):.1f} s")
    print(f"overhead inside a trial, mean:   {statistics.mean(in_trial):.1f} s (process, data, MLflow, checkpoints)")
    print(f"driver/scheduling per trial:     {driver:.1f} s (slots x wall - trial times, per trial)")
    print(f"trials per node:                 {nodes}")
    print(f"memory, peak RSS:                cluster {peak['rss_gb']:.1f} GB, one trial process {peak['trial_rss_gb']:.1f} GB")
    print("MLflow:                          " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
