"""The phase store: runs that agree on their first phases train them once and end up identical."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

import method.phases
from method.data import build_benchmark
from method.trainer import IncrementalTrainer
from pipeline.names import phase_from_tag
from pipeline.phase_store import META_FILE, PHASE_FILE, FolderPhaseStore, resolve_store_folder

from tests.method.test_trainer import small_config

# What no two runs share: the seconds things took, and whether the phase came from the store.
UNSHARED = {"train_seconds", "phase_seconds", "train_images_per_s", "phase_reused"}


def assert_same_run(a, b):
    for ra, rb in zip(a, b, strict=True):
        for name in ra.metrics.keys() - UNSHARED:
            va, vb = ra.metrics[name], rb.metrics[name]
            assert va == vb or (math.isnan(va) and math.isnan(vb)), (ra.phase, name, va, vb)
    for name, tensor in a[-1].state["model"].items():
        assert torch.equal(tensor, b[-1].state["model"][name]), name


@pytest.fixture
def tiny(data_root, cifar10_raw):
    cfg = small_config(data_root)
    return cfg, build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=cifar10_raw)


def train(cfg, benchmark, store=None):
    return list(IncrementalTrainer(cfg, benchmark=benchmark, phase_store=store).phases())


def test_a_run_that_takes_phase_0_from_the_store_equals_the_run_trained_from_scratch(tiny, tmp_path):
    cfg, benchmark = tiny
    scratch = train(cfg, benchmark)
    other = small_config(cfg.data.root)
    other.learner.dgr.lambda_b = 0.3  # a phase-1 field: the same phase 0
    store = FolderPhaseStore(tmp_path / "phases", owner="run-a")
    train(other, benchmark, store)
    shared = train(cfg, benchmark, store.for_owner("run-b"))
    assert [r.reused_from for r in shared] == ["run-a", None, None, None, None]
    assert [r.metrics["phase_reused"] for r in shared] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert_same_run(scratch, shared)
    # The next run takes all five: phase 0 trained by run-a, phases 1-4 by run-b.
    again = train(cfg, benchmark, store.for_owner("run-c"))
    assert [r.reused_from for r in again] == ["run-a", "run-b", "run-b", "run-b", "run-b"]
    assert_same_run(scratch, again)
    entries = {e.key: e for e in store.entries()}
    assert len(entries) == 9 and all(e.current for e in entries.values())
    first = [e for e in entries.values() if e.phase == 0]
    assert len(first) == 1 and first[0].trained_by == "run-a" and first[0].used_by == ["run-a", "run-b", "run-c"]


def test_a_corrupt_entry_is_reported_in_one_line_and_retrained(tiny, tmp_path):
    cfg, benchmark = tiny
    warnings = []
    store = FolderPhaseStore(tmp_path / "phases", owner="run-a", warn=warnings.append)
    reference = train(cfg, benchmark, store)
    (phase_0,) = [e for e in store.entries() if e.phase == 0]
    blob = tmp_path / "phases" / phase_0.key / PHASE_FILE
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = train(cfg, benchmark, store.for_owner("run-b"))
    assert warnings == [f"phase store: the entry of phase 0 ({phase_0.key[:12]}) is unusable (its checksum does not match); retraining it"]
    assert [r.reused_from for r in again] == [None, "run-a", "run-a", "run-a", "run-a"]
    assert_same_run(reference, again)
    assert store.read(phase_0.key, 0).trained_by == "run-b"  # stored again, whole


def test_an_entry_of_other_method_code_is_never_used(tiny, tmp_path, monkeypatch):
    cfg, benchmark = tiny
    warnings = []
    store = FolderPhaseStore(tmp_path / "phases", owner="run-a", warn=warnings.append)
    train(cfg, benchmark, store)
    # Other code names other keys: nothing matches.
    monkeypatch.setattr(method.phases, "code_version", lambda: "0.0+other")
    assert [r.reused_from for r in train(cfg, benchmark, store.for_owner("run-b"))] == [None] * 5
    monkeypatch.undo()
    # And an entry whose record names other code is put aside, even under a matching key.
    (phase_0,) = [e for e in store.entries() if e.phase == 0 and e.trained_by == "run-a"]
    meta_path = tmp_path / "phases" / phase_0.key / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "code_version": "0.0+old"}))
    assert store.read(phase_0.key, 0) is None
    assert "written by method code 0.0+old" in warnings[-1]


def test_a_run_waits_for_a_phase_another_run_is_training_and_takes_it(tiny, tmp_path):
    cfg, benchmark = tiny
    store = FolderPhaseStore(tmp_path / "phases", owner="first")
    trainer = IncrementalTrainer(cfg, benchmark=benchmark, phase_store=store)
    key = trainer.phase_keys[0]
    waited = {}
    with store.slot(key, 0) as claim:
        assert claim.entry is None and claim.wants_entry

        def second():
            started = time.monotonic()
            with store.for_owner("second").slot(key, 0) as slot:
                waited.update(entry=slot.entry, seconds=time.monotonic() - started)

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(2.5)
        assert thread.is_alive()  # waiting on the claim
        stored = next(iter(train_first_phase(trainer)))
        claim.save(stored)
    thread.join(timeout=30)
    assert waited["entry"].trained_by == "first" and waited["seconds"] >= 2.5


def train_first_phase(trainer):
    """Phase 0 as the store would keep it: a RecordingStore-like pass through the trainer."""
    recorded = []

    class Recorder:
        def slot(self, key, phase):
            import contextlib
            from types import SimpleNamespace

            return contextlib.nullcontext(SimpleNamespace(entry=None, wants_entry=True, save=recorded.append))

    trainer.phase_store = Recorder()
    next(trainer.phases())
    return recorded


def test_a_claim_left_by_a_dead_process_is_taken_over(tmp_path):
    warnings = []
    store = FolderPhaseStore(tmp_path, owner="alive", wait_s=600, warn=warnings.append)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "k.claim").write_text(json.dumps({"owner": "crashed-run", "host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    started = time.monotonic()
    with store.slot("k", 3) as slot:
        assert slot.entry is None and slot.wants_entry
    assert time.monotonic() - started < 5
    assert warnings == ["phase store: phase 3 (k) is claimed by crashed-run, which has not stored it; training it here"]


def test_the_store_folder_follows_option_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("IMBCIL_PHASE_STORE", raising=False)
    assert resolve_store_folder(None, tmp_path / "default") == tmp_path / "default"
    monkeypatch.setenv("IMBCIL_PHASE_STORE", str(tmp_path / "env"))
    assert resolve_store_folder(None, tmp_path / "default") == tmp_path / "env"
    assert resolve_store_folder("off", tmp_path / "default") is None
    monkeypatch.setenv("IMBCIL_PHASE_STORE", "OFF")
    assert resolve_store_folder(str(tmp_path / "cli"), None) == tmp_path / "cli"


# ---------------------------------------------------------------------------------------------
# The verbs, in subprocesses


TWO_RUNS = """
import json, sys
from method.data import build_benchmark
from method.trainer import IncrementalTrainer
from pipeline.phase_store import FolderPhaseStore
from pipeline.runtime import decoded_data
sys.path.insert(0, sys.argv[3])
from tests.method.test_trainer import small_config
cfg = small_config(sys.argv[1])
benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data))
trainer = IncrementalTrainer(cfg, benchmark=benchmark, phase_store=FolderPhaseStore(sys.argv[2], owner=sys.argv[4]))
open(sys.argv[4] + ".json", "w").write(json.dumps([r.reused_from for r in trainer.phases()]))
"""


def test_two_runs_started_together_train_each_shared_phase_once_and_both_finish(data_root, tmp_path):
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    repo = os.path.join(os.path.dirname(__file__), "..", "..")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    runs = [
        subprocess.Popen([sys.executable, str(script), str(data_root), str(tmp_path / "phases"), repo, name], cwd=tmp_path, env=env)
        for name in ("a", "b")
    ]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b"))
    # Every phase is trained by exactly one of the two; the other took it from the store.
    for phase, (from_a, from_b) in enumerate(zip(a, b)):
        assert sorted([from_a is None, from_b is None]) == [False, True], (phase, from_a, from_b)
    assert len(FolderPhaseStore(tmp_path / "phases").entries()) == 5


QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")
TINY_RUN = [
    "data.dataset=cifar10", "data.train_fraction=0.03", "data.test_fraction=0.05",
    "protocol.first_task_classes=6", "protocol.incremental_tasks=2",
    "train.epochs=1", "train.milestones=[1]", "device=cpu", "name=tiny-run",
]  # fmt: skip


def invoke(*args):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_run_takes_the_phases_it_shares_tags_them_and_the_store_lists_and_prunes(data_root, tmp_path):
    uri, store = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "phases"
    common = ["--data-root", data_root, "--tracking-uri", uri, "--phase-store", store]
    code, out, err = invoke("run", QUICKSTART, *TINY_RUN, *common)
    assert code == 0, out + err
    assert "phases reused from the store: 0 of 3" in out
    code, out, err = invoke("run", QUICKSTART, *TINY_RUN, "memory.per_class=5", *common)
    assert code == 0, out + err
    assert "phases reused from the store: 1 of 3 (phase 1/3)" in out
    client = MlflowClient(uri)
    first, second = runs_of(client, "tiny-run")
    assert [first.data.tags[phase_from_tag(p)] for p in range(3)] == [first.info.run_id] * 3
    assert [second.data.tags[phase_from_tag(p)] for p in range(3)] == [first.info.run_id, second.info.run_id, second.info.run_id]
    # The reused phase is logged in the second run too: its metrics, once, and its artifacts.
    for run in (first, second):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc")) == [0, 1, 2]
    assert client.get_metric_history(second.info.run_id, "phase_reused")[0].value == 1.0
    assert {a.path for a in client.list_artifacts(second.info.run_id, "phase_0")} >= {"phase_0/acc_matrix.csv", "phase_0/checkpoint.pt"}
    assert client.get_metric_history(first.info.run_id, "acc")[0].value == client.get_metric_history(second.info.run_id, "acc")[0].value

    # The table's title holds the store's path, and a long path (a pytest-xdist worker's) wraps
    # it: the words are compared, not the line breaks.
    code, out, err = invoke("phases", "--store", store)
    assert code == 0 and "5 entries" in words(out), out + err
    code, out, err = invoke("phases", "--store", store, "--older-than", "3")
    assert code == 2 and err.strip() == "error: --older-than, --stale-code and --all choose what --prune removes; add --prune"
    code, out, err = invoke("phases", "--store", store, "--prune", "--older-than", "1")
    assert code == 0 and "removed 0 entries" in words(out)
    code, out, err = invoke("phases", "--store", store, "--prune", "--all")
    assert code == 0 and "removed 5 entries" in words(out) and "0 entries" in words(out)


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.e2e
def test_reproduce_of_dgr_and_an_ablation_of_its_later_phases_trains_phase_0_once(data_root, tmp_path):
    import yaml

    tiny = {
        "device": "cpu", "data": {"dataset": "cifar10", "train_fraction": 0.03, "test_fraction": 0.05},
        "protocol": {"first_task_classes": 6, "incremental_tasks": 2}, "train": {"epochs": 1, "milestones": [1]},
    }  # fmt: skip
    configs = []
    for name, dgr in (("dgr", {}), ("no-inter", {"inter_phase_reweighting": False})):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump({"name": name, **tiny, "learner": {"name": "dgr", "dgr": dgr}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = invoke(
        "reproduce", *configs, "--seeds", "0", "--parallel", "1", "--experiment", "ablation", "--data-root", data_root,
        "--tracking-uri", uri, "--output", tmp_path / "out", "--phase-store", tmp_path / "phases",
    )  # fmt: skip
    assert code == 0, out + err
    assert "phases reused from the store: 1 of 6" in out
    children = [r for r in runs_of(MlflowClient(uri), "reproduce/ablation") if r.data.tags.get("imbcil.kind") == "reproduction-run"]
    trained_phase_0 = [r for r in children if r.data.tags[phase_from_tag(0)] == r.info.run_id]
    assert len(children) == 2 and len(trained_phase_0) == 1
    assert len({r.data.tags[phase_from_tag(0)] for r in children}) == 1
    assert len({r.data.tags[phase_from_tag(1)] for r in children}) == 2


def sweep_with_default_store(sweep_kit, data_root, tmp_path, num_samples, **sections):
    """`imbcil sweep` over learner.dgr.lambda_b and memory.per_class, the store where --storage puts it."""
    tune = {
        **sweep_kit.tune, "num_samples": num_samples, "scheduler": "none", "metric": "val_avg_incremental_acc",
        "mode": "max", "points_to_evaluate": [],
    }  # fmt: skip
    space = {"learner.dgr.lambda_b": {"uniform": [0.1, 2.0]}, "memory.per_class": {"int": [5, 30]}}
    sweep_file = sweep_kit.write_sweep(tmp_path / "sweep.yaml", space=space, tune=tune, **sections)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        sweep_kit.cli_command("sweep", sweep_file, "--data-root", data_root, "--storage", tmp_path / "ray_results", "--tracking-uri", uri),
        cwd=tmp_path, env=sweep_kit.cli_env(IMBCIL_PHASE_STORE=""), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return uri, done


@pytest.mark.e2e
def test_a_sweep_over_later_phase_settings_trains_phase_0_once(sweep_kit, data_root, tmp_path):
    """Four trials over learner.dgr.* and memory.*: the store (by default in --storage) holds one phase 0."""
    uri, done = sweep_with_default_store(sweep_kit, data_root, tmp_path, num_samples=4)
    assert f"phase store: {tmp_path / 'ray_results' / 'phases'}" in done.stdout
    client = MlflowClient(uri)
    trials = [r for r in runs_of(client, "tiny") if r.data.tags.get("imbcil.kind") == "trial"]
    assert len(trials) == 4
    assert sum(r.data.tags[phase_from_tag(0)] == r.info.run_id for r in trials) == 1
    for run in trials:
        for name in ("acc", "val_avg_incremental_acc", "phase_reused"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == list(range(sweep_kit.phases)), name
    assert "3 of 12 phases reused from the phase store" in done.stdout


@pytest.mark.e2e
def test_a_staged_sweep_goes_on_from_the_best_first_task_which_its_trials_take_from_the_store(sweep_kit, data_root, tmp_path):
    first_task = {"space": {"train.first_task.lr": {"categorical": [0.05, 0.01]}}, "num_samples": 2}
    uri, done = sweep_with_default_store(sweep_kit, data_root, tmp_path, num_samples=2, first_task=first_task)
    assert "stage 1 of 2, sweep tiny-first-task: train.first_task.lr on phase 0 alone" in done.stdout
    client = MlflowClient(uri)
    first = [r for r in runs_of(client, "tiny-first-task") if r.data.tags.get("imbcil.kind") == "trial"]
    second = [r for r in runs_of(client, "tiny") if r.data.tags.get("imbcil.kind") == "trial"]
    assert len(first) == 2 and len(second) == 2
    for run in first:  # phase 0 alone
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_avg_incremental_acc")] == [0]
    # The driver's choice, from its line; the best value (two trials may tie on so little data).
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("stage 1 best: ")]
    chosen = float(line.split("=", 1)[1].split(" ", 1)[0])
    best = next(r for r in first if json.loads(r.data.tags["imbcil.params"])["train.first_task.lr"] == chosen)
    assert best.data.metrics["val_avg_incremental_acc"] == max(r.data.metrics["val_avg_incremental_acc"] for r in first)
    for run in second:  # every phase, phase 0 the best first stage trial's
        assert run.data.params["train.first_task.lr"] == str(chosen)
        assert run.data.tags[phase_from_tag(0)] == best.info.run_id
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "acc")) == list(range(sweep_kit.phases))
    # The export of stage 2 carries stage 1's choice.
    exported = tmp_path / "best.yaml"
    code = subprocess.run(sweep_kit.cli_command("export", tmp_path / "ray_results" / "tiny", "-o", exported), cwd=tmp_path, env=sweep_kit.cli_env()).returncode
    import yaml

    assert code == 0 and yaml.safe_load(exported.read_text())["train"]["first_task"]["lr"] == chosen
