"""The sweep's search pieces on their own: they pick up where a killed driver left them.

ASHA and the median rule rebuild their record from the results each restored trial has on
disk, and the ConcurrencyLimiter takes its live trials from the restored searcher, so a resumed
sweep stops the same trials and passes the same completions to Optuna as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from pipeline.sweep.search import (
    REPORTED_AT,
    PhaseAwareOptunaSearch,
    make_scheduler,
    make_searcher,
    recorded_results,
)

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
METRIC = "val_avg_incremental_acc"


@dataclass(eq=False)  # hashed by identity, as Tune's trials are
class FakeTrial:
    """What the schedulers read of a Tune trial: its id, whether it reported, where its results are."""

    trial_id: str
    local_path: Optional[str] = None
    path: Optional[str] = None
    has_reported_at_least_once: bool = False


def fake_trial(trial_id, folder=None, reported=False):
    return FakeTrial(trial_id, str(folder) if folder else None, None, reported)


def report(phases_done, value, at):
    return {"phases_done": phases_done, METRIC: value, REPORTED_AT: at, "phase": phases_done - 1}


# Three trials, one after the other (as with max_concurrent 1), 4 phases each, ASHA rungs at 1 and 2.
# a: 50 40 30 20 (finishes); b: 60 35 (stopped at rung 2, below a's 40); c: 45 (stopped at rung 1,
# below the median of a's 50 and b's 60).
EVENTS = [("a", 1, 50.0), ("a", 2, 40.0), ("a", 3, 30.0), ("a", 4, 20.0), ("b", 1, 60.0), ("b", 2, 35.0), ("c", 1, 45.0)]


def uninterrupted_decisions():
    scheduler = make_scheduler("asha", max_phases=4, grace_period=1, reduction_factor=2)
    scheduler.set_search_properties(METRIC, "max")
    trials, decisions = {}, []
    for time_step, (trial_id, phases_done, value) in enumerate(EVENTS):
        if trial_id not in trials:
            trials[trial_id] = fake_trial(trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        decision = scheduler.on_trial_result(None, trials[trial_id], report(phases_done, value, time_step))
        decisions.append(decision)
        if decision == STOP:
            scheduler.on_trial_complete(None, trials[trial_id], report(phases_done, value, time_step))
    return decisions


def test_asha_decisions_of_the_uninterrupted_sweep():
    # a: rung 1 holds {a} -> go on; rung 2 {a} -> go on; 4 = max_t -> stop (finished)
    assert uninterrupted_decisions() == [CONTINUE, CONTINUE, CONTINUE, STOP, CONTINUE, STOP, STOP]


@pytest.mark.parametrize("killed_after", [2, 4, 5, 6])
def test_a_restored_asha_decides_as_the_uninterrupted_one(tmp_path, killed_after):
    expected = uninterrupted_decisions()
    # The killed driver's record: each trial's result.json up to the kill.
    done, folders = EVENTS[:killed_after], {}
    for time_step, (trial_id, phases_done, value) in enumerate(done):
        folders.setdefault(trial_id, tmp_path / f"trial_{trial_id}").mkdir(exist_ok=True)
        with open(folders[trial_id] / "result.json", "a") as handle:
            handle.write(json.dumps(report(phases_done, value, time_step)) + "\n")
    scheduler = make_scheduler("asha", max_phases=4, grace_period=1, reduction_factor=2)
    scheduler.set_search_properties(METRIC, "max")
    trials = {t: fake_trial(t, folder, reported=True) for t, folder in folders.items()}
    for trial in trials.values():  # Tune adds every restored trial before any new result
        scheduler.on_trial_add(None, trial)
    decisions = []
    for time_step, (trial_id, phases_done, value) in enumerate(EVENTS[killed_after:], start=killed_after):
        if trial_id not in trials:
            trials[trial_id] = fake_trial(trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        decisions.append(scheduler.on_trial_result(None, trials[trial_id], report(phases_done, value, time_step)))
    assert decisions == expected[killed_after:]


def test_a_phase_sent_again_after_a_restart_gets_its_first_answer(tmp_path):
    # b was stopped at rung 2 and the driver died before Tune recorded it: b resumes from its
    # phase-1 checkpoint and sends phase 2 again. A plain ASHA would find b already in rung 2
    # and let it go on.
    folders = {}
    for time_step, (trial_id, phases_done, value) in enumerate(EVENTS[:6]):
        folders.setdefault(trial_id, tmp_path / f"trial_{trial_id}").mkdir(exist_ok=True)
        with open(folders[trial_id] / "result.json", "a") as handle:
            handle.write(json.dumps(report(phases_done, value, time_step)) + "\n")
    scheduler = make_scheduler("asha", max_phases=4, grace_period=1, reduction_factor=2)
    scheduler.set_search_properties(METRIC, "max")
    b = fake_trial("b", folders["b"], reported=True)
    for trial in (fake_trial("a", folders["a"], reported=True), b):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, b, report(2, 35.0, 10)) == STOP


def test_recorded_results_skip_repeats_diverged_reports_and_a_cut_line(tmp_path):
    lines = [
        json.dumps(report(1, 50.0, 0)), json.dumps(report(2, 40.0, 1)), json.dumps(report(2, 41.0, 5)),
        json.dumps({"phases_done": 2, "diverged": True, METRIC: math.nan}), '{"phases_done": 3, "val_',
    ]  # fmt: skip
    (tmp_path / "result.json").write_text("\n".join(lines) + "\n")
    results = recorded_results(fake_trial("a", tmp_path, reported=True))
    assert [(r["phases_done"], r[METRIC]) for r in results] == [(1, 50.0), (2, 40.0)]
    assert recorded_results(fake_trial("b", tmp_path / "missing", reported=True)) == []


def test_a_restored_median_rule_has_each_trials_history(tmp_path):
    histories = {"a": [50.0, 40.0], "b": [30.0, 20.0], "c": [60.0, 50.0]}
    restored = []
    for trial_id, values in histories.items():
        folder = tmp_path / f"trial_{trial_id}"
        folder.mkdir()
        (folder / "result.json").write_text("".join(json.dumps(report(p + 1, v, p)) + "\n" for p, v in enumerate(values)))
        restored.append(fake_trial(trial_id, folder, reported=True))
    scheduler = make_scheduler("median", max_phases=4, grace_period=1, reduction_factor=2)
    scheduler.set_search_properties(METRIC, "max")
    for trial in restored:
        scheduler.on_trial_add(None, trial)
    d = fake_trial("d")
    scheduler.on_trial_add(None, d)
    controller = SimpleNamespace(get_live_trials=lambda: [])
    # Running means at t = 1: a 50, b 30, c 60 -> median 50; d's best, 45, is below it: stopped,
    # as the uninterrupted rule would have (an empty record would have let d go on).
    assert scheduler.on_trial_result(controller, d, report(1, 45.0, 9)) == STOP
    assert [r[METRIC] for r in scheduler._results[restored[0]]] == [50.0, 40.0]


def space():
    return {"train.lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)}


def test_a_restored_limiter_counts_the_searchers_unfinished_trials_and_passes_their_completion_on(tmp_path):
    limiter = make_searcher(space(), METRIC, "max", seed=3, max_concurrent=1)
    first = limiter.suggest("t1")
    limiter.on_trial_complete("t1", {METRIC: 30.0, "phases_done": 4, "num_phases": 4, "training_iteration": 4})
    second = limiter.suggest("t2")
    assert limiter.suggest("t3") is None  # one at a time
    path = tmp_path / "searcher.pkl"
    limiter.save(str(path))

    restored = make_searcher(space(), METRIC, "max", seed=3, max_concurrent=1)
    restored.restore(str(path))
    assert restored.live_trials == {"t2"}
    assert restored.suggest("t3") is None  # t2 still runs: no second trial beside it
    restored.on_trial_complete("t2", {METRIC: 42.0, "phases_done": 4, "num_phases": 4, "training_iteration": 4})
    study = restored.searcher.study
    assert [t.value for t in study.trials] == [30.0, 42.0]
    assert [t.params["train.lr"] for t in study.trials] == [first["train.lr"], second["train.lr"]]
    # The next proposal is the one the uninterrupted searcher makes.
    limiter.on_trial_complete("t2", {METRIC: 42.0, "phases_done": 4, "num_phases": 4, "training_iteration": 4})
    assert restored.suggest("t3") == limiter.suggest("t3")


def test_the_searcher_prunes_stopped_and_diverged_trials_instead_of_completing_them():
    searcher = PhaseAwareOptunaSearch(space=space(), metric="loss", mode="min", sampler=optuna.samplers.TPESampler(seed=0))
    for trial_id in ("done", "stopped", "diverged"):
        assert 0.01 <= searcher.suggest(trial_id)["train.lr"] <= 1.0
        searcher.on_trial_result(trial_id, {"loss": 2.0, "training_iteration": 1})
    searcher.on_trial_complete("done", {"loss": 1.5, "phases_done": 3, "num_phases": 3, "training_iteration": 3})
    # Tune never shows the stopping result to on_trial_result; the searcher records it itself.
    searcher.on_trial_complete("stopped", {"loss": 9.0, "phases_done": 2, "num_phases": 3, "training_iteration": 2})
    searcher.on_trial_complete("diverged", {"loss": math.nan, "diverged": True, "phases_done": 1, "num_phases": 3, "training_iteration": 2})
    done, stopped, diverged = searcher.study.get_trials(deepcopy=False)
    assert (done.state, done.value) == (optuna.trial.TrialState.COMPLETE, 1.5)
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.intermediate_values == {1: 2.0, 2: 9.0}
    assert diverged.state == optuna.trial.TrialState.PRUNED and math.isnan(diverged.intermediate_values[2])
    assert searcher.unfinished_trial_ids() == set()
