"""What the sweep machinery costs: a sweep's trials through Ray Tune + MLflow vs the same configs
trained directly, one after another, with nothing around them.

    python benchmarks/sweep_overhead.py --data-root ../shared/data                # sweeps/quickstart.yaml
    python benchmarks/sweep_overhead.py --data-root ../shared/data --results DIR  # reuse a finished sweep

1. Runs `imbcil sweep` (a subprocess, exactly as a user would) and times it.
2. Trains every trial's exported config (`<storage>/<name>/imbcil/trial_configs/`) directly in this
   process -- IncrementalTrainer only, no Ray, no MLflow, no checkpoints -- for as many phases as
   the trial ran in the sweep (a trial ASHA stopped after 2 phases trains 2 phases here), with as
   many threads as the sweep gave a trial, and the decoded dataset loaded once.
3. Prints per trial: its time inside Ray (Tune's time_total_s: from the trial's start to its last
   report, data loading, MLflow logging and checkpoints included) and its training time (the
   phases' own phase_seconds), next to the same two numbers trained directly.

The difference between a trial's time in Ray and directly is the per-trial cost of the
machinery; sweep wall time against the direct total divided by the concurrency shows what the
driver, Ray's start-up and the summary add on top. Run it on an otherwise idle machine: other
processes on the same cores inflate every number (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from method.data import build_benchmark, load_raw  # noqa: E402
from method.trainer import IncrementalTrainer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.sweep.results import summarise_trials  # noqa: E402
from pipeline.sweep.spec import RESULTS_DIR, SPEC_FILE, TRIAL_CONFIG_DIR, spec_from_resolved  # noqa: E402


def run_sweep(sweep_file: Path, data_root: str, workdir: Path) -> tuple[Path, float]:
    storage = workdir / "ray_results"
    command = [
        sys.executable, "-m", "pipeline.cli", "sweep", str(sweep_file), "--data-root", data_root,
        "--storage", str(storage), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    start = time.monotonic()
    done = subprocess.run(command, cwd=workdir)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed with exit code {done.returncode}")
    import yaml

    name = yaml.safe_load(sweep_file.read_text())["tune"].get("name") or sweep_file.stem
    return storage / name, wall


def ray_trial_times(experiment_dir: Path) -> dict[str, float]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: float((t.last_result or {}).get("time_total_s", float("nan"))) for t in ExperimentAnalysis(str(experiment_dir)).trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "quickstart.yaml")
    parser.add_argument("--data-root", default=os.environ.get("IMBCIL_DATA"))
    parser.add_argument("--results", type=Path, help="a finished sweep's folder (<storage>/<name>): skip running the sweep")
    parser.add_argument("--workdir", type=Path, help="where the sweep writes (default: a temporary folder)")
    args = parser.parse_args()
    if not args.data_root and not args.results:
        parser.error("give --data-root (or set IMBCIL_DATA)")
    load_before = os.getloadavg()

    sweep_wall = None
    if args.results:
        experiment_dir = args.results.absolute()
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imbcil-sweep-overhead-"))
        workdir.mkdir(parents=True, exist_ok=True)
        experiment_dir, sweep_wall = run_sweep(args.sweep.absolute(), str(Path(args.data_root).absolute()), workdir)

    import yaml

    spec = spec_from_resolved(yaml.safe_load((experiment_dir / RESULTS_DIR / SPEC_FILE).read_text()))
    trials = [t for t in summarise_trials(experiment_dir, spec) if t.phases_done > 0]
    in_ray = ray_trial_times(experiment_dir)
    threads = max(1, int(spec.tune.resources_per_trial["cpu"]))
    torch.set_num_threads(threads)

    configs = {t.trial_id: load_config(experiment_dir / RESULTS_DIR / TRIAL_CONFIG_DIR / f"{t.trial_id}.yaml") for t in trials}
    for cfg in configs.values():
        cfg.device = "cpu" if spec.tune.resources_per_trial["gpu"] == 0 else cfg.device
    start = time.monotonic()
    raw = load_raw(next(iter(configs.values())).data)
    data_seconds = time.monotonic() - start

    rows = []
    direct_total = data_seconds
    for trial in trials:
        cfg = configs[trial.trial_id]
        start = time.monotonic()
        benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=raw)
        phases = IncrementalTrainer(cfg, benchmark=benchmark).phases()
        train_direct = sum(next(phases).metrics["phase_seconds"] for _ in range(trial.phases_done))
        direct = time.monotonic() - start
        direct_total += direct
        train_ray = sum(m.get("phase_seconds", 0.0) for m in trial.metrics_by_phase.values())
        rows.append((trial.trial_id, trial.status, trial.phases_done, in_ray.get(trial.trial_id, float("nan")), train_ray, direct, train_direct))
        print(f"direct: trial {trial.trial_id} ({trial.phases_done} phases) {direct:.1f} s", flush=True)

    print()
    print(f"{'trial':10} {'status':9} {'phases':>6} | {'Ray: trial s':>12} {'train s':>8} {'other s':>8} | {'direct: trial s':>15} {'train s':>8}")
    for trial_id, status, phases, ray_s, ray_train, direct_s, direct_train in rows:
        print(
            f"{trial_id:10} {status:9} {phases:6d} | {ray_s:12.1f} {ray_train:8.1f} {ray_s - ray_train:8.1f} | "
            f"{direct_s:15.1f} {direct_train:8.1f}"
        )
    ray_sum = sum(r[3] for r in rows)
    ray_train_sum = sum(r[4] for r in rows)
    direct_sum = sum(r[5] for r in rows)
    direct_train_sum = sum(r[6] for r in rows)
    print(
        f"{'total':10} {'':9} {'':6} | {ray_sum:12.1f} {ray_train_sum:8.1f} {ray_sum - ray_train_sum:8.1f} | "
        f"{direct_sum:15.1f} {direct_train_sum:8.1f}"
    )
    print()
    concurrency = spec.tune.max_concurrent
    print(f"decoding the dataset once (direct): {data_seconds:.1f} s; direct runs in all: {direct_total:.1f} s")
    print(
        f"machinery outside the phases in Ray ('other s': data decoding in a fresh worker, MLflow logging, "
        f"checkpoints, reports): {ray_sum - ray_train_sum:.1f} s = {100 * (ray_sum - ray_train_sum) / ray_train_sum:.1f}% "
        f"of the training time, over {sum(r[2] for r in rows)} phases"
    )
    print(
        f"per-trial machinery (Ray trial time - direct trial time): {ray_sum - direct_sum:+.1f} s over "
        f"{len(rows)} trials = {100 * (ray_sum / direct_sum - 1):+.1f}% of the direct time"
    )
    print(
        f"outside the phases (data, MLflow, checkpoints, reports): Ray {ray_sum - ray_train_sum:.1f} s, "
        f"direct {direct_sum - direct_train_sum:.1f} s; training itself: Ray {ray_train_sum:.1f} s vs direct "
        f"{direct_train_sum:.1f} s ({100 * (ray_train_sum / direct_train_sum - 1):+.1f}%, {concurrency} trials shared the cores)"
    )
    if sweep_wall is not None:
        ideal = direct_total / concurrency
        print(
            f"sweep wall time {sweep_wall:.1f} s (Ray start-up, driver, summary and plots included) vs the direct "
            f"runs one after another {direct_total:.1f} s, i.e. {direct_total / sweep_wall:.2f}x faster; "
            f"{concurrency} at a time could at best take {ideal:.1f} s"
        )
    print(f"load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
