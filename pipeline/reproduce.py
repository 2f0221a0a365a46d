"""`imbcil reproduce`: final runs of one or more configs over several seeds, aggregated.

Each (config, seed) is one tracked MLflow run, trained by `run.train_tracked`, nested under a
parent run that holds the mean and std over seeds and the report. Runs go through Ray tasks
(one CPU each by default) when more than one can run at once; otherwise, and whenever Ray would
only add its start-up time, they run one after another in this process. Everything a user can
get wrong (configs, data, tracking store, Ray address) is checked before the first run starts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from method.config import RunConfig, paper_budget, protocol_name
from method.data import build_benchmark
from method.events import PhaseDone, ProgressCallback, ProgressEvent, phase_label
if TYPE_CHECKING:
    import torch

from pipeline import STARTED, report
from pipeline.check import preflight, raise_on_failure
from pipeline.config import ConfigError, dump_yaml, resolve, validate
from pipeline.names import (
    CONFIG_NAME_TAG,
    KIND_TAG,
    REPORT_FILE,
    REPORT_PLOT_FILE,
    REPRODUCTION_KIND,
    REPRODUCTION_RUN_KIND,
    REPRODUCTION_TABLE_FILE,
)
from pipeline.run import train_tracked
from pipeline.phase_store import PHASE_STORE_DIR, describe as describe_store, resolve_store_folder, user_store_folder
from pipeline.runtime import RAY_START_S, absolute_store_uri, decoded_data, ray_task_device, unwritable_ancestor, exception_line, forget_decoded_data, start_local_ray
from pipeline.tracking import (
    RunTracker,
    TrackingError,
    redact_uri,
    resolve_tracking_uri,
    run_url,
)

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_OUTPUT = Path("reproduce_results")
EXPERIMENT_PREFIX = "reproduce/"
# Ray reads this when it is imported: off, a local head keeps every port on the loopback address
# instead of resolving 127.0.0.1 to the machine's routable IP.
_INTEGER = re.compile(r"^\d+$")
_METRIC_KEY_UNSAFE = re.compile(r"[^\w.\- /:]")
_PATH_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ClusterError(ConfigError):
    """The Ray cluster is unreachable or too small; one line, like any other input error."""


class RunsFailed(RuntimeError):
    """Some runs failed; the others are aggregated and reported, and the command exits 1."""


# ---------------------------------------------------------------------------------------------
# Command line arguments


def parse_seeds(values: Sequence[str]) -> list[int]:
    """`--seeds` values, each one seed or several separated by commas or spaces."""
    seeds: list[int] = []
    for value in values:
        for part in re.split(r"[,\s]+", str(value).strip()):
            if not part:
                continue
            if not _INTEGER.match(part):
                raise ConfigError(f"--seeds: {part!r} is not a non-negative integer")
            seed = int(part)
            if seed in seeds:
                # The same seed twice gives the same number twice and shrinks the std.
                raise ConfigError(f"--seeds: seed {seed} is given twice")
            seeds.append(seed)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return seeds


def split_arguments(tokens: Sequence[str], seeds_given: bool) -> tuple[list[str], list[str], list[str]]:
    """Positional tokens -> (config paths, key=value overrides, seed tokens).

    Click gives an option one value, so in `--seeds 0 1 2` the 1 and 2 arrive as positional
    tokens; a bare integer that is no file is therefore a seed, but only after --seeds.
    """
    configs, overrides, seeds = [], [], []
    for token in tokens:
        if Path(token).is_file():
            configs.append(token)
        elif "=" in token:
            overrides.append(token)
        elif _INTEGER.match(token):
            if not seeds_given:
                raise ConfigError(f"{token}: neither a config file nor key=value; seeds go after --seeds (e.g. --seeds 0 1 2)")
            seeds.append(token)
        else:
            configs.append(token)  # load_config names the missing file
    if not configs:
        raise ConfigError("config: give at least one run config YAML")
    return configs, overrides, seeds


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class ConfigEntry:
    config_name: str
    path: str
    cfg: RunConfig


@dataclass
class Plan:
    name: str
    experiment: str
    output_dir: Path
    entries: list[ConfigEntry]
    seeds: list[int]
    full_budget: bool
    tracking_uri: str
    address: Optional[str]
    command: str = ""
    phase_store: Optional[Path] = None  # shared phases; None: off

    @property
    def num_runs(self) -> int:
        return len(self.entries) * len(self.seeds)


def _unique_names(configs: Sequence[RunConfig]) -> list[str]:
    """Config names for the table; a repeated name gets its learner, then a number, appended."""
    names: list[str] = []
    for cfg in configs:
        name = cfg.name
        if name in names:
            name = f"{cfg.name}-{cfg.learner.name}"
        number = 2
        while name in names:
            name = f"{cfg.name}-{number}"
            number += 1
        names.append(name)
    return names


def _setting(cfg: RunConfig) -> str:
    return f"{cfg.data.dataset} {cfg.data.scenario} {protocol_name(cfg)}"


def make_plan(
    config_paths: Sequence[str],
    overrides: Sequence[str],
    seeds: Sequence[int],
    *,
    full_budget: bool = False,
    address: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    data_root: Optional[str] = None,
    output: Optional[str] = None,
    experiment: Optional[str] = None,
    device: Optional[str] = None,
    phase_store: Optional[str] = None,
) -> Plan:
    """Load and validate every config; all configs must share one setting (one paper column)."""
    configs = []
    for path in config_paths:
        cfg = resolve(path, overrides, data_root=data_root, device=device)
        if full_budget:
            paper_budget(cfg)
            validate(cfg)
        configs.append(cfg)
    reference = _setting(configs[0])
    for path, cfg in zip(config_paths, configs):
        if _setting(cfg) != reference:
            raise ConfigError(
                f"{path}: runs {_setting(cfg)}, but {config_paths[0]} runs {reference}; "
                "one reproduction compares learners on one setting"
            )
    if experiment:
        name = experiment[len(EXPERIMENT_PREFIX) :] if experiment.startswith(EXPERIMENT_PREFIX) else experiment
    else:
        name = configs[0].name
    if not name.strip():
        raise ConfigError("--experiment: the name is empty")
    out = Path(output) if output else DEFAULT_OUTPUT / (_PATH_UNSAFE.sub("_", name).strip("._") or "reproduction")
    entries = [ConfigEntry(n, p, c) for n, p, c in zip(_unique_names(configs), config_paths, configs)]
    plan = Plan(
        name=name,
        experiment=EXPERIMENT_PREFIX + name,
        output_dir=out,
        entries=entries,
        seeds=list(seeds),
        full_budget=full_budget,
        tracking_uri=absolute_store_uri(resolve_tracking_uri(tracking_uri)),
        address=address,
        # On a cluster the user's cache is one node's: the output folder is the driver's guess.
        phase_store=resolve_store_folder(phase_store, user_store_folder() if address is None else out.absolute() / PHASE_STORE_DIR),
    )
    plan.command = _command_line(plan, overrides, data_root, device)
    return plan


def _command_line(plan: Plan, overrides: Sequence[str], data_root: Optional[str], device: Optional[str]) -> str:
    """The command, rebuilt from what was parsed, for the report (no tracking credentials)."""
    words = ["imbcil", "reproduce", *(e.path for e in plan.entries), *overrides, "--seeds", *map(str, plan.seeds)]
    if plan.full_budget:
        words.append("--full-budget")
    if data_root:
        words += ["--data-root", data_root]
    if device:
        words += ["--device", device]
    if plan.address:
        words += ["--address", plan.address]
    return shlex.join(words)


# ---------------------------------------------------------------------------------------------
# One run (in this process or in a Ray worker)

# Decoded datasets per (dataset, source, root), kept for the next run in the same process: a Ray
# worker process runs several seeds in a row, and decoding CIFAR-10 takes seconds.
@dataclass
class SeedJob:
    config_name: str
    cfg: RunConfig  # seed already set
    phase_store: Optional[Path] = None

    @property
    def label(self) -> str:
        return f"{self.config_name} seed {self.cfg.seed}"


def phase_printer(label: str) -> ProgressCallback:
    """One line per finished phase: several runs share the terminal, so epochs stay quiet."""
    def callback(event: ProgressEvent) -> None:
        if isinstance(event, PhaseDone):
            m = event.metrics
            print(
                f"[{label}] {phase_label(event.phase, event.num_phases)}: acc {m['acc']:.2f}%  "
                f"avg incremental {m['avg_incremental_acc']:.2f}%  ({m['phase_seconds']:.0f} s)",
                flush=True,
            )

    return callback


def run_seed(
    job: SeedJob, tracking_uri: str, experiment: str, parent_run_id: str, device: Optional[torch.device] = None
) -> report.SeedResult:
    """Train one config on one seed as a child run of the reproduction (`device`: see train_tracked)."""
    cfg = job.cfg
    benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data))
    tags = {KIND_TAG: REPRODUCTION_RUN_KIND, CONFIG_NAME_TAG: job.config_name}
    tracker = RunTracker(tracking_uri, experiment, run_name=job.label, parent_run_id=parent_run_id, tags=tags)
    with tracker:
        results = train_tracked(
            cfg, tracker, benchmark=benchmark, progress=phase_printer(job.label), phase_store=job.phase_store, device=device
        )
    return report.SeedResult(job.config_name, cfg.learner.name, cfg.seed, tracker.run_id, [dict(r.metrics) for r in results])


def run_seed_in_ray(job: SeedJob, tracking_uri: str, experiment: str, parent_run_id: str) -> report.SeedResult:
    """`run_seed` as a Ray task: on the GPU Ray gave it, else on the CPU."""
    return run_seed(job, tracking_uri, experiment, parent_run_id, device=ray_task_device(job.cfg.device))


@dataclass
class Failure:
    job: SeedJob
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {"config_name": self.job.config_name, "seed": self.job.cfg.seed, "error": self.error}


# ---------------------------------------------------------------------------------------------
# Executors


class InProcess:
    """Runs one after another here: no Ray start-up, and the decoded dataset is shared."""

    description = "in this process, one run after another"

    def resources_check(self, cpus_per_run: float, gpus_per_run: float) -> None:
        pass

    def run(self, jobs, submit: Callable[[SeedJob], report.SeedResult], done: Callable) -> None:
        for job in jobs:
            try:
                result = submit(job)
            except Exception as exc:  # a failed seed must not lose the others
                logger.debug("run %s failed", job.label, exc_info=True)
                done(job, None, exception_line(exc))
            else:
                done(job, result, None)

    def close(self) -> None:
        pass


def _set_log_dedup(enabled: bool) -> bool:
    """Ray folds worker lines that differ only in numbers; our per-phase lines differ only in numbers."""
    import ray._private.ray_logging as ray_logging

    previous = ray_logging.RAY_DEDUP_LOGS
    ray_logging.RAY_DEDUP_LOGS = enabled
    return previous


class RayTasks:
    """One Ray task per run, on a local head (random free ports, loopback) or on --address."""

    def __init__(self, address: Optional[str], num_cpus: int) -> None:
        import ray

        self.ray = ray
        self.owned = False
        self._dedup = _set_log_dedup(False)
        if ray.is_initialized():
            self.description = "on the Ray cluster this process is already connected to"
            return
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False)
        try:
            if address:
                ray.init(address=address, **quiet)
                self.description = f"on the Ray cluster at {address}"
            else:
                start_local_ray(num_cpus, log_to_driver=True)
                self.description = f"on a local Ray instance with {num_cpus} CPU(s)"
        except Exception as exc:
            _set_log_dedup(self._dedup)
            what = f"--address: could not connect to Ray at {address}" if address else "could not start a local Ray instance"
            raise ClusterError(f"{what} ({exception_line(exc)})") from None
        self.owned = True

    def resources_check(self, cpus_per_run: float, gpus_per_run: float) -> None:
        """A run that no node can hold would wait forever; say so before starting anything."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        fits = any(
            n["Resources"].get("CPU", 0) >= cpus_per_run and n["Resources"].get("GPU", 0) >= gpus_per_run for n in nodes
        )
        if not fits:
            total = self.ray.cluster_resources()
            raise ClusterError(
                f"--cpus-per-run/--gpus-per-run: no Ray node has {cpus_per_run:g} CPU(s) and {gpus_per_run:g} GPU(s) "
                f"(cluster: {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU)"
            )

    def gpus(self) -> float:
        return float(self.ray.cluster_resources().get("GPU", 0))

    def run(self, jobs, submit_args: Callable[[SeedJob], tuple], done: Callable, *, cpus: float, gpus: float) -> None:
        ray = self.ray
        remote = ray.remote(run_seed_in_ray)
        pending = {}
        for job in jobs:
            # No retries: a retried run would be a second MLflow run of the same seed.
            ref = remote.options(num_cpus=cpus, num_gpus=gpus, max_retries=0).remote(*submit_args(job))
            pending[ref] = job
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        done(job, None, exception_line(exc.cause))
                    except ray.exceptions.RayError as exc:
                        done(job, None, exception_line(exc))
                    else:
                        done(job, result, None)
        except KeyboardInterrupt:
            # Cancelling raises KeyboardInterrupt inside each task, so its run is marked KILLED.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=15)
            raise

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
        _set_log_dedup(self._dedup)


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Outcome:
    plan: Plan
    parent_run_id: str
    parent_url: str
    output_dir: Path
    report_path: Path
    summaries: list[report.ConfigSummary]
    failures: list[Failure] = field(default_factory=list)
    executor: str = ""
    phases_reused: int = 0
    phases_total: int = 0

    @property
    def reuse_line(self) -> str:
        if self.plan.phase_store is None:
            return describe_store(None)
        return f"phases reused from the store: {self.phases_reused} of {self.phases_total}; store {self.plan.phase_store}"


