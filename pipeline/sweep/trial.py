"""One trial of a sweep, in a Ray worker: train phase by phase, report each phase to Tune.

A trial that Ray restarts (after an error, or when a sweep resumes) finds its MLflow run through
its checkpoint, or before its first checkpoint through the trial id tag, and continues after
the run's last logged phase.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from mlflow.tracking import MlflowClient
from ray import tune

from method.data import build_benchmark
from method.results import PhaseResult
from method.trainer import NonFiniteLossError
from pipeline.names import (
    ADOPTED_FROM_TAG,
    DIVERGED_TAG,
    KIND_TAG,
    NODE_ID_TAG,
    NODE_IP_TAG,
    PARAMS_TAG,
    PARENT_RUN_TAG,
    STOPPED_EARLY_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    TRIAL_KIND,
)
from pipeline.run import train_tracked
from pipeline.runtime import decoded_data, ray_task_device
from pipeline.sweep.spec import trial_config
from pipeline.sweep.search import REPORTED_AT
from pipeline.tracking import RunTracker


# Ray's trial checkpoint: the phase state (so `Result.checkpoint` loads a model without MLflow)
# and the MLflow run it belongs to. The trial itself resumes from the copy in MLflow, which
# `train_tracked` reads, so the two can never disagree.
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_INFO = "trial.json"


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, shipped once through Ray's object store by tune.with_parameters."""

    base: dict[str, Any]  # the resolved base config as plain data
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    metric: str
    threads: int
    # Runs that trials of a killed driver opened but Tune's last snapshot did not record, as
    # (run id, its trial id, sampled values as JSON): the restored searcher proposes those
    # points again, and the new trial adopts the matching run instead of opening a second one.
    orphans: tuple[tuple[str, str, str], ...] = ()
    phase_store: Optional[str] = None  # the folder of shared phases; None: off
    phases: Optional[int] = None  # train only the first `phases` phases (a staged sweep's first stage)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Train one trial phase by phase, reporting each phase to Tune with a checkpoint.

    `config` holds the sampled dotted keys. A trial that Ray restarts (after an error, or when
    a sweep resumes) finds its MLflow run through the checkpoint -- or, before its first
    checkpoint, through the trial id tag -- and `train_tracked` continues after the run's last
    logged phase. A NaN/inf loss ends the trial as diverged rather than as an error, so that
    Ray does not retry a trial that would diverge again.
    """
    # Read now: once Tune stops a trial, its session answers None.
    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(context.threads)
    cfg = trial_config(context.base, config)
    num_phases = min(1 + cfg.protocol.incremental_tasks, context.phases or math.inf)
    saved = _read_checkpoint(tune.get_checkpoint())
    tracker = _open_trial_run(context, trial_id, saved["mlflow_run_id"], config) if saved else None
    last = tracker.last_logged_phase() if tracker else None
    benchmark = None
    if last is None or last < num_phases - 1:
        # Loaded before a new MLflow run exists: a driver killed during these seconds leaves no
        # run behind for a trial that Ray's snapshot may not hold.
        benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data))
    if tracker is None:
        client = MlflowClient(context.tracking_uri)
        run_id = _find_trial_run(client, context, trial_id) or _adopt_orphan(client, context, trial_id, config)
        tracker = _open_trial_run(context, trial_id, run_id, config)
        last = tracker.last_logged_phase()
    reporter = _PhaseReporter(tracker, context.metric, num_phases)
    if last is not None:
        # Phases that MLflow holds but Tune never heard of (the worker died between the two).
        reporter.replay(saved["phase"] + 1 if saved else 0, last)
        reporter.phases_done = last + 1
    if last is not None and last >= num_phases - 1:
        tracker.finish("FINISHED")
        return
    try:
        store = Path(context.phase_store) if context.phase_store else None
        train_tracked(
            cfg, tracker, benchmark=benchmark, on_phase=reporter.report, phase_store=store, phases=num_phases,
            device=ray_task_device(cfg.device),
        )  # fmt: skip
    except NonFiniteLossError as exc:
        reporter.diverged(exc)
        return
    except Exception as exc:
        tracker.finish("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    # A SystemExit (Tune stopping the trial inside report) passes through untouched: the driver
    # ends the MLflow run, because the worker may be killed before it could.
    tracker.finish("FINISHED")


def _params_json(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def _open_trial_run(context: TrialContext, trial_id: str, run_id: Optional[str], params: Mapping[str, Any]) -> RunTracker:
    tags = {KIND_TAG: TRIAL_KIND, TRIAL_ID_TAG: trial_id, SWEEP_TAG: context.sweep, PARAMS_TAG: _params_json(params), **_node_tags()}
    if run_id is None:
        return RunTracker(
            context.tracking_uri, context.experiment, run_name=f"{context.sweep}-{trial_id}",
            parent_run_id=context.parent_run_id, tags=tags,
        )  # fmt: skip
    tracker = RunTracker(
        context.tracking_uri, context.experiment, run_id=run_id, parent_run_id=context.parent_run_id, tags=tags
    )
    if STOPPED_EARLY_TAG in tracker.retrying.get_run(run_id).data.tags:
        # The driver stopped this trial, then died before Tune's snapshot said so: it trains on.
        tracker.retrying.delete_tag(run_id, STOPPED_EARLY_TAG)
    return tracker


def _node_tags() -> dict[str, str]:
    """Where this attempt of the trial runs; on a cluster, what to look at when a node misbehaves."""
    import ray

    try:
        return {NODE_ID_TAG: ray.get_runtime_context().get_node_id(), NODE_IP_TAG: ray.util.get_node_ip_address()}
    except Exception:  # not inside Ray (a trial function called directly)
        return {}


def _find_trial_run(client: MlflowClient, context: TrialContext, trial_id: str) -> Optional[str]:
    """The run an earlier attempt of this trial opened before its first checkpoint, if any."""
    runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{PARENT_RUN_TAG}` = '{context.parent_run_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _adopt_orphan(client: MlflowClient, context: TrialContext, trial_id: str, params: Mapping[str, Any]) -> Optional[str]:
    wanted = _params_json(params)
    for run_id, orphan_trial_id, orphan_params in context.orphans:
        if orphan_params != wanted:
            continue
        if client.get_run(run_id).data.tags.get(TRIAL_ID_TAG) == orphan_trial_id:
            # Claimed at once: a concurrent trial with the same values then finds it taken.
            client.set_tag(run_id, TRIAL_ID_TAG, trial_id)
            client.set_tag(run_id, ADOPTED_FROM_TAG, orphan_trial_id)
            client.update_run(run_id, name=f"{context.sweep}-{trial_id}")
            return run_id
    return None


def _read_checkpoint(checkpoint: Optional[tune.Checkpoint]) -> Optional[dict[str, Any]]:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / CHECKPOINT_INFO).read_text())


class _PhaseReporter:
    """Turns phase results into Tune reports, each with a checkpoint naming the MLflow run."""

    def __init__(self, tracker: RunTracker, metric: str, num_phases: int) -> None:
        self.tracker = tracker
        self.metric = metric
        self.num_phases = num_phases
        self.phases_done = 0

    def report(self, result: PhaseResult) -> None:
        metrics = {name: float(value) for name, value in result.metrics.items()}
        self._send(result.phase, metrics, result.state)

    def replay(self, first: int, last: int) -> None:
        for phase in range(first, last + 1):
            self._send(phase, self._logged_metrics(phase), self.tracker.load_checkpoint(phase))

    def _logged_metrics(self, phase: int) -> dict[str, float]:
        client, run_id = self.tracker.retrying, self.tracker.run_id
        metrics = {}
        for name in client.get_run(run_id).data.metrics:
            points = [m for m in client.get_metric_history(run_id, name) if m.step == phase]
            if points:
                metrics[name] = max(points, key=lambda m: m.timestamp).value
        return metrics

    def _send(self, phase: int, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        self.phases_done = phase + 1
        metrics = dict(metrics)
        # Tune refuses a result without the sweep's metric; the first phase has no acc_few, say.
        metrics.setdefault(self.metric, math.nan)
        metrics.update(
            phase=phase, phases_done=phase + 1, num_phases=self.num_phases,
            mlflow_run_id=self.tracker.run_id, diverged=False, **{REPORTED_AT: time.time()},
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="imbcil-trial-") as folder:
            torch.save(state, Path(folder) / CHECKPOINT_STATE)
            info = {"mlflow_run_id": self.tracker.run_id, "phase": phase}
            (Path(folder) / CHECKPOINT_INFO).write_text(json.dumps(info))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def diverged(self, exc: NonFiniteLossError) -> None:
        """Fail the MLflow run with the reason and end the Tune trial normally (no retry).

        `done` ends the trial before Tune shows the result to the scheduler or the searcher's
        per-step hook, so the NaN metric reaches neither; the searcher learns of the failure
        in on_trial_complete.
        """
        reason = f"diverged: {exc}"
        self.tracker.retrying.set_tag(self.tracker.run_id, DIVERGED_TAG, "true")
        self.tracker.finish("FAILED", error=reason)
        tune.report({
            self.metric: math.nan, "diverged": True, "error": reason, "phase": self.phases_done,
            "phases_done": self.phases_done, "num_phases": self.num_phases,
            "mlflow_run_id": self.tracker.run_id, "done": True,
        })  # fmt: skip
