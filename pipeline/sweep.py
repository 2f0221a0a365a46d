"""`imbcil sweep`: a Ray Tune + Optuna hyperparameter search, one MLflow run per trial.

The driver (this process) validates the sweep file, opens the sweep's parent MLflow run, starts
Ray here (or joins a cluster) and runs a `ray.tune.Tuner`: Optuna's TPE sampler proposes points
of the space, a ConcurrencyLimiter caps the trials in flight, and ASHA (or the median rule)
stops weak trials at phase boundaries (`pipeline.sweep_search`, which also makes a resumed
sweep decide as an uninterrupted one). Each trial (`run_trial`, in a Ray worker) trains through
`pipeline.run.train_tracked` into a child MLflow run and reports to Tune after every phase, with
a checkpoint that names its MLflow run: a trial restarted by Ray, or a whole sweep resumed with
--resume, reopens that run and continues after its last logged phase.

The driver touches MLflow only when a trial starts or ends, never per phase. Its results land
next to Ray's, under `<storage>/<name>/imbcil/` (file names in `pipeline.sweep_config`): the
resolved spec, each trial's complete run config, the parent run id and, at the end, the
Parquet table that `imbcil export` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from method.config import protocol_name
from method.data import DataError, build_benchmark, no_data_root
from method.events import phase_label
from method.results import METRIC_NAMES, PhaseResult, reported_beside
from method.trainer import NonFiniteLossError
from pipeline.check import preflight, raise_on_failure
from pipeline.config import ConfigError, config_to_dict, save_config
from pipeline.run import train_tracked
from pipeline.names import (
    ADOPTED_FROM_TAG,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    DEFAULT_STORAGE,
    DIVERGED,
    DIVERGED_TAG,
    ERROR_TAG,
    FAILED,
    FINISHED,
    INCOMPLETE,
    KIND_TAG,
    NODE_ID_TAG,
    NODE_IP_TAG,
    ORPHANED_TAG,
    PARAMS_TAG,
    PARENT_FILE,
    PARENT_RUN_TAG,
    RESULTS_DIR,
    SPEC_FILE,
    STATUSES,
    STOPPED,
    STOPPED_EARLY_TAG,
    STORAGE_TAG,
    SWEEP_KIND,
    SWEEP_TAG,
    TABLE_FILE,
    TRIAL_CONFIG_DIR,
    TRIAL_ID_TAG,
    TRIAL_KIND,
)
from pipeline.sweep_config import (
    SweepSpec,
    differing_key,
    load_sweep,
    spec_from_resolved,
    test_selection_warning,
    trial_config,
)
from pipeline.runtime import absolute_store_uri, decoded_data, error_line, scoped_env, start_local_ray
from pipeline.sweep_search import REPORTED_AT, make_scheduler, make_searcher
from pipeline.tracking import (
    PARAM_VALUE_LIMIT,
    RunTracker,
    error_tag_value,
    TrackingError,
    resolve_tracking_uri,
    run_url,
)

logger = logging.getLogger(__name__)

# Ray's trial checkpoint: the phase state (so `Result.checkpoint` loads a model without MLflow)
# and the MLflow run it belongs to. The trial itself resumes from the copy in MLflow, which
# `train_tracked` reads, so the two can never disagree.
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_INFO = "trial.json"
LEADERBOARD_ROWS = 20


class SweepError(RuntimeError):
    """A sweep that cannot start or resume (storage, Ray); the message is one line."""


class SweepStopped(RuntimeError):
    """Ray Tune ended the sweep with an error; what the trials finished is kept for --resume."""


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
    num_phases = 1 + cfg.protocol.incremental_tasks
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
        train_tracked(cfg, tracker, benchmark=benchmark, on_phase=reporter.report)
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


def _trial_dirname(trial: Trial) -> str:
    """Short, stable trial folders (Ray's default puts every sampled value in the name)."""
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# Driver-side bookkeeping while Tune runs


# Live state of the sweeps this process drives, by experiment folder. Tune pickles its callbacks
# into the experiment state on disk; the callback keeps only the folder, so that no MLflow client
# (whose URI may carry credentials) is written there.
_LIVE: dict[str, "_LiveSweep"] = {}


class _SweepCallback(tune.Callback):
    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir

    def _call(self, method: str, *args: Any) -> None:
        live = _LIVE.get(self.experiment_dir)
        if live is None:
            return
        try:
            getattr(live, method)(*args)
        except Exception as exc:  # bookkeeping must never stop the sweep; the final pass repairs it
            live.say(f"warning: {method} failed: {type(exc).__name__}: {exc}")

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._call("trial_started", trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any) -> None:
        self._call("trial_result", trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._call("trial_completed", trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._call("trial_errored", trial)


class _LiveSweep:
    """What the driver does as trials start and end: config files, progress lines, run status."""

    def __init__(self, spec: SweepSpec, client: MlflowClient, results_dir: Path, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.client = client
        self.results_dir = results_dir
        self.say = say
        self.base = config_to_dict(spec.base)

    def trial_started(self, trial: Trial) -> None:
        path = self.results_dir / TRIAL_CONFIG_DIR / f"{trial.trial_id}.yaml"
        if not path.exists():
            write_trial_config(self.spec, self.base, trial.trial_id, trial.config, path)
        params = " ".join(f"{key}={_short(value)}" for key, value in trial.config.items())
        self.say(f"trial {trial.trial_id} started: {params}")

    def trial_result(self, trial: Trial, result: dict) -> None:
        if result.get("diverged") or "phase" not in result:
            return
        value = result.get(self.spec.tune.metric, math.nan)
        self.say(
            f"trial {trial.trial_id} {phase_label(int(result['phase']), int(result['num_phases']))}: "
            f"{self.spec.tune.metric} {_short(value)}"
        )

    def trial_completed(self, trial: Trial) -> None:
        last = trial.last_result or {}
        if last.get("diverged"):
            self.say(f"trial {trial.trial_id} {last.get('error', 'diverged')}")
            return
        run_id = last.get("mlflow_run_id")
        done, total = int(last.get("phases_done", 0)), int(last.get("num_phases", 0))
        stopped = done < total
        if run_id:
            close_trial_run(self.client, run_id, STOPPED if stopped else FINISHED)
        if stopped:
            self.say(f"trial {trial.trial_id} stopped by the scheduler after phase {done}/{total}")
        else:
            self.say(f"trial {trial.trial_id} finished: {self.spec.tune.metric} {_short(last.get(self.spec.tune.metric))}")

    def trial_errored(self, trial: Trial) -> None:
        reason = error_line(trial.get_error() or "") or "the trial process failed"
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        if run_id:
            close_trial_run(self.client, run_id, FAILED, error=reason)
        self.say(f"trial {trial.trial_id} failed: {reason}")


def write_trial_config(spec: SweepSpec, base: Mapping[str, Any], trial_id: str, params: Mapping[str, Any], path: Path) -> None:
    cfg = trial_config(base, params)
    keys = ", ".join(params)
    header = f"Trial {trial_id} of sweep {spec.name}: its complete run config\n(the base config with {keys} sampled)"
    save_config(cfg, path, header=header)


def close_trial_run(client: MlflowClient, run_id: str, status: str, error: Optional[str] = None) -> None:
    """End a trial's run as its Tune outcome says, unless it already is (one read, one write).

    Tune stops a trial inside its report and may kill the worker before the trial could end its
    run itself, so the driver does it for stopped trials (FINISHED, tagged stopped_early) and
    for trials whose process died.
    """
    run = client.get_run(run_id)
    target = {FINISHED: "FINISHED", STOPPED: "FINISHED", DIVERGED: "FAILED", FAILED: "FAILED"}.get(status, "KILLED")
    tags = run.data.tags
    if status == STOPPED and tags.get(STOPPED_EARLY_TAG) != "true":
        client.set_tag(run_id, STOPPED_EARLY_TAG, "true")
    if status == FINISHED and STOPPED_EARLY_TAG in tags:
        client.delete_tag(run_id, STOPPED_EARLY_TAG)
    if run.info.status != target:
        if error and ERROR_TAG not in tags:
            client.set_tag(run_id, ERROR_TAG, error_tag_value(error))
        client.set_terminated(run_id, status=target)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TrialSummary:
    trial_id: str
    status: str
    params: dict[str, Any]
    num_phases: int
    metrics_by_phase: dict[int, dict[str, float]] = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None

    def values(self, metric: str) -> list[float]:
        """The metric after each reported phase, in phase order (NaN where missing)."""
        return [self.metrics_by_phase[p].get(metric, math.nan) for p in sorted(self.metrics_by_phase)]

    def last_value(self, metric: str) -> float:
        values = self.values(metric)
        return values[-1] if values else math.nan

    @property
    def phases_done(self) -> int:
        return len(self.metrics_by_phase)


@dataclass
class SweepOutcome:
    spec: SweepSpec
    experiment_dir: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    trials: list[TrialSummary]  # leaderboard order
    table_path: Path
    interrupted: bool
    wall_seconds: float

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.parent_run_id)

    @property
    def best(self) -> Optional[TrialSummary]:
        return next((t for t in self.trials if t.status == FINISHED), None)


def summarise_trials(experiment_dir: Path, spec: SweepSpec) -> list[TrialSummary]:
    """Every trial of the experiment, from Ray's stored state and result files (in trial order)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    frames = analysis.trial_dataframes
    base = config_to_dict(spec.base)
    summaries = []
    for trial in analysis.trials:
        params = dict(trial.config or {})
        last = trial.last_result or {}
        try:
            num_phases = 1 + trial_config(base, params).protocol.incremental_tasks
        except ConfigError:
            num_phases = int(last.get("num_phases", spec.max_phases))
        summary = TrialSummary(trial.trial_id, INCOMPLETE, params, num_phases, mlflow_run_id=last.get("mlflow_run_id"))
        summary.metrics_by_phase = _phase_metrics(frames.get(trial.trial_id))
        if trial.status == Trial.ERROR:
            summary.status, summary.error = FAILED, error_line(trial.get_error() or "") or "the trial failed"
        elif last.get("diverged"):
            summary.status, summary.error = DIVERGED, str(last.get("error", "diverged"))
        elif trial.status == Trial.TERMINATED:
            summary.status = FINISHED if summary.phases_done >= num_phases else STOPPED
        summaries.append(summary)
    return summaries


def _phase_metrics(frame) -> dict[int, dict[str, float]]:
    """Per-phase metrics from a trial's results; a phase reported twice keeps its last report."""
    if frame is None or frame.empty or "phase" not in frame:
        return {}
    rows: dict[int, dict[str, float]] = {}
    for record in frame.to_dict("records"):
        diverged = record.get("diverged")
        if _missing(record.get("phase")) or (not _missing(diverged) and bool(diverged)):
            continue
        metrics = {}
        for name, value in record.items():
            if name in METRIC_NAMES and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                metrics[name] = float(value)
        rows[int(record["phase"])] = metrics
    return rows


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def rank_trials(trials: Iterable[TrialSummary], metric: str, mode: str) -> list[TrialSummary]:
    """Finished trials best first by their final value, then stopped, diverged, failed, incomplete."""

    def key(trial: TrialSummary):
        value = trial.last_value(metric)
        missing = math.isnan(value)
        score = 0.0 if missing else (-value if mode == "max" else value)
        return STATUSES.index(trial.status), missing, score, trial.trial_id

    return sorted(trials, key=key)


def reconcile_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, trials: list[TrialSummary]) -> None:
    """Make every trial run's MLflow status agree with Tune's record (one search, few writes).

    Catches what the live callbacks could not: trials that ended while no driver was running,
    runs of an interrupted sweep (KILLED until it resumes), and runs of trials that a killed
    driver had started but never recorded (tagged orphaned; Tune ran that point again).
    """
    by_id = {t.trial_id: t for t in trials}
    for run in _child_runs(client, experiment_id, parent_run_id):
        tags = run.data.tags
        trial = by_id.get(tags.get(TRIAL_ID_TAG, ""))
        if trial is None or (trial.mlflow_run_id and trial.mlflow_run_id != run.info.run_id):
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, ORPHANED_TAG, "true")
                client.set_terminated(run.info.run_id, status="KILLED")
            continue
        trial.mlflow_run_id = run.info.run_id
        close_trial_run(client, run.info.run_id, trial.status, error=trial.error)


def _child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
            max_results=1000, page_token=token,
        )  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def write_table(trials: list[TrialSummary], spec: SweepSpec, path: Path) -> Path:
    """One row per trial x phase x metric, with the sampled values as columns and as JSON."""
    rows = []
    for trial in trials:
        params_json = json.dumps(trial.params, sort_keys=True, default=str)
        for phase in sorted(trial.metrics_by_phase):
            for metric, value in sorted(trial.metrics_by_phase[phase].items()):
                rows.append({
                    "trial_id": trial.trial_id, "mlflow_run_id": trial.mlflow_run_id, "phase": phase,
                    "metric": metric, "value": value, "status": trial.status, "error": trial.error,
                    "params": params_json,
                })  # fmt: skip
    types = {"phase": pa.int32(), "value": pa.float64()}
    names = ("trial_id", "mlflow_run_id", "phase", "metric", "value", "status", "error", "params")
    arrays = {name: pa.array([row[name] for row in rows], type=types.get(name, pa.string())) for name in names}
    for key in spec.space:
        by_trial = {t.trial_id: t.params.get(key) for t in trials}
        arrays[key] = _param_array([by_trial[row["trial_id"]] for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def _param_array(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed choices, e.g. [1, "auto"]
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def leaderboard_rows(trials: list[TrialSummary], spec: SweepSpec) -> list[dict[str, Any]]:
    """The leaderboard as plain rows (rank, trial, status, params, the metric per phase, final)."""
    metric = spec.tune.metric
    rows = []
    for rank, trial in enumerate(trials, start=1):
        row: dict[str, Any] = {"rank": rank, "trial_id": trial.trial_id, "status": trial.status}
        row.update({key: trial.params.get(key) for key in spec.space})
        for phase in range(spec.max_phases):
            row[f"{metric}@{phase}"] = trial.metrics_by_phase.get(phase, {}).get(metric, math.nan)
        row["final"] = trial.last_value(metric) if trial.status == FINISHED else math.nan
        beside = reported_beside(metric)
        if beside:
            row[f"final {beside}"] = trial.last_value(beside) if trial.status == FINISHED else math.nan
        row["mlflow_run_id"] = trial.mlflow_run_id
        row["error"] = trial.error
        rows.append(row)
    return rows


def leaderboard_table(trials: list[TrialSummary], spec: SweepSpec, limit: int = LEADERBOARD_ROWS):
    """A rich table of the top trials: the metric after each phase, then the sampled values.

    Ranked by the sweep's metric; a validation metric has its test counterpart beside it, which
    is reported, not selected on. The sampled values share one wrapping column, so that eight
    searched keys still fit a terminal.
    """
    from rich.table import Table

    metric = spec.tune.metric
    beside = reported_beside(metric)
    names = _short_names(list(spec.space))
    table = Table(title=f"sweep {spec.name}: {metric} per phase ({spec.tune.mode} is best)")
    table.add_column("#", justify="right")
    table.add_column("trial", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("final", justify="right", no_wrap=True)
    if beside:
        table.add_column(f"final {beside}", justify="right", no_wrap=True)
    table.add_column(f"{metric} by phase", no_wrap=True)
    table.add_column("sampled values", ratio=1)
    for rank, trial in enumerate(trials[:limit], start=1):
        per_phase = " ".join(_short(v, 2) for v in trial.values(metric)) or "-"
        final = _short(trial.last_value(metric), 2) if trial.status == FINISHED else "-"
        values = "  ".join(f"{names[k]}={_short(trial.params.get(k))}" for k in spec.space)
        reported = [_short(trial.last_value(beside), 2) if trial.status == FINISHED else "-"] if beside else []
        table.add_row(str(rank), trial.trial_id, trial.status, final, *reported, per_phase, values)
    if len(trials) > limit:
        table.caption = f"{len(trials) - limit} more trials in the results table"
    return table


def leaderboard_markdown(trials: list[TrialSummary], spec: SweepSpec) -> str:
    metric = spec.tune.metric
    beside = reported_beside(metric)
    names = _short_names(list(spec.space))
    header = ["#", "trial", "status", *names.values(), f"{metric} by phase", "final", *([f"final {beside}"] if beside else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, trial in enumerate(trials, start=1):
        per_phase = " ".join(_short(v, 2) for v in trial.values(metric)) or "-"
        final = _short(trial.last_value(metric), 2) if trial.status == FINISHED else "-"
        cells = [str(rank), trial.trial_id, trial.status, *(_short(trial.params.get(k)) for k in names), per_phase, final]
        if beside:
            cells.append(_short(trial.last_value(beside), 2) if trial.status == FINISHED else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short_names(keys: list[str]) -> dict[str, str]:
    """Dotted keys -> the shortest unambiguous suffix (train.lr -> lr)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            name = ".".join(parts[-length:])
            if sum(1 for other in keys if other == name or other.endswith("." + name)) == 1:
                break
        names[key] = name
    return names


def _short(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}" if digits == 2 else f"{value:.{digits}g}"
    return str(value)


def optuna_plots(trials: list[TrialSummary], spec: SweepSpec, folder: Path) -> list[str]:
    """Optimisation history and parameter importances as PNG; returns notes on what was skipped.

    The searcher's own study lives inside Tune's searcher state, so the study is rebuilt from
    the trials' results (which also covers trials run before a resume).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plt

    notes: list[str] = []
    study = study_from_trials(trials, spec)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    folder.mkdir(parents=True, exist_ok=True)
    plots = [("optimization_history.png", optuna_plt.plot_optimization_history, 1)]
    if len(spec.space) > 0:
        plots.append(("param_importances.png", optuna_plt.plot_param_importances, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, plot, needed in plots:
            if len(complete) < needed:
                notes.append(f"{name}: skipped, {len(complete)} finished trial(s), needs {needed}")
                continue
            try:
                ax = plot(study)
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.savefig(folder / name, dpi=100, bbox_inches="tight")
                plt.close(figure)
            except Exception as exc:
                notes.append(f"{name}: skipped ({type(exc).__name__}: {exc})")
    return notes


def study_from_trials(trials: list[TrialSummary], spec: SweepSpec) -> optuna.Study:
    metric = spec.tune.metric
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if spec.tune.mode == "max" else "minimize")
    distributions = spec.optuna_space()
    for trial in trials:
        params = {key: trial.params[key] for key in distributions if key in trial.params}
        if len(params) != len(distributions):
            continue
        intermediate = {phase: value for phase, value in enumerate(trial.values(metric)) if math.isfinite(value)}
        final = trial.last_value(metric)
        if trial.status == FINISHED and math.isfinite(final):
            state, value = optuna.trial.TrialState.COMPLETE, final
        elif trial.status == STOPPED:
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state, value = optuna.trial.TrialState.FAIL, None
        try:
            study.add_trial(optuna.trial.create_trial(
                state=state, value=value, params=params, distributions=distributions,
                intermediate_values=intermediate, user_attrs={"trial_id": trial.trial_id},
            ))  # fmt: skip
        except ValueError as exc:  # a value outside the space (edited results): leave it out
            logger.warning("trial %s left out of the optuna study: %s", trial.trial_id, exc)
    return study


# ---------------------------------------------------------------------------------------------
# The driver


def sweep_command(
    sweep_file: str,
    overrides: list[str],
    *,
    address: Optional[str] = None,
    storage: Optional[str] = None,
    resume: bool = False,
    tracking_uri: Optional[str] = None,
    data_root: Optional[str] = None,
    experiment: Optional[str] = None,
    say: Callable[[str], None] = print,
) -> SweepOutcome:
    """Everything `imbcil sweep` does. Each check that can fail runs before Ray starts."""
    started = time.monotonic()
    # Its data root is absolute: trials run in their own working directories.
    spec = load_sweep(sweep_file, overrides, data_root=data_root)
    warning = test_selection_warning(spec)
    if warning:
        say(warning)
    storage_dir = _storage_dir(storage)
    experiment_dir = storage_dir / spec.name
    results_dir = experiment_dir / RESULTS_DIR
    saved_spec = _saved_spec(results_dir)
    restorable = (experiment_dir / "tuner.pkl").is_file()
    if resume:
        if saved_spec is None:
            raise SweepError(f"--resume: no sweep {spec.name!r} in {storage_dir} (no {results_dir / SPEC_FILE})")
        key = differing_key(spec, saved_spec)
        if key is not None:
            raise ConfigError(
                f"{key}: differs from the sweep being resumed ({experiment_dir}); resume with the same sweep file and overrides"
            )
    elif restorable:
        raise SweepError(
            f"{experiment_dir} already holds sweep {spec.name!r}: pass --resume to continue it, "
            f"or choose another tune.name or --storage"
        )
    _check_data(spec)

    uri = absolute_store_uri(resolve_tracking_uri(tracking_uri))
    # Store (a fresh SQLite schema is created here, once, before trials race on it), artifacts,
    # cluster room for one trial, storage seen by every node, data on every node: `imbcil check`.
    checked = time.monotonic()
    results = preflight(uri, address=address, storage=str(storage_dir), cfg=spec.base, resources_per_trial=spec.tune.resources_per_trial)
    raise_on_failure(results)
    say(f"preflight: {sum(r.status == 'ok' for r in results)} checks passed in {time.monotonic() - checked:.1f} s")
    parent_info = _read_json(results_dir / PARENT_FILE)
    if parent_info and experiment and experiment != parent_info["experiment"]:
        logged = parent_info["experiment"]
        raise ConfigError(f"--experiment: sweep {spec.name!r} logs to experiment {logged!r}, not {experiment!r}")
    experiment_name = parent_info["experiment"] if parent_info else (experiment or spec.name)

    ray_started = _start_ray(address)
    parent = None
    try:
        parent = _open_parent_run(uri, experiment_name, spec, experiment_dir, parent_info)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        (results_dir / PARENT_FILE).write_text(json.dumps({"run_id": parent.run_id, "experiment": experiment_name}))
        searched = ", ".join(spec.space)
        say(f"sweep {spec.name}: {spec.tune.num_samples} trials searching {searched}; Ray results in {experiment_dir}")
        say(f"MLflow parent run: {parent.url}")
        orphans = _orphaned_runs(parent, experiment_dir) if resume and restorable else ()
        context = TrialContext(
            base=config_to_dict(spec.base), tracking_uri=uri, experiment=experiment_name,
            experiment_id=parent.experiment_id, parent_run_id=parent.run_id, sweep=spec.name,
            metric=spec.tune.metric, threads=max(1, int(spec.tune.resources_per_trial["cpu"])), orphans=orphans,
        )  # fmt: skip
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), dict(spec.tune.resources_per_trial))
        _LIVE[str(experiment_dir)] = _LiveSweep(spec, parent.retrying, results_dir, say)
        with _tune_settings():
            if resume and restorable:
                say(f"resuming sweep {spec.name} from {experiment_dir}")
                # Errored trials too: --resume means "finish what is not finished", and each
                # restarts from its last checkpoint.
                tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = _new_tuner(spec, trainable, storage_dir, experiment_dir)
            tuner.fit()
    except BaseException as exc:
        if parent is None or isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: Tune took the first
            if parent is not None:
                parent.finish("KILLED")
            raise
        fit_error = exc
    else:
        fit_error = None
    finally:
        _LIVE.pop(str(experiment_dir), None)
        if ray_started:
            import ray

            ray.shutdown()

    if fit_error is not None:
        reason = error_line(str(fit_error)) or type(fit_error).__name__
        try:  # record what the trials got done, so that MLflow and the table agree with a resume
            _finalise(spec, experiment_dir, uri, experiment_name, parent, started, say, failure=reason)
        except Exception as exc:
            parent.finish("FAILED", error=f"the sweep stopped: {reason}")
            logger.warning("could not summarise the stopped sweep: %s", exc)
        raise SweepStopped(f"the sweep stopped: {reason}; finished phases are kept, continue it with --resume") from fit_error
    try:
        return _finalise(spec, experiment_dir, uri, experiment_name, parent, started, say)
    except BaseException as exc:
        parent.finish("FAILED", error=f"could not summarise the sweep: {type(exc).__name__}: {exc}")
        raise


def _orphaned_runs(parent: RunTracker, experiment_dir: Path) -> tuple[tuple[str, str, str], ...]:
    """Unfinished trial runs whose trial Tune's saved state does not know (see TrialContext)."""
    from ray.tune import ExperimentAnalysis

    known = {trial.trial_id for trial in ExperimentAnalysis(str(experiment_dir)).trials}
    orphans = []
    for run in _child_runs(parent.retrying, parent.experiment_id, parent.run_id):
        tags = run.data.tags
        if tags.get(TRIAL_ID_TAG) not in known and run.info.status != "FINISHED" and PARAMS_TAG in tags:
            orphans.append((run.info.run_id, tags[TRIAL_ID_TAG], tags[PARAMS_TAG]))
    return tuple(orphans)


def _finalise(spec, experiment_dir, uri, experiment_name, parent, started, say, failure: Optional[str] = None) -> SweepOutcome:
    """Summarise the trials into the table, leaderboard and plots; end the parent run.

    Also after a failed fit (`failure`), so that MLflow and the table show what was done.
    """
    results_dir = experiment_dir / RESULTS_DIR
    trials = summarise_trials(experiment_dir, spec)
    base = config_to_dict(spec.base)
    for trial in trials:
        path = results_dir / TRIAL_CONFIG_DIR / f"{trial.trial_id}.yaml"
        if trial.params and not path.exists():
            write_trial_config(spec, base, trial.trial_id, trial.params, path)
    reconcile_runs(parent.retrying, parent.experiment_id, parent.run_id, trials)
    trials = rank_trials(trials, spec.tune.metric, spec.tune.mode)
    table_path = write_table(trials, spec, results_dir / TABLE_FILE)
    interrupted = any(t.status == INCOMPLETE for t in trials)
    with tempfile.TemporaryDirectory(prefix="imbcil-sweep-") as tmp:
        folder = Path(tmp)
        rows = leaderboard_rows(trials, spec)
        _write_csv(rows, folder / "leaderboard.csv")
        (folder / "leaderboard.md").write_text(leaderboard_markdown(trials, spec))
        (folder / TABLE_FILE).write_bytes(table_path.read_bytes())
        for note in optuna_plots(trials, spec, folder / "plots"):
            say(note)
        _log_summary(parent, trials, spec, folder)
    if failure is not None:
        parent.finish("FAILED", error=f"the sweep stopped: {failure}")
    else:
        parent.finish("KILLED" if interrupted else "FINISHED")
    return SweepOutcome(
        spec, experiment_dir, uri, experiment_name, parent.experiment_id, parent.run_id, trials, table_path,
        interrupted, time.monotonic() - started,
    )  # fmt: skip


def _log_summary(parent: RunTracker, trials: list[TrialSummary], spec: SweepSpec, folder: Path) -> None:
    client, run_id = parent.retrying, parent.run_id
    metric = spec.tune.metric
    counts = {status: sum(t.status == status for t in trials) for status in STATUSES}
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = [Metric(f"trials_{status}", float(n), now, 0) for status, n in counts.items()]
    best = next((t for t in trials if t.status == FINISHED), None)
    if best is not None:
        metrics.append(Metric(f"best_{metric}", best.last_value(metric), now, 0))
        client.set_tag(run_id, BEST_TRIAL_TAG, best.trial_id)
        if best.mlflow_run_id:
            client.set_tag(run_id, BEST_RUN_TAG, best.mlflow_run_id)
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    client.log_artifacts(run_id, str(folder))


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _missing(v) else v) for k, v in row.items()})


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    """Tune's knobs that only environment variables reach, for the duration of one fit."""
    knobs = {
        # With num_to_keep=1 Tune snapshots the experiment after each phase's checkpoint (which a
        # resume wants) and warns that this may be slow; for a few trials it takes milliseconds.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        # Tune's newer console output prints a banner whatever the verbosity; the classic one
        # honours verbose=0, and the driver prints its own line per trial event instead.
        "RAY_AIR_NEW_OUTPUT": "0",
    }
    # Its "Resume experiment with: Tuner.restore(...)" after Ctrl-C; the CLI says how instead.
    tune_logger = logging.getLogger("ray.tune.tune")
    saved_level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)
    try:
        with scoped_env(knobs, user_wins=True):
            yield
    finally:
        tune_logger.setLevel(saved_level)


def _new_tuner(spec: SweepSpec, trainable, storage_dir: Path, experiment_dir: Path) -> tune.Tuner:
    t = spec.tune
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples,
            search_alg=make_searcher(spec.optuna_space(), t.metric, t.mode, t.searcher_seed, t.max_concurrent, t.points_to_evaluate),
            scheduler=make_scheduler(t.scheduler, spec.max_phases, t.grace_period, t.reduction_factor),
            trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
            # A worker process runs one trial after another: no new interpreter, imports or data.
            reuse_actors=True,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(storage_dir),
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            # Only the newest checkpoint restarts a trial.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_SweepCallback(str(experiment_dir))],
            verbose=0,
        ),
    )