def check_inputs(plan: Plan, cpus_per_run: float, gpus_per_run: Optional[float]) -> None:
    """Every input error, before anything trains: data (by building each benchmark once), then
    `imbcil check`'s preflight (store and its schema, artifacts, the cluster and data on its
    nodes), then the output folder."""
    for entry in plan.entries:
        build_benchmark(entry.cfg.data, entry.cfg.protocol, plan.seeds[0], raw=decoded_data(entry.cfg.data))
    resources = {"cpu": cpus_per_run, "gpu": gpus_per_run or 0.0}
    results = preflight(plan.tracking_uri, address=plan.address, cfg=plan.entries[0].cfg, resources_per_trial=resources)
    raise_on_failure(results)
    try:
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        probe = plan.output_dir / ".imbcil-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--output: cannot write to {plan.output_dir}: {exc.strerror or exc}") from None


@dataclass
class ReproductionPlan:
    """`reproduce --dry-run`: each config's phases, the runs at once, the wall-time estimate."""

    plan: Plan
    phases: dict[str, list]  # config name -> method.plan.PhasePlan per phase
    rates: dict[str, Any]  # config name -> method.plan.Rates
    run_s: dict[str, float]  # config name -> one seed's estimate
    at_once: int
    threads: int
    estimate_s: float


