"""`imbcil sweep`'s driver: validate, preflight, open the parent run, start or join Ray, run the Tuner.

The driver touches MLflow only when a trial starts or ends, never per phase. Its results land
next to Ray's, under `<storage>/<name>/imbcil/` (`pipeline.names`): the resolved spec, each
trial's complete run config, the parent run id and, at the end, the Parquet table that
`imbcil export` reads.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import optuna
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from method.config import protocol_name
from method.data import DataError, no_data_root
from method.events import phase_label
from method.metrics import VALIDATION_METRIC_VERSION
from pipeline import STARTED
from pipeline.check import preflight, raise_on_failure
from pipeline.config import ConfigError, config_to_dict, save_config
from pipeline.names import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    DEFAULT_STORAGE,
    DIVERGED,
    ERROR_TAG,
    FAILED,
    FINISHED,
    INCOMPLETE,
    KIND_TAG,
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
    VALIDATION_METRIC_TAG,
)
from pipeline.phase_store import PHASE_STORE_DIR, describe as describe_store, resolve_store_folder
from pipeline.runtime import RAY_START_S, absolute_store_uri, error_line, scoped_env, start_local_ray
from pipeline.sweep.spec import (
    SweepSpec,
    differing_key,
    load_sweep,
    spec_from_resolved,
    test_selection_warning,
    trial_config,
)
from pipeline.sweep.results import (
    TrialSummary,
    leaderboard_markdown,
    leaderboard_rows,
    optuna_plots,
    rank_trials,
    short_value,
    summarise_trials,
    write_csv,
    write_table,
)
from pipeline.sweep.search import make_scheduler, make_searcher
from pipeline.sweep.trial import TrialContext, run_trial
from pipeline.tracking import (
    PARAM_VALUE_LIMIT,
    RunTracker,
    TrackingError,
    error_tag_value,
    refuse_mixed_validation_metric,
    resolve_tracking_uri,
    run_url,
)


logger = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """A sweep that cannot start or resume (storage, Ray); the message is one line."""


class SweepStopped(RuntimeError):
    """Ray Tune ended the sweep with an error; what the trials finished is kept for --resume."""


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
        params = " ".join(f"{key}={short_value(value)}" for key, value in trial.config.items())
        self.say(f"trial {trial.trial_id} started: {params}")

    def trial_result(self, trial: Trial, result: dict) -> None:
        if result.get("diverged") or "phase" not in result:
            return
        value = result.get(self.spec.tune.metric, math.nan)
        self.say(
            f"trial {trial.trial_id} {phase_label(int(result['phase']), int(result['num_phases']))}: "
            f"{self.spec.tune.metric} {short_value(value)}"
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
            self.say(f"trial {trial.trial_id} finished: {self.spec.tune.metric} {short_value(last.get(self.spec.tune.metric))}")

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
    first_stage: Optional["SweepOutcome"] = None  # a staged sweep's first stage

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.parent_run_id)

    @property
    def best(self) -> Optional[TrialSummary]:
        return next((t for t in self.trials if t.status == FINISHED), None)


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
    phase_store: Optional[str] = None,
    say: Callable[[str], None] = print,
) -> SweepOutcome:
    """Everything `imbcil sweep` does. Each check that can fail runs before Ray starts.

    A staged sweep (a `first_task:` section) is two sweeps in one storage folder: the first
    searches the first task's settings on phase 0 alone, the second starts from the best of them,
    so that its trials all take that phase 0 from the phase store. `--resume` continues whichever
    stage was cut off.
    """
    started = time.monotonic()
    # Its data root is absolute: trials run in their own working directories.
    spec = load_sweep(sweep_file, overrides, data_root=data_root)
    warning = test_selection_warning(spec)
    if warning:
        say(warning)
    options = dict(address=address, storage=storage, tracking_uri=tracking_uri, experiment=experiment, phase_store=phase_store, say=say)
    first = spec.first_stage()
    if first is None:
        return _run_sweep(spec, resume=resume, started=started, **options)
    if phase_store is not None and phase_store.strip().lower() == "off":
        say("warning: the phase store is off, so the second stage trains phase 0 again in every trial")
    say(f"stage 1 of 2, sweep {first.name}: {', '.join(first.space)} on phase 0 alone")
    stage_one = _run_sweep(first, resume=resume, started=started, **options)
    best = stage_one.best
    if stage_one.interrupted or best is None:
        if best is None and not stage_one.interrupted:
            raise SweepError(f"stage 1 ({first.name}) finished no trial, so there is no first task to go on from")
        return stage_one
    chosen = {key: best.params[key] for key in first.space}
    say(
        f"stage 1 best: {', '.join(f'{k}={v}' for k, v in chosen.items())} ({spec.tune.metric} "
        f"{best.last_value(spec.tune.metric):.4f}, trial {best.trial_id}); stage 2 of 2, sweep {spec.name}, goes on from it"
    )
    second = spec.with_first_task_of(chosen)
    # A resume that cut stage 1 off has no stage 2 yet to resume.
    stage_two_saved = _saved_spec(_storage_dir(storage) / second.name / RESULTS_DIR) is not None
    outcome = _run_sweep(second, resume=resume and stage_two_saved, started=started, **options)
    outcome.first_stage = stage_one
    return outcome


# A trial's own start in its worker: imports, its MLflow run (about 5 s on 2 cores).
TRIAL_START_S = 5.0


@dataclass
class StagePlan:
    name: str
    trials: int
    concurrent: int
    phases: list  # method.plan.PhasePlan, for the base config
    reused_phase_0: bool  # a staged sweep's main stage takes phase 0 from the store
    trial_s: float
    stage_s: float


@dataclass
class SweepPlan:
    """`sweep --dry-run`: each stage's trials, phases and concurrency, and the wall-time estimate."""

    spec: SweepSpec
    stages: list[StagePlan]
    preflight: list
    rates: Any  # method.plan.Rates, measured with a trial's threads
    threads: int
    estimate_s: float


