"""`imbcil export`: the complete run config of a sweep's best (or K-th best) trial as YAML.

The written file is a plain run config, every field explicit, that `imbcil run` and
`imbcil reproduce` accept unchanged; a header comment says where it came from. A sweep is found
by its results folder (`<storage>/<name>`, read without Ray or MLflow) or by its MLflow
experiment name (its trial runs and their `config.yaml` artifacts). Only trials that finished
every phase compete: a trial stopped early was judged on fewer phases. Trials are ranked by the
sweep's own metric, held-out validation by default; the header names it, with the chosen
trial's validation and test values, and `imbcil reproduce` reads that line back
(`read_selection`) to say in its report how the config was chosen.
"""

from __future__ import annotations

import datetime
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pyarrow.parquet as pq
import yaml

from method.config import RunConfig
from method.results import METRIC_NAMES, TEST_METRICS, VALIDATION_METRICS, metric_split, paired_metric, reported_beside
from pipeline.config import ConfigError, load_config, save_config
from pipeline.names import (
    FINISHED,
    KIND_TAG,
    LAST_PHASE_TAG,
    RESULTS_DIR,
    SPEC_FILE,
    STOPPED_EARLY_TAG,
    SWEEP_KIND,
    TABLE_FILE,
    TRIAL_CONFIG_DIR,
    TRIAL_ID_TAG,
    TRIAL_KIND,
)
from pipeline.sweep.spec import MODES
from pipeline.tracking import redact_uri, resolve_tracking_uri


class ExportError(RuntimeError):
    """No sweep, or no finished trial, where the user pointed; the message is one line."""


# The header line that records how an exported config was chosen.
SELECTION_PREFIX = "selected by: "


@dataclass
class Candidate:
    trial_id: str
    value: float
    mlflow_run_id: Optional[str]
    load_config: Callable[[], RunConfig]  # called only for the chosen trial
    finals: dict[str, float]  # every metric's last-phase value, for the header


@dataclass
class Selection:
    """How an exported config was chosen, as its header records it."""

    sweep: str
    trial_id: str
    metric: str
    value: float

    @property
    def split(self) -> str:
        return metric_split(self.metric)

    def line(self) -> str:
        return f"{SELECTION_PREFIX}{self.metric} = {self.value:.6g} ({self.split} data), sweep {self.sweep}, trial {self.trial_id}"


