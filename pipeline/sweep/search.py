"""The search of a sweep: Optuna's proposals, the concurrency cap and the early-stopping rule.

Each piece also survives a killed driver. Tune snapshots the searcher with the experiment
(`Tuner.restore` loads it back), but not the scheduler, nor the ConcurrencyLimiter's set of
live trials, so a resumed sweep used to start with an empty ASHA record and a limiter that
ignored the completions of the trials it resumed (and so never passed them to Optuna). Here the
limiter takes its live trials from the restored searcher, and the schedulers rebuild their
record from the results each restored trial has on disk (`result.json`), replaying them in the
order they were reported. A resumed sweep then decides as the uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

# Added to every phase report by the trial: the wall-clock time it was sent, which orders the
# reports of trials running side by side when a scheduler replays them.
REPORTED_AT = "reported_at"
# A report of this phase count is the same report again (a trial restarted from an older checkpoint).
CLOCK = "phases_done"


class PhaseAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended.

    Ray's OptunaSearch completes every trial with its last reported value. A trial stopped
    after phase 2 of 10 would then count as complete with its phase-2 accuracy, which is higher
    than any finished trial's final one (accuracy falls as classes arrive), and TPE would chase
    the trials ASHA just rejected. Here a stopped trial is PRUNED (TPE ranks it below complete
    trials, by how far it got) and a diverged one PRUNED at a NaN step (the worst rank there).
    """

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        diverged = bool(result.get("diverged"))
        stopped = result.get("phases_done", 0) < result.get("num_phases", 0)
        if not (diverged or stopped):
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        step = int(result.get("training_iteration", 0))
        value = math.nan if diverged else float(result.get(self.metric, math.nan))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna warns when the step is already reported
                # The stopping result never reached on_trial_result: Tune skips it on STOP.
                ot_trial.report(value, step)
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:
            logger.warning("optuna could not record trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def unfinished_trial_ids(self) -> set[str]:
        """Trials proposed and not yet told: the ones a restored sweep still runs."""
        return set(self._ot_trials) - set(self._completed_trials)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


class ResumableConcurrencyLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter whose live trials come back with the searcher it wraps.

    Tune saves only the wrapped searcher; the limiter restarts with no live trial, so it would
    propose new trials beside the resumed ones and drop their completions instead of passing them
    on to Optuna.
    """

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.live_trials = self.searcher.unfinished_trial_ids()
        self.num_unfinished_live_trials = len(self.live_trials)


def recorded_results(trial: Trial) -> list[dict[str, Any]]:
    """The phase reports Tune recorded for a restored trial, oldest first, each phase once.

    Read from the trial's `result.json` (restored next to the experiment state, so the two
    agree). A diverged trial's last report never reached the scheduler and is left out.
    """
    results: list[dict[str, Any]] = []
    seen: set[int] = set()
    for folder in (trial.local_path, trial.path):
        path = Path(folder or "") / "result.json"
        if folder and path.is_file():
            break
    else:
        return results
    for line in path.read_text().splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill
            continue
        clock = result.get(CLOCK)
        if clock is None or result.get("diverged") or clock in seen:
            continue
        seen.add(clock)
        results.append(result)
    return results


class _ReplaysRecord:
    """Mixin: collects restored trials' reports as Tune adds them, replays them before the first new event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._to_replay: list[tuple[float, Trial, dict]] = []

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.has_reported_at_least_once:
            self._to_replay += [(r.get(REPORTED_AT, math.inf), trial, r) for r in recorded_results(trial)]

    def _replay_pending(self) -> None:
        pending, self._to_replay = self._to_replay, []
        for _, trial, result in sorted(pending, key=lambda item: (item[0], item[1].trial_id, item[2][CLOCK])):
            self._replay(trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._replay_pending()
        super().on_trial_complete(tune_controller, trial, result)


class ResumableASHA(_ReplaysRecord, ASHAScheduler):
    """ASHA that rebuilds its rungs from the recorded reports of the trials a resumed sweep restores.

    A replayed report enters its rung as it did the first time, and the decision it got then is
    kept: when the trial sends that phase again (restarted from an older checkpoint), it gets the
    same answer instead of a second entry.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replayed_decisions: dict[tuple[str, int], str] = {}

    def _replay(self, trial: Trial, result: dict) -> None:
        if self._metric not in result or trial.trial_id not in self._trial_info:
            return
        clock = result[self._time_attr]
        action = self._trial_info[trial.trial_id].on_result(trial, clock, self._metric_op * result[self._metric])
        if clock >= self._max_t and self._stop_last_trials:
            action = TrialScheduler.STOP
        self._replayed_decisions[(trial.trial_id, clock)] = action

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._replay_pending()
        decided = self._replayed_decisions.pop((trial.trial_id, result.get(self._time_attr)), None)
        if decided is not None:
            return decided
        return super().on_trial_result(tune_controller, trial, result)


class ResumableMedianStoppingRule(_ReplaysRecord, MedianStoppingRule):
    """The median rule with each restored trial's reports put back into its history."""

    def _replay(self, trial: Trial, result: dict) -> None:
        if self._time_attr in result and self._metric in result:
            self._results[trial].append(result)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._replay_pending()
        history = self._results.get(trial, [])
        if history and history[-1].get(CLOCK) == result.get(CLOCK):
            return TrialScheduler.CONTINUE  # a phase it already judged, sent again after a restart
        return super().on_trial_result(tune_controller, trial, result)


def make_searcher(
    space: dict, metric: str, mode: str, seed: int, max_concurrent: int, points_to_evaluate: Optional[list[dict]] = None
) -> ResumableConcurrencyLimiter:
    searcher = PhaseAwareOptunaSearch(
        space=space, metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=seed),
        points_to_evaluate=[dict(p) for p in points_to_evaluate or []] or None,
    )  # fmt: skip
    return ResumableConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(name: str, max_phases: int, grace_period: int, reduction_factor: float):
    """The early-stopping rule; its clock is `phases_done`, the number of completed phases.

    A count rather than the 0-based phase index, so that grace_period: 2 means "at least two
    phases before a trial can be stopped".
    """
    if name == "asha":
        return ResumableASHA(time_attr=CLOCK, max_t=max_phases, grace_period=grace_period, reduction_factor=reduction_factor)
    if name == "median":
        # No pausing to let pending trials run: a paused trial reloads its data and checkpoint.
        return ResumableMedianStoppingRule(time_attr=CLOCK, grace_period=grace_period, min_time_slice=10**9)
    return FIFOScheduler()