def plan_sweep(
    sweep_file: str,
    overrides: list[str],
    *,
    address: Optional[str] = None,
    storage: Optional[str] = None,
    resume: bool = False,
    tracking_uri: Optional[str] = None,
    data_root: Optional[str] = None,
    phase_store: Optional[str] = None,
) -> SweepPlan:
    """The sweep's checks, writing nothing, and its plan: no Ray, no trial, no run.

    Every trial is counted with every phase (a scheduler that stops trials early makes it
    shorter) and with the base config's values of the searched keys. Trials run as many at a
    time as `tune.max_concurrent` and this machine's CPUs and GPUs allow, or, on a cluster,
    as `tune.max_concurrent` says.
    """
    import torch

    from method.data import build_benchmark
    from method.plan import estimate_seconds, measure_rates, plan_phases, training_seconds
    from method.trainer import resolve_device
    from pipeline.runtime import decoded_data

    spec = load_sweep(sweep_file, overrides, data_root=data_root)
    storage_dir = _storage_dir(storage)
    if not resume and (storage_dir / spec.name / "tuner.pkl").is_file():
        raise SweepError(f"{storage_dir / spec.name} already holds sweep {spec.name!r}: pass --resume to continue it, or choose another tune.name or --storage")
    _check_data(spec)
    uri = absolute_store_uri(resolve_tracking_uri(tracking_uri))
    results = preflight(uri, address=address, storage=str(storage_dir), cfg=spec.base, resources_per_trial=spec.tune.resources_per_trial, dry_run=True)
    raise_on_failure(results)
    base = spec.base
    benchmark = build_benchmark(base.data, base.protocol, base.seed, raw=decoded_data(base.data))
    need = {str(k).lower(): float(v) for k, v in spec.tune.resources_per_trial.items()}
    threads = max(1, int(need.get("cpu", 1)))
    startup_s = time.perf_counter() - STARTED  # before the measurement, which a real sweep does not make
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # as each trial runs (TrialContext.threads)
    try:
        rates = measure_rates(base, benchmark, resolve_device(base.device))
    finally:
        torch.set_num_threads(saved_threads)
    store_on = resolve_store_folder(phase_store, storage_dir / PHASE_STORE_DIR) is not None
    first = spec.first_stage()
    stages = []
    for stage in [first, spec] if first is not None else [spec]:
        phases = plan_phases(stage.base, benchmark)[: stage.phases]
        reused = stage is spec and first is not None and store_on
        trial_s = TRIAL_START_S + estimate_seconds(phases, rates)
        if reused:
            trial_s -= training_seconds(phases[0], rates)
        concurrent = _concurrency(stage.tune, need, address)
        waves = math.ceil(stage.tune.num_samples / concurrent)
        stages.append(StagePlan(stage.name, stage.tune.num_samples, concurrent, phases, reused, trial_s, waves * trial_s))
    estimate = startup_s + RAY_START_S * len(stages) + sum(stage.stage_s for stage in stages)
    return SweepPlan(spec, stages, results, rates, threads, estimate)