def read_selection(path: str | Path) -> Optional[Selection]:
    """The selection an `imbcil export` header records, or None for a config written otherwise."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if not text.startswith(SELECTION_PREFIX):
            continue
        try:
            head, sweep_part, trial_part = text[len(SELECTION_PREFIX) :].split(";")[0].split(", ")
            metric, value = head.split(" (")[0].split(" = ")
            return Selection(sweep_part.removeprefix("sweep "), trial_part.removeprefix("trial "), metric, float(value))
        except ValueError:
            return None
    return None


@dataclass
class ExportOutcome:
    path: Path
    sweep: str
    trial_id: str
    mlflow_run_id: Optional[str]
    metric: str
    mode: str
    value: float
    rank: int
    finished: int
    config: RunConfig
    reported_metric: Optional[str] = None  # the test metric paired with a validation `metric`
    reported_value: float = math.nan


def export_command(
    sweep: str,
    *,
    metric: Optional[str] = None,
    mode: Optional[str] = None,
    rank: int = 1,
    output: str | Path = "best.yaml",
    tracking_uri: Optional[str] = None,
) -> ExportOutcome:
    """Write the config of the trial ranked `rank` by its final `metric` (defaults: the sweep's own)."""
    if metric is not None and metric not in METRIC_NAMES:
        raise ConfigError(f"--metric: must be one of {', '.join(METRIC_NAMES)} (got {metric!r})")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode: must be one of {', '.join(MODES)} (got {mode!r})")
    if rank < 1:
        raise ConfigError(f"--rank: must be >= 1 (got {rank})")
    folder = Path(sweep).expanduser()
    if folder.is_dir():
        name, default_metric, default_mode, source = _sweep_folder(folder)
        metric, mode = metric or default_metric, mode or default_mode
        candidates = _candidates_from_folder(folder, metric)
    else:
        uri = resolve_tracking_uri(tracking_uri)
        name, source = sweep, f"MLflow experiment {sweep!r} in {redact_uri(uri)}"
        client, experiment_id, default_metric, default_mode = _mlflow_sweep(sweep, uri)
        metric, mode = metric or default_metric, mode or default_mode
        candidates = _candidates_from_mlflow(client, experiment_id, metric)
    if not candidates:
        raise ExportError(f"{sweep}: no trial finished every phase with a {metric} value ({source})")
    ordered = sorted(candidates, key=lambda c: (-c.value if mode == "max" else c.value, c.trial_id))
    if rank > len(ordered):
        raise ConfigError(f"--rank: {rank} asked for, but the sweep has {len(ordered)} finished trial(s)")
    chosen = ordered[rank - 1]
    cfg = chosen.load_config()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run_note = f", MLflow run {chosen.mlflow_run_id}" if chosen.mlflow_run_id else ""
    selection = Selection(name, chosen.trial_id, metric, chosen.value)
    header = [
        f"Exported by imbcil export on {stamp}",
        f"sweep: {name} ({source})",
        f"trial: {chosen.trial_id}{run_note}, rank {rank} of {len(ordered)} finished trials",
        f"{selection.line()}; {mode} is best",
        _finals_line(metric, chosen.finals),
        f"Run it with: imbcil run {output}",
    ]
    path = save_config(cfg, output, header="\n".join(header))
    reported = reported_beside(metric)
    return ExportOutcome(
        path, name, chosen.trial_id, chosen.mlflow_run_id, metric, mode, chosen.value, rank, len(ordered), cfg,
        reported_metric=reported, reported_value=chosen.finals.get(reported, math.nan) if reported else math.nan,
    )  # fmt: skip


def _finals_line(metric: str, finals: dict[str, float]) -> str:
    """The chosen trial's final values on both splits: what it was chosen by, and what it scored."""
    names = (metric, paired_metric(metric))
    validation = next((n for n in names if n in VALIDATION_METRICS), None)
    test = next((n for n in names if n in TEST_METRICS), None)
    parts = []
    for label, name in (("validation", validation), ("test", test)):
        if name is not None:
            parts.append(f"{label} {name} = {_value(finals.get(name))}")
    return "final " + ", ".join(parts) if parts else f"final {metric} = {_value(finals.get(metric))}"


def _value(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.6g}"


# ---------------------------------------------------------------------------------------------
# From a results folder


def _sweep_folder(folder: Path) -> tuple[str, str, str, str]:
    spec_path = folder / RESULTS_DIR / SPEC_FILE
    if not spec_path.is_file():
        raise ExportError(f"{folder}: not an imbcil sweep folder (no {RESULTS_DIR}/{SPEC_FILE}); give <storage>/<name> of a sweep")
    try:
        spec = yaml.safe_load(spec_path.read_text())
        tune = spec["tune"]
        return spec["name"], tune["metric"], tune["mode"], str(folder)
    except (yaml.YAMLError, KeyError, TypeError):
        raise ExportError(f"{spec_path}: not a sweep spec written by imbcil sweep") from None


def _candidates_from_folder(folder: Path, metric: str) -> list[Candidate]:
    table_path = folder / RESULTS_DIR / TABLE_FILE
    if not table_path.is_file():
        raise ExportError(
            f"{folder}: the sweep has no results table yet ({RESULTS_DIR}/{TABLE_FILE}); "
            f"finish it with imbcil sweep ... --resume"
        )
    table = pq.read_table(table_path, columns=["trial_id", "mlflow_run_id", "phase", "metric", "value", "status"])
    # trial -> metric -> (phase, value): each metric's value at the last phase that has it
    finals: dict[str, dict[str, tuple[int, float]]] = {}
    run_ids: dict[str, Optional[str]] = {}
    for row in table.to_pylist():
        if row["status"] != FINISHED:
            continue
        run_ids[row["trial_id"]] = row["mlflow_run_id"]
        by_metric = finals.setdefault(row["trial_id"], {})
        seen = by_metric.get(row["metric"])
        if seen is None or row["phase"] > seen[0]:
            by_metric[row["metric"]] = (row["phase"], row["value"])
    candidates = []
    for trial_id, by_metric in finals.items():
        value = by_metric.get(metric, (0, None))[1]
        if value is None or not math.isfinite(value):
            continue
        config_path = folder / RESULTS_DIR / TRIAL_CONFIG_DIR / f"{trial_id}.yaml"
        values = {name: v for name, (_, v) in by_metric.items() if v is not None}
        candidates.append(Candidate(trial_id, value, run_ids[trial_id], lambda p=config_path: _config_file(p), values))
    return candidates


def _config_file(path: Path) -> RunConfig:
    if not path.is_file():
        raise ExportError(f"{path}: the trial's config is missing from the sweep folder")
    return load_config(path)


# ---------------------------------------------------------------------------------------------
# From MLflow


def _mlflow_sweep(name: str, uri: str):
    """The experiment called `name`, and the metric and mode its sweep run was tuned for."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_tracking

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.exists():
            # Asking a store that is not there would create an empty one.
            raise ExportError(f"{name}: no such sweep folder, and no tracking store at {db}")
    check_tracking(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ExportError(f"{name}: no such sweep folder, and no MLflow experiment of that name in {redact_uri(uri)}")
    parents = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    params = parents[0].data.params if parents else {}
    # A sweep logged before validation metrics existed has no other metric than the test one.
    return client, experiment.experiment_id, params.get("tune.metric", "avg_incremental_acc"), params.get("tune.mode", "max")


def _candidates_from_mlflow(client, experiment_id: str, metric: str) -> list[Candidate]:
    candidates = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = '{TRIAL_KIND}' and attributes.status = 'FINISHED'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            tags, params = run.data.tags, run.data.params
            if tags.get(STOPPED_EARLY_TAG) == "true" or metric not in run.data.metrics:
                continue
            try:
                finished = int(tags[LAST_PHASE_TAG]) == int(params["protocol.incremental_tasks"])
            except (KeyError, ValueError):
                continue
            value = run.data.metrics[metric]  # MLflow keeps the value of the highest step: the last phase
            if finished and math.isfinite(value):
                run_id = run.info.run_id
                trial_id = tags.get(TRIAL_ID_TAG, run_id)
                finals = dict(run.data.metrics)
                candidates.append(Candidate(trial_id, value, run_id, lambda r=run_id: _logged_config(client, r), finals))
        token = page.token
        if not token:
            return candidates


def _logged_config(client, run_id: str) -> RunConfig:
    with tempfile.TemporaryDirectory(prefix="imbcil-export-") as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception:
            raise ExportError(f"run {run_id} has no config.yaml artifact") from None
        return load_config(path)
