"""Every name imbcil writes for others to read back: MLflow tags, artifact paths, result folders.

One home, so that a verb that reads what another wrote (`export` reading a sweep, `run --resume`
reading a run) spells each name the same way. Nothing here imports MLflow or Ray.
"""

from __future__ import annotations

# ------------------------------------------------------------------ MLflow's own tags

# Without this tag MLflow 3.x opens experiments on its GenAI overview page (design.md, Tracking).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
USER_TAG = "mlflow.user"

# ------------------------------------------------------------------ imbcil's tags

KIND_TAG = "imbcil.kind"  # one of the kinds below
SWEEP_KIND, TRIAL_KIND = "sweep", "trial"  # a sweep's parent run, and each trial's
REPRODUCTION_KIND, REPRODUCTION_RUN_KIND = "reproduction", "reproduction-run"  # its parent, each seed's
# "Phase t is fully logged": set only after the phase's metrics and artifacts are stored, so a
# resumed run never trusts a phase that was cut off half way.
LAST_PHASE_TAG = "imbcil.last_phase"


def phase_from_tag(phase: int) -> str:
    """The run that trained phase `phase` of this run: itself, or the one whose stored phase it took."""
    return f"imbcil.phase_{phase}_from"


# What the run's validation metrics mean (method.metrics.VALIDATION_METRIC_VERSION); absent on
# runs and sweeps logged before it was recorded, which measured version 1.
VALIDATION_METRIC_TAG = "imbcil.validation_metric"
ERROR_TAG = "imbcil.error"
RUN_KEY_TAG = "imbcil.run_key"  # what makes a retried run creation find the run it made
PROBE_TAG = "imbcil.preflight_probe"
# Sweeps
SWEEP_TAG = "imbcil.sweep"
TRIAL_ID_TAG = "imbcil.trial_id"
PARAMS_TAG = "imbcil.params"  # a trial's sampled values as JSON
# The Ray node the trial last ran on (a restarted trial may move: the tag follows it).
NODE_ID_TAG = "imbcil.ray_node_id"
NODE_IP_TAG = "imbcil.ray_node_ip"
STOPPED_EARLY_TAG = "imbcil.stopped_early"
DIVERGED_TAG = "imbcil.diverged"
ORPHANED_TAG = "imbcil.orphaned"
ADOPTED_FROM_TAG = "imbcil.adopted_from"
STORAGE_TAG = "imbcil.storage"
BEST_TRIAL_TAG = "imbcil.best_trial_id"
BEST_RUN_TAG = "imbcil.best_run_id"
# Reproductions
CONFIG_NAME_TAG = "imbcil.config_name"

# ------------------------------------------------------------------ stores and folders

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default store, in the working directory
DEFAULT_STORAGE = "ray_results"  # a sweep's Ray results and checkpoints

# A sweep's own results, next to Ray's in <storage>/<name>/
RESULTS_DIR = "imbcil"
SPEC_FILE = "sweep.yaml"  # the resolved SweepSpec
PARENT_FILE = "parent_run.json"  # the parent run id, so that a resumed driver reuses the run
TRIAL_CONFIG_DIR = "trial_configs"  # <trial_id>.yaml: each trial's complete run config
TABLE_FILE = "trials.parquet"  # one row per trial x phase x metric

# A reproduction's folder
REPRODUCTION_TABLE_FILE = "results.parquet"
REPORT_FILE = "report.md"
REPORT_PLOT_FILE = "acc_per_phase.png"

# ------------------------------------------------------------------ a trial's outcome

# In the order a leaderboard lists them; also the `status` column of trials.parquet.
FINISHED, STOPPED, DIVERGED, FAILED, INCOMPLETE = "finished", "stopped", "diverged", "failed", "incomplete"
STATUSES = (FINISHED, STOPPED, DIVERGED, FAILED, INCOMPLETE)
