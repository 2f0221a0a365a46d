"""`imbcil run`: one training run, logged phase by phase into one MLflow run.

`train_tracked` is the piece the sweep and reproduce verbs reuse: it continues a tracked run
after its last fully logged phase, so a restarted run never redoes or duplicates a phase.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from method.config import RunConfig
from method.data import Benchmark, build_benchmark
from method.results import PhaseResult
from method.events import ProgressCallback
from method.plan import PhasePlan, Rates, estimate_seconds, measure_rates, plan_phases
from method.trainer import IncrementalTrainer, resolve_device
from pipeline import STARTED
from pipeline.config import PLACEMENT_KEYS, ConfigError, config_from_dict, config_to_dict, flatten, read_yaml, resolve, resolve_dict
from pipeline.phase_store import FolderPhaseStore, resolve_store_folder, user_store_folder
from pipeline.runtime import decoded_data
from pipeline.tracking import RunTracker, TrackingError, check_tracking, refuse_mixed_validation_metric, resolve_tracking_uri

def logged_config(tracker: RunTracker) -> RunConfig:
    """The config a run was started with (its config.yaml artifact)."""
    with tempfile.TemporaryDirectory(prefix="imbcil-config-") as tmp:
        try:
            path = tracker.retrying.download_artifacts(tracker.run_id, "config.yaml", tmp)
        except Exception:
            raise TrackingError(f"run {tracker.run_id} has no config.yaml artifact; it was not started by imbcil") from None
        return config_from_dict(read_yaml(path))


def same_config_or_error(given: RunConfig, logged: RunConfig) -> None:
    ours, theirs = flatten(given), flatten(logged)
    for key, value in theirs.items():
        if key in PLACEMENT_KEYS:
            continue
        if ours.get(key) != value:
            raise ConfigError(f"{key}: the run to resume was logged with {value!r}, the config now says {ours.get(key)!r}")


def train_tracked(
    cfg: RunConfig,
    tracker: RunTracker,
    *,
    benchmark: Optional[Benchmark] = None,
    progress: Optional[ProgressCallback] = None,
    on_phase: Optional[Callable[[PhaseResult], None]] = None,
    extra_tags: Optional[dict] = None,
    phase_store: Optional[Path] = None,
    phases: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> list[PhaseResult]:
    """Train the phases the run has not logged yet (up to `phases`), logging each one as soon as it ends.

    `device` places the training where the caller was given room (a Ray task's own GPU, or the
    CPU), leaving the logged config's `device` as the user wrote it.

    With a `phase_store` folder, a phase that another run trained with the same key is taken from
    it (and still logged here, with a tag naming that run), and each phase trained here is stored.
    """
    last = tracker.last_logged_phase()
    if last is not None:
        refuse_mixed_validation_metric(tracker.validation_metric_version(), f"run {tracker.run_id}")
    state = tracker.load_checkpoint(last) if last is not None else None
    store = FolderPhaseStore(phase_store, owner=tracker.run_id) if phase_store is not None else None
    trainer = IncrementalTrainer(cfg, benchmark=benchmark, progress=progress, phase_store=store, device=device)
    if state is None:
        tracker.log_config(cfg, extra_tags)
        tracker.log_class_order(trainer.benchmark.class_order, _names_by_original_label(trainer.benchmark))
    results = []
    for result in trainer.phases(resume_state=state):
        tracker.log_phase(result)
        results.append(result)
        if on_phase is not None:
            on_phase(result)
        if phases is not None and result.phase + 1 >= phases:
            break
    return results


def _names_by_original_label(benchmark: Benchmark) -> list[str]:
    names = [""] * benchmark.num_classes
    for position, original in enumerate(benchmark.class_order):
        names[original] = benchmark.class_names[position]
    return names


@dataclass
class RunPlan:
    """`run --dry-run`: what the run would train and score, and how long it should take here."""

    cfg: RunConfig
    benchmark: Benchmark
    phases: list[PhasePlan]
    rates: Rates
    startup_s: float
    estimate_s: float


def plan_run(cfg: RunConfig, benchmark: Benchmark, startup_s: float) -> RunPlan:
    """The phases' plan and the wall-time estimate: start-up as this process took it, the rest at measured rates."""
    device = resolve_device(cfg.device)
    plans = plan_phases(cfg, benchmark)
    rates = measure_rates(cfg, benchmark, device)
    return RunPlan(cfg, benchmark, plans, rates, startup_s, startup_s + estimate_seconds(plans, rates))


@dataclass
class RunOutcome:
    tracker: RunTracker
    results: list[PhaseResult]
    metrics_by_phase: list[dict[str, float]]
    phase_store: Optional[Path]


def run_command(
    config_path: Optional[str],
    overrides: list[str],
    *,
    data_root: Optional[str],
    tracking_uri: Optional[str],
    experiment: Optional[str],
    device: Optional[str],
    resume: Optional[str],
    progress: Optional[ProgressCallback] = None,
    phase_store: Optional[str] = None,
    dry_run: bool = False,
) -> RunOutcome | RunPlan:
    """Everything `imbcil run` does; every check that can fail runs before training starts.

    `dry_run`: the same checks, changing nothing in the tracking store, then the plan instead of the run.
    """
    uri = resolve_tracking_uri(tracking_uri)
    store = resolve_store_folder(phase_store, user_store_folder())
    if dry_run and resume:
        raise ConfigError("--dry-run plans a new run; it does not take --resume")
    given = None
    if config_path is not None or not resume:
        given = resolve(config_path, overrides, data_root=data_root, device=device)
    if resume:
        check_tracking(uri)
        tracker = RunTracker(uri, experiment, run_id=resume)
        try:
            logged = config_to_dict(logged_config(tracker))
            # Overrides without a config file apply to the logged config: where and how it runs
            # may change (--resume ID train.cuda_graph=false on a machine without CUDA), nothing else.
            cfg = resolve_dict(logged, overrides if given is None else (), data_root=data_root, device=device)
            same_config_or_error(cfg, config_from_dict(logged))
            if given is not None:
                same_config_or_error(given, cfg)
                cfg = given  # the same run, placed as the given config says
            benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data))
        except BaseException:
            tracker.finish("FAILED", error="resume refused: the config or data did not match")
            raise
    else:
        cfg = given
        benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data))  # a missing dataset fails here
        check_tracking(uri, read_only=dry_run)
        if dry_run:
            return plan_run(cfg, benchmark, time.perf_counter() - STARTED)
        tracker = RunTracker(uri, experiment or cfg.name, run_name=cfg.name)
    previous = tracker.accuracy_per_phase
    with tracker:
        results = train_tracked(cfg, tracker, benchmark=benchmark, progress=progress, phase_store=store)
    metrics = _metric_rows(tracker, len(previous)) + [r.metrics for r in results]
    return RunOutcome(tracker, results, metrics, store)


def _metric_rows(tracker: RunTracker, phases: int) -> list[dict[str, float]]:
    """Metrics of phases logged before a resume, read back from MLflow for the final table."""
    if phases == 0:
        return []
    rows = [dict() for _ in range(phases)]
    run = tracker.retrying.get_run(tracker.run_id)
    for key in run.data.metrics:
        for metric in tracker.retrying.get_metric_history(tracker.run_id, key):
            if metric.step < phases:
                rows[metric.step][key] = metric.value
    return rows