# A seed run's own start when it runs as a Ray task: the worker's imports, its MLflow run; and
# the end of a reproduction: its table, report and plots (each about 5 s on 2 cores).
RUN_START_S = 5.0
REPORT_S = 5.0


def plan_reproduction(plan: Plan, *, parallel: Optional[int] = None, cpus_per_run: float = 1.0) -> ReproductionPlan:
    """The reproduction's checks, writing nothing, and its plan; runs are counted in full."""
    import torch

    from method.plan import estimate_seconds, measure_rates, plan_phases
    from method.trainer import resolve_device

    benchmarks = {e.config_name: build_benchmark(e.cfg.data, e.cfg.protocol, plan.seeds[0], raw=decoded_data(e.cfg.data)) for e in plan.entries}
    results = preflight(plan.tracking_uri, address=plan.address, cfg=plan.entries[0].cfg, resources_per_trial={"cpu": cpus_per_run}, dry_run=True)
    raise_on_failure(results)
    blocker = unwritable_ancestor(plan.output_dir)
    if blocker is not None:
        raise ConfigError(f"--output: cannot write to {plan.output_dir}: {blocker} is not writable")
    jobs = len(plan.entries) * len(plan.seeds)
    cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    at_once = min(jobs, parallel if parallel is not None else max(1, int(cpus // max(cpus_per_run, 1e-9))))
    use_ray = plan.address is not None or (jobs > 1 and at_once > 1)
    threads = max(1, int(cpus_per_run)) if use_ray else torch.get_num_threads()  # Ray gives a task its CPUs' threads
    startup_s = time.perf_counter() - STARTED  # before the measurement, which a real reproduction does not make
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    phases, rates, run_s = {}, {}, {}
    try:
        for entry in plan.entries:
            phases[entry.config_name] = plan_phases(entry.cfg, benchmarks[entry.config_name])
            rates[entry.config_name] = measure_rates(entry.cfg, benchmarks[entry.config_name], resolve_device(entry.cfg.device))
            run_s[entry.config_name] = RUN_START_S * use_ray + estimate_seconds(phases[entry.config_name], rates[entry.config_name])
    finally:
        torch.set_num_threads(saved)
    serial = sum(run_s.values()) * len(plan.seeds)
    overhead = startup_s + RAY_START_S * use_ray + REPORT_S
    return ReproductionPlan(plan, phases, rates, run_s, at_once, threads, overhead + serial / at_once)


def _jobs(plan: Plan) -> list[SeedJob]:
    jobs = []
    for seed in plan.seeds:  # seed-major: with few workers, every config gets a first seed early
        for entry in plan.entries:
            cfg = copy.deepcopy(entry.cfg)
            cfg.seed = seed
            jobs.append(SeedJob(entry.config_name, cfg, plan.phase_store))
    return jobs


def _metric_key(prefix: str, name: str) -> str:
    return _METRIC_KEY_UNSAFE.sub("_", f"{prefix}/{name}" if prefix else name)


def aggregate_metrics(summaries: Sequence[report.ConfigSummary], several: bool) -> list[Metric]:
    """Mean and std of each summary metric, and the mean accuracy per phase, for the parent run."""
    now = int(time.time() * 1000)
    metrics = []
    for s in summaries:
        prefix = s.config_name if several else ""
        for key in report.SUMMARY_METRICS:
            for stat, value in (("mean", s.mean[key]), ("std", s.std[key])):
                if math.isfinite(value):
                    metrics.append(Metric(_metric_key(prefix, f"{key}_{stat}"), value, now, 0))
        for phase, value in enumerate(s.mean_curve):
            if math.isfinite(value):
                metrics.append(Metric(_metric_key(prefix, "acc_mean"), value, now, phase))
    return metrics


def _log_parent_setup(parent: RunTracker, plan: Plan) -> None:
    first = plan.entries[0].cfg
    client, run_id = parent.retrying, parent.run_id
    params = {
        "seeds": ",".join(map(str, plan.seeds)),
        "configs": ",".join(e.config_name for e in plan.entries),
        "learners": ",".join(e.cfg.learner.name for e in plan.entries),
        "full_budget": str(plan.full_budget),
        "dataset": first.data.dataset,
        "scenario": first.data.scenario,
        "protocol": protocol_name(first),
    }
    try:
        client.log_batch(run_id, params=[Param(k, v[:500]) for k, v in params.items()])
        for entry in plan.entries:
            safe = _PATH_UNSAFE.sub("_", entry.config_name)
            client.log_text(run_id, dump_yaml(entry.cfg), f"configs/{safe}.yaml")
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"could not log the reproduction's settings in {redact_uri(plan.tracking_uri)}: {exception_line(exc)}") from exc


def reproduce(
    plan: Plan,
    *,
    parallel: Optional[int] = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: Optional[float] = None,
) -> Outcome:
    """Run every config x seed, then aggregate, write the table and report, and log them."""
    started = time.perf_counter()
    check_inputs(plan, cpus_per_run, gpus_per_run)
    jobs = _jobs(plan)
    cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    at_once = parallel if parallel is not None else max(1, int(cpus // max(cpus_per_run, 1e-9)))
    use_ray = plan.address is not None or (len(jobs) > 1 and at_once > 1)
    if use_ray:
        forget_decoded_data()  # the workers decode their own copy
        local_cpus = max(1, math.ceil(min(at_once, len(jobs)) * cpus_per_run))
        executor: Any = RayTasks(plan.address, local_cpus)
    else:
        executor = InProcess()
    try:
        if use_ray and gpus_per_run is None:
            wants_gpu = any(e.cfg.device != "cpu" for e in plan.entries)
            gpus_per_run = 1.0 if wants_gpu and executor.gpus() > 0 else 0.0
        gpus_per_run = gpus_per_run or 0.0
        if use_ray and gpus_per_run == 0 and any(e.cfg.device == "cuda" for e in plan.entries):
            raise ConfigError("--gpus-per-run: a config asks for device cuda but each run gets no GPU; give runs a GPU or set device auto")
        executor.resources_check(cpus_per_run, gpus_per_run)
        return _run_all(plan, jobs, executor, cpus_per_run, gpus_per_run, started)
    finally:
        executor.close()


def _run_all(plan: Plan, jobs: list[SeedJob], executor: Any, cpus: float, gpus: float, started: float) -> Outcome:
    first = plan.entries[0].cfg
    tags = {
        KIND_TAG: REPRODUCTION_KIND,
        "dataset": first.data.dataset,
        "scenario": first.data.scenario,
        "protocol": protocol_name(first),
        "learner": ",".join(dict.fromkeys(e.cfg.learner.name for e in plan.entries)),
    }
    parent = RunTracker(plan.tracking_uri, plan.experiment, run_name=f"reproduce {plan.name}", tags=tags)
    print(f"reproducing {len(plan.entries)} config(s) x {len(plan.seeds)} seed(s) {executor.description}", flush=True)
    print(f"MLflow parent run: {parent.url}", flush=True)
    with parent:
        _log_parent_setup(parent, plan)
        results: list[report.SeedResult] = []
        failures: list[Failure] = []

        def done(job: SeedJob, result: Optional[report.SeedResult], error: Optional[str]) -> None:
            if result is not None:
                results.append(result)
                final = result.metrics_by_phase[-1] if result.metrics_by_phase else {}
                print(f"[{job.label}] finished: avg incremental {final.get('avg_incremental_acc', math.nan):.2f}%  run {result.run_id}", flush=True)
            else:
                failures.append(Failure(job, error or "unknown error"))
                print(f"[{job.label}] FAILED: {error}", flush=True)

        if isinstance(executor, RayTasks):
            executor.run(jobs, lambda job: (job, plan.tracking_uri, plan.experiment, parent.run_id), done, cpus=cpus, gpus=gpus)
        else:
            executor.run(jobs, lambda job: run_seed(job, plan.tracking_uri, plan.experiment, parent.run_id), done)
        wall = time.perf_counter() - started

        # Table rows in command-line order, whatever order the runs finished in.
        names = [e.config_name for e in plan.entries]
        results.sort(key=lambda r: (names.index(r.config_name), plan.seeds.index(r.seed)))
        meta = report.build_metadata(
            plan.name,
            [(e.config_name, e.cfg, e.path) for e in plan.entries],
            plan.seeds,
            experiment=plan.experiment,
            parent_run_id=parent.run_id,
            parent_run_url=run_url(plan.tracking_uri, parent.experiment_id, parent.run_id),
            full_budget=plan.full_budget,
            command=plan.command,
            wall_seconds=round(wall, 1),
            failed=[f.as_dict() for f in failures],
        )
        table = report.build_table(results, meta)
        report.write_table(table, plan.output_dir)
        report_path = report.write_report(plan.output_dir)
        summaries = report.summarize(table, meta)
        try:
            metrics = aggregate_metrics(summaries, several=len(plan.entries) > 1)
            for start_at in range(0, len(metrics), 1000):
                parent.retrying.log_batch(parent.run_id, metrics=metrics[start_at : start_at + 1000])
            for name in (REPRODUCTION_TABLE_FILE, REPORT_FILE, REPORT_PLOT_FILE):
                if (plan.output_dir / name).is_file():
                    parent.retrying.log_artifact(parent.run_id, str(plan.output_dir / name))
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"could not log the aggregate in {redact_uri(plan.tracking_uri)}: {exception_line(exc)}") from exc
        phases = [m for r in results for m in r.metrics_by_phase]
        outcome = Outcome(
            plan, parent.run_id, parent.url, plan.output_dir, report_path, summaries, failures, executor.description,
            phases_reused=sum(m.get("phase_reused") == 1.0 for m in phases), phases_total=len(phases),
        )  # fmt: skip
        if failures:
            first_failure = failures[0]
            raise RunsFailed(
                f"{len(failures)} of {len(jobs)} runs failed (first: {first_failure.job.label}: {first_failure.error}); "
                f"the others are in {report_path}"
            )
    return outcome


def reproduce_command(
    tokens: Sequence[str],
    seed_values: Optional[Sequence[str]],
    *,
    full_budget: bool = False,
    address: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    data_root: Optional[str] = None,
    output: Optional[str] = None,
    experiment: Optional[str] = None,
    device: Optional[str] = None,
    parallel: Optional[int] = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: Optional[float] = None,
    phase_store: Optional[str] = None,
    dry_run: bool = False,
) -> Outcome | ReproductionPlan:
    """Everything `imbcil reproduce` does, from the raw command-line tokens; `dry_run`: its plan instead."""
    config_paths, overrides, extra_seeds = split_arguments(tokens, seeds_given=bool(seed_values))
    seeds = parse_seeds([*seed_values, *extra_seeds]) if seed_values else list(DEFAULT_SEEDS)
    if parallel is not None and parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1 (got {parallel})")
    if cpus_per_run <= 0:
        raise ConfigError(f"--cpus-per-run: must be > 0 (got {cpus_per_run:g})")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise ConfigError(f"--gpus-per-run: must be >= 0 (got {gpus_per_run:g})")
    plan = make_plan(
        config_paths, overrides, seeds, full_budget=full_budget, address=address, tracking_uri=tracking_uri,
        data_root=data_root, output=output, experiment=experiment, device=device, phase_store=phase_store,
    )
    if dry_run:
        return plan_reproduction(plan, parallel=parallel, cpus_per_run=cpus_per_run)
    return reproduce(plan, parallel=parallel, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
