"""A sweep's results: the trials as Tune recorded them, their ranking, the Parquet table, the
leaderboard and the Optuna plots.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune.experiment import Trial

from method.results import METRIC_NAMES, reported_beside
from pipeline.config import ConfigError, config_to_dict
from pipeline.names import DIVERGED, FAILED, FINISHED, INCOMPLETE, STATUSES, STOPPED
from pipeline.runtime import error_line
from pipeline.sweep.spec import SweepSpec, trial_config


logger = logging.getLogger(__name__)

LEADERBOARD_ROWS = 20


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

    @property
    def phases_reused(self) -> int:
        """Reported phases whose training came from the phase store."""
        return sum(m.get("phase_reused") == 1.0 for m in self.metrics_by_phase.values())


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
            num_phases = min(1 + trial_config(base, params).protocol.incremental_tasks, spec.max_phases)
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
        row["phases_reused"] = trial.phases_reused
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
    table.add_column("reused", justify="right", no_wrap=True)
    table.add_column("sampled values", ratio=1)
    for rank, trial in enumerate(trials[:limit], start=1):
        per_phase = " ".join(short_value(v, 2) for v in trial.values(metric)) or "-"
        final = short_value(trial.last_value(metric), 2) if trial.status == FINISHED else "-"
        values = "  ".join(f"{names[k]}={short_value(trial.params.get(k))}" for k in spec.space)
        reported = [short_value(trial.last_value(beside), 2) if trial.status == FINISHED else "-"] if beside else []
        reused = f"{trial.phases_reused}/{trial.phases_done}"
        table.add_row(str(rank), trial.trial_id, trial.status, final, *reported, per_phase, reused, values)
    captions = [reuse_summary(trials)]
    if len(trials) > limit:
        captions.append(f"{len(trials) - limit} more trials in the results table")
    table.caption = "; ".join(captions)
    return table


def leaderboard_markdown(trials: list[TrialSummary], spec: SweepSpec) -> str:
    metric = spec.tune.metric
    beside = reported_beside(metric)
    names = _short_names(list(spec.space))
    header = ["#", "trial", "status", *names.values(), f"{metric} by phase", "final", *([f"final {beside}"] if beside else []), "reused"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, trial in enumerate(trials, start=1):
        per_phase = " ".join(short_value(v, 2) for v in trial.values(metric)) or "-"
        final = short_value(trial.last_value(metric), 2) if trial.status == FINISHED else "-"
        cells = [str(rank), trial.trial_id, trial.status, *(short_value(trial.params.get(k)) for k in names), per_phase, final]
        if beside:
            cells.append(short_value(trial.last_value(beside), 2) if trial.status == FINISHED else "-")
        cells.append(f"{trial.phases_reused}/{trial.phases_done}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + reuse_summary(trials) + "\n"


def reuse_summary(trials: list[TrialSummary]) -> str:
    """'12 of 40 phases reused from the phase store': what sharing saved the sweep."""
    done = sum(t.phases_done for t in trials)
    return f"{sum(t.phases_reused for t in trials)} of {done} phases reused from the phase store"


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


def short_value(value: Any, digits: int = 4) -> str:
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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _missing(v) else v) for k, v in row.items()})
