"""`imbcil export`: the complete run config of a sweep's best (or K-th best) trial as YAML.

The written file is a plain run config, every field explicit, that `imbcil run` and
`imbcil reproduce` accept unchanged; a header comment says where it came from. A sweep is found
by its results folder (`<storage>/<name>`, read without Ray or MLflow) or by its MLflow
experiment name (its trial runs and their `config.yaml` artifacts). Only trials that finished
every phase compete: a trial stopped early was judged on fewer phases.
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
from method.results import METRIC_NAMES
from pipeline.config import ConfigError, load_config, save_config
from pipeline.sweep_config import (
    FINISHED,
    KIND_TAG,
    MODES,
    RESULTS_DIR,
    SPEC_FILE,
    STOPPED_EARLY_TAG,
    TABLE_FILE,
    TRIAL_CONFIG_DIR,
    TRIAL_ID_TAG,
)
from pipeline.tracking import LAST_PHASE_TAG, redact_uri, resolve_tracking_uri


class ExportError(RuntimeError):
    """No sweep, or no finished trial, where the user pointed; the message is one line."""


@dataclass
class Candidate:
    trial_id: str
    value: float
    mlflow_run_id: Optional[str]
    load_config: Callable[[], RunConfig]  # called only for the chosen trial


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
    header = (
        f"Exported by imbcil export on {stamp}\n"
        f"sweep: {name} ({source})\n"
        f"trial: {chosen.trial_id}{run_note}, rank {rank} of {len(ordered)} finished trials\n"
        f"final {metric} = {chosen.value:.6g} ({mode} is best)\n"
        f"Run it with: imbcil run {output}"
    )
    path = save_config(cfg, output, header=header)
    return ExportOutcome(path, name, chosen.trial_id, chosen.mlflow_run_id, metric, mode, chosen.value, rank, len(ordered), cfg)


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
    final: dict[str, tuple[int, float, Optional[str]]] = {}
    for row in table.to_pylist():
        if row["status"] != FINISHED or row["metric"] != metric:
            continue
        seen = final.get(row["trial_id"])
        if seen is None or row["phase"] > seen[0]:
            final[row["trial_id"]] = (row["phase"], row["value"], row["mlflow_run_id"])
    candidates = []
    for trial_id, (_, value, run_id) in final.items():
        if value is None or not math.isfinite(value):
            continue
        config_path = folder / RESULTS_DIR / TRIAL_CONFIG_DIR / f"{trial_id}.yaml"
        candidates.append(Candidate(trial_id, value, run_id, lambda p=config_path: _config_file(p)))
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
        [experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    params = parents[0].data.params if parents else {}
    return client, experiment.experiment_id, params.get("tune.metric", "avg_incremental_acc"), params.get("tune.mode", "max")


def _candidates_from_mlflow(client, experiment_id: str, metric: str) -> list[Candidate]:
    candidates = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'trial' and attributes.status = 'FINISHED'",
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
                candidates.append(Candidate(trial_id, value, run_id, lambda r=run_id: _logged_config(client, r)))
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