def _start_ray(address: Optional[str]) -> bool:
    """Join `address`, or start Ray here with all CPUs; False if this process had Ray running."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            start_local_ray(os.cpu_count() or 1, log_to_driver=False)
    except Exception as exc:
        where = f"connect to the Ray cluster at {address}" if address else "start Ray on this machine"
        raise SweepError(f"could not {where}: {error_line(str(exc)) or type(exc).__name__}") from None
    return True


def _storage_dir(storage: Optional[str]) -> Path:
    text = storage or DEFAULT_STORAGE
    if "://" in text:
        raise SweepError(f"--storage: give a directory (on a cluster, one every node sees), not a URI ({text})")
    return Path(text).expanduser().absolute()


def _check_data(spec: SweepSpec) -> None:
    """Fail before Ray starts when the data folder is missing; trials read the data themselves."""
    data = spec.base.data
    if not data.root:
        raise DataError(no_data_root(data.dataset))
    if not Path(data.root).exists():
        raise DataError(f"data root {data.root} does not exist")


def _saved_spec(results_dir: Path) -> Optional[SweepSpec]:
    path = results_dir / SPEC_FILE
    if not path.is_file():
        return None
    return spec_from_resolved(yaml.safe_load(path.read_text()))


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _open_parent_run(uri: str, experiment: str, spec: SweepSpec, experiment_dir: Path, saved: Optional[dict]) -> RunTracker:
    """The sweep's parent run: reopened when the storage folder names one, else created."""
    tags = {
        KIND_TAG: SWEEP_KIND, SWEEP_TAG: spec.name, STORAGE_TAG: str(experiment_dir),
        "dataset": spec.base.data.dataset, "protocol": protocol_name(spec.base), "learner": spec.base.learner.name,
    }  # fmt: skip
    if saved:
        return RunTracker(uri, experiment, run_id=saved["run_id"], tags=tags)
    parent = RunTracker(uri, experiment, run_name=spec.name, tags=tags)
    try:
        client, run_id = parent.retrying, parent.run_id
        params = [Param(f"tune.{k}", str(v)[:PARAM_VALUE_LIMIT]) for k, v in dataclasses.asdict(spec.tune).items()]
        params += [Param(f"space.{k}", d.describe()) for k, d in spec.space.items()]
        client.log_batch(run_id, params=params[:100], synchronous=True)
        client.log_text(run_id, spec.source_text or yaml.safe_dump(spec.to_dict(), sort_keys=False), "sweep_file.yaml")
        client.log_text(run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False), SPEC_FILE)
        space = {key: {"distribution": d.kind, "args": list(d.args)} for key, d in spec.space.items()}
        client.log_text(run_id, json.dumps(space, indent=2), "search_space.json")
    except Exception as exc:
        parent.finish("FAILED", error=f"could not log the sweep: {exc}")
        raise TrackingError(f"could not log the sweep to {parent.url}: {error_line(str(exc))}") from None
    return parent