def _concurrency(tune_settings, need: Mapping[str, float], address: Optional[str]) -> int:
    """Trials at once: the sweep's cap, and without --address this machine's CPUs and GPUs."""
    cap = tune_settings.max_concurrent or tune_settings.num_samples
    if address:
        return max(1, min(cap, tune_settings.num_samples))
    fits = [cap, tune_settings.num_samples]
    if need.get("cpu", 0) > 0:
        fits.append(int((os.cpu_count() or 1) // need["cpu"]))
    if need.get("gpu", 0) > 0:
        import torch

        fits.append(int(torch.cuda.device_count() // need["gpu"]))
    return max(1, min(fits))


def _run_sweep(
    spec: SweepSpec,
    *,
    address: Optional[str],
    storage: Optional[str],
    resume: bool,
    tracking_uri: Optional[str],
    experiment: Optional[str],
    phase_store: Optional[str],
    say: Callable[[str], None],
    started: float,
) -> SweepOutcome:
    """One sweep (one stage of a staged one): checks, Ray, the parent run, the Tuner, the summary."""
    storage_dir = _storage_dir(storage)
    experiment_dir = storage_dir / spec.name
    # In the storage folder, which every node sees: the sweeps kept there share their phases.
    store = resolve_store_folder(phase_store, storage_dir / PHASE_STORE_DIR)
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
        parent_info = _read_json(results_dir / PARENT_FILE)
        if parent_info:  # a sweep cut off before its parent run logged nothing to mix with
            refuse_mixed_validation_metric(parent_info.get("validation_metric", 1), f"sweep {spec.name!r} ({experiment_dir})")
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
        parent_record = {"run_id": parent.run_id, "experiment": experiment_name, "validation_metric": VALIDATION_METRIC_VERSION}
        (results_dir / PARENT_FILE).write_text(json.dumps(parent_record))
        searched = ", ".join(spec.space)
        say(f"sweep {spec.name}: {spec.tune.num_samples} trials searching {searched}; Ray results in {experiment_dir}")
        say(trial_placement(spec.tune.resources_per_trial))
        say(f"MLflow parent run: {parent.url}")
        say(describe_store(store))
        orphans = _orphaned_runs(parent, experiment_dir) if resume and restorable else ()
        context = TrialContext(
            base=config_to_dict(spec.base), tracking_uri=uri, experiment=experiment_name,
            experiment_id=parent.experiment_id, parent_run_id=parent.run_id, sweep=spec.name,
            metric=spec.tune.metric, threads=max(1, int(spec.tune.resources_per_trial["cpu"])), orphans=orphans,
            phase_store=None if store is None else str(store), phases=spec.phases,
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
        write_csv(rows, folder / "leaderboard.csv")
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
    client.log_batch(run_id, metrics=metrics)
    client.log_artifacts(run_id, str(folder))


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


def trial_placement(resources: Mapping[str, float]) -> str:
    """Where trials train: a task given no GPU is kept off the cards (runtime.ray_task_device)."""
    cpus, gpus = resources.get("cpu", 1.0), resources.get("gpu", 0.0)
    if gpus == 0:
        return f"trials run on the CPU ({cpus:g} core(s) each; tune.resources_per_trial.gpu is 0)"
    return f"trials run on the GPU ({gpus:g} GPU and {cpus:g} core(s) each)"


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _open_parent_run(uri: str, experiment: str, spec: SweepSpec, experiment_dir: Path, saved: Optional[dict]) -> RunTracker:
    """The sweep's parent run: reopened when the storage folder names one, else created."""
    tags = {
        KIND_TAG: SWEEP_KIND, SWEEP_TAG: spec.name, STORAGE_TAG: str(experiment_dir), VALIDATION_METRIC_TAG: VALIDATION_METRIC_VERSION,
        "dataset": spec.base.data.dataset, "protocol": protocol_name(spec.base), "learner": spec.base.learner.name,
    }  # fmt: skip
    if saved:
        return RunTracker(uri, experiment, run_id=saved["run_id"], tags=tags)
    parent = RunTracker(uri, experiment, run_name=spec.name, tags=tags)
    try:
        client, run_id = parent.retrying, parent.run_id
        params = [Param(f"tune.{k}", str(v)[:PARAM_VALUE_LIMIT]) for k, v in dataclasses.asdict(spec.tune).items()]
        params += [Param(f"space.{k}", d.describe()) for k, d in spec.space.items()]
        client.log_batch(run_id, params=params[:100])
        client.log_text(run_id, spec.source_text or yaml.safe_dump(spec.to_dict(), sort_keys=False), "sweep_file.yaml")
        client.log_text(run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False), SPEC_FILE)
        space = {key: {"distribution": d.kind, "args": list(d.args)} for key, d in spec.space.items()}
        client.log_text(run_id, json.dumps(space, indent=2), "search_space.json")
    except Exception as exc:
        parent.finish("FAILED", error=f"could not log the sweep: {exc}")
        raise TrackingError(f"could not log the sweep to {parent.url}: {error_line(str(exc))}") from None
    return parent
