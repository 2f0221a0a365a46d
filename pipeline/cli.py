"""The `imbcil` command line. Each verb lives in its own module; this file only parses and reports.

Known failures (bad config, missing data, unreachable tracking server) end with one line on
stderr and exit code 2; a run that fails during training exits 1, Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from method.data import DataError
from pipeline.check import PreflightError
from pipeline.config import ConfigError
from pipeline.display import (
    ProgressDisplay, console, duration, error, phase_store_table, phase_table, plan_table, rates_line, reuse_line, wide_console,
)  # fmt: skip
from pipeline.tracking import TrackingError

app = typer.Typer(
    name="imbcil",
    help="Imbalanced class-incremental learning: DGR and baselines, sweeps with Ray Tune + Optuna, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Errors a user can fix: one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, TrackingError, PreflightError, FileNotFoundError,
)  # fmt: skip
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def user_facing(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            error(str(exc))
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            error("interrupted; finished phases are logged and the run can be resumed")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as exc:  # a failure inside training: say what, keep the exit code distinct
            error(f"{type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


DataRoot = Annotated[Optional[str], typer.Option("--data-root", help="Dataset folder (else data.root, else $IMBCIL_DATA).")]
TrackingUri = Annotated[
    Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
]
PhaseStoreOption = Annotated[
    Optional[str],
    typer.Option(
        "--phase-store",
        help="Folder of trained phases that runs with the same first phases share, or 'off' "
        "(default: $IMBCIL_PHASE_STORE, else the sweep's storage folder for a sweep and ~/.cache/imbcil/phases otherwise).",
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check everything and print the plan (phases, images, a measured wall-time estimate) without training or logging.",
    ),
]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides as dotted key=value, e.g. train.lr=0.05.")]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  imbcil run configs/quickstart.yaml --data-root ../shared/data\n\n"
        "  imbcil run configs/quickstart.yaml train.epochs=2 learner.name=replay\n\n"
        "  imbcil run --resume 3f2a... --data-root ../shared/data\n\n"
        "  imbcil run --resume 3f2a... train.cuda_graph=false  (where and how it runs may change)"
    )
)
@user_facing
def run(
    config: Annotated[Optional[str], typer.Argument(help="Run config YAML (optional with --resume).")] = None,
    overrides: Overrides = None,
    data_root: DataRoot = None,
    tracking_uri: TrackingUri = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the config's name).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: the config's device).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="MLflow run id to continue after its last logged phase.")] = None,
    phase_store: PhaseStoreOption = None,
    dry_run: DryRun = False,
) -> None:
    """Train one run phase by phase, logging every phase to MLflow."""
    from pipeline.run import run_command

    if config is None and not resume:
        raise ConfigError("config: give a run config YAML (or --resume RUN_ID)")
    if resume and config is not None and "=" in config and not Path(config).exists():
        # `--resume ID key=value`: an override of the logged config, not a config file.
        config, overrides = None, [config, *(overrides or [])]
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: must be one of auto, cpu, cuda (got {device!r})")
    if dry_run:
        plan = run_command(
            config, overrides or [], data_root=data_root, tracking_uri=tracking_uri, experiment=experiment,
            device=device, resume=resume, phase_store=phase_store, dry_run=True,
        )
        print_plan(plan)
        return
    with ProgressDisplay(label="run") as display:
        outcome = run_command(
            config, overrides or [], data_root=data_root, tracking_uri=tracking_uri, experiment=experiment,
            device=device, resume=resume, progress=display, phase_store=phase_store,
        )
    tracker = outcome.tracker
    console.print(phase_table(outcome.metrics_by_phase, title="accuracy per phase (%)"))
    console.print(reuse_line(outcome.metrics_by_phase, outcome.phase_store))
    final = outcome.metrics_by_phase[-1] if outcome.metrics_by_phase else {}
    if final:
        console.print(f"average incremental accuracy: {final['avg_incremental_acc']:.2f}%  last accuracy: {final['acc']:.2f}%")
    console.print(f"MLflow run: {tracker.run_id}")
    console.print(f"open it: {tracker.url}")


def print_plan(plan) -> None:
    """A run's dry-run plan: the phases' table, the rates it measured, the estimate."""
    from method.config import protocol_name
    from method.plan import training_seconds

    cfg, rates = plan.cfg, plan.rates
    setting = f"{cfg.data.dataset}-LT {cfg.data.scenario} {protocol_name(cfg)}"
    title = f"plan: {cfg.name}, {cfg.learner.name} on {setting}, {len(plan.phases)} phases"
    out = wide_console()
    out.print(plan_table(plan.phases, title=title))
    threads = f", {torch_threads()} threads" if rates.device == "cpu" else ""
    out.print(
        f"measured on {rates.device}{threads}, batches of {cfg.train.batch_size}: {rates_line(rates)}"
    )
    training = sum(training_seconds(p, rates) for p in plan.phases)
    out.print(
        f"estimate: {duration(plan.estimate_s)} wall time for this run, one run at a time "
        f"(start-up {duration(plan.startup_s)}, training {duration(training)}, "
        f"scoring, herding and logging {duration(plan.estimate_s - plan.startup_s - training)})"
    )
    out.print("dry run: nothing was trained or logged")


def print_sweep_plan(plan, say: Callable[[str], None]) -> None:
    from pipeline.check import OK, SKIPPED

    spec, rates = plan.spec, plan.rates
    passed = sum(r.status == OK for r in plan.preflight)
    skipped = sum(r.status == SKIPPED for r in plan.preflight)
    say(f"preflight (dry run, nothing written): {passed} checks passed, {skipped} skipped")
    if len(plan.stages) == 2 and not plan.stages[1].reused_phase_0:
        say("warning: the phase store is off, so the second stage trains phase 0 again in every trial")
    out = wide_console()
    for stage in plan.stages:
        searched = ", ".join(spec.first_task.space if stage.name != spec.name else spec.space)
        reuse = "; phase 0 from the first stage's best, through the phase store" if stage.reused_phase_0 else ""
        say(f"sweep {stage.name}: {stage.trials} trials searching {searched}, {stage.concurrent} at a time{reuse}")
        out.print(plan_table(stage.phases, title=f"one trial of {stage.name}, at the base config's values"))
        waves = -(-stage.trials // stage.concurrent)
        say(f"  {duration(stage.trial_s)} a trial, {waves} rounds of {stage.concurrent}: {duration(stage.stage_s)}")
    thread_word = "thread" if plan.threads == 1 else "threads"
    say(
        f"measured on {rates.device}, {plan.threads} {thread_word} as a trial has: {rates_line(rates)}"
    )
    stopping = "; a scheduler that stops trials early makes it shorter" if spec.tune.scheduler != "none" else ""
    say(f"estimate: {duration(plan.estimate_s)} wall time for the sweep, every trial running every phase{stopping}")
    say("dry run: no trial was started, nothing was logged")


def print_reproduction_plan(plan) -> None:
    out = wide_console()
    seeds = plan.plan.seeds
    for name, phases in plan.phases.items():
        rates = plan.rates[name]
        out.print(plan_table(phases, title=f"{name}: one seed's run"))
        out.print(
            f"  {duration(plan.run_s[name])} a seed; measured on {rates.device}: {rates_line(rates)}"
        )
    runs = len(plan.phases) * len(seeds)
    thread_word = "thread" if plan.threads == 1 else "threads"
    out.print(
        f"estimate: {duration(plan.estimate_s)} wall time for {runs} runs ({len(plan.phases)} config(s) x seeds "
        f"{' '.join(map(str, seeds))}), {plan.at_once} at a time with {plan.threads} {thread_word} each"
    )
    out.print("dry run: nothing was trained or logged")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command()
@user_facing
def data(
    config: Annotated[str, typer.Argument(help="Run config YAML.")],
    overrides: Overrides = None,
    data_root: DataRoot = None,
) -> None:
    """Print the benchmark a config builds: class order and per-task image counts."""
    from method.data import build_benchmark
    from pipeline.config import resolve
    from pipeline.runtime import decoded_data

    cfg = resolve(config, overrides or [], data_root=data_root)
    console.print(build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=decoded_data(cfg.data)).describe())


@app.command("show-config")
@user_facing
def show_config(
    config: Annotated[Optional[str], typer.Argument(help="Run config YAML (default: the paper's defaults).")] = None,
    overrides: Overrides = None,
) -> None:
    """Print the complete resolved config, every field, as YAML."""
    from pipeline.config import dump_yaml, load_config

    print(dump_yaml(load_config(config, overrides or [])), end="")


@app.command(
    "reproduce",
    epilog=(
        "Examples:\n\n"
        "  imbcil reproduce best.yaml --seeds 0 1 2 --full-budget\n\n"
        "  imbcil reproduce configs/quickstart.yaml configs/quickstart_replay.yaml --seeds 0 1 train.epochs=2\n\n"
        "  imbcil reproduce best.yaml --seeds 0,1,2 --address 10.0.0.5:6380 --tracking-uri http://mlflow:5000"
    ),
)
@user_facing
def reproduce_cmd(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="CONFIG... [KEY=VALUE...]",
            help="Run config YAML files (several compare learners on one setting), and dotted key=value overrides applied to every config.",
        ),
    ],
    seeds: Annotated[
        Optional[list[str]],
        typer.Option("--seeds", help="Seeds, one run per config each: --seeds 0 1 2, --seeds 0,1,2 or --seeds 0 --seeds 1 (default: 0 1 2)."),
    ] = None,
    full_budget: Annotated[
        bool, typer.Option("--full-budget", help="Train with the paper's epochs, schedule and all images, whatever the config says.")
    ] = False,
    address: Annotated[
        Optional[str],
        typer.Option(help="Ray cluster to run on (HOST:PORT, ray://HOST:PORT or auto); default: a local Ray on 127.0.0.1 when several runs fit."),
    ] = None,
    tracking_uri: TrackingUri = None,
    data_root: DataRoot = None,
    output: Annotated[
        Optional[str], typer.Option(help="Folder for results.parquet, report.md and acc_per_phase.png (default: ./reproduce_results/NAME).")
    ] = None,
    experiment: Annotated[
        Optional[str], typer.Option(help="NAME: runs go to the MLflow experiment reproduce/NAME (default: the first config's name).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda (default: each config's device).")] = None,
    parallel: Annotated[
        Optional[int],
        typer.Option(help="Runs at once on this machine (default: CPUs / --cpus-per-run); 1 runs them one after another here, without Ray."),
    ] = None,
    cpus_per_run: Annotated[float, typer.Option(help="CPUs Ray reserves for each run.")] = 1.0,
    gpus_per_run: Annotated[
        Optional[float],
        typer.Option(help="GPUs Ray reserves for each run, fractions share one (default: 1 where Ray sees GPUs and the device is not cpu, else 0)."),
    ] = None,
    phase_store: PhaseStoreOption = None,
    dry_run: DryRun = False,
) -> None:
    """Run configs over several seeds; mean +- std next to the paper's number, in MLflow and a report."""
    from rich.table import Table

    from pipeline.reproduce import reproduce_command
    from pipeline.report import SUMMARY_HEADERS, SUMMARY_METRICS

    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: must be one of auto, cpu, cuda (got {device!r})")
    outcome = reproduce_command(
        args, seeds, full_budget=full_budget, address=address, tracking_uri=tracking_uri, data_root=data_root,
        output=output, experiment=experiment, device=device, parallel=parallel, cpus_per_run=cpus_per_run,
        gpus_per_run=gpus_per_run, phase_store=phase_store, dry_run=dry_run,
    )
    if dry_run:
        print_reproduction_plan(outcome)
        return
    table = Table(title=f"{outcome.plan.name}: mean ± std over seeds")
    for column in ("config", "learner", "seeds", *SUMMARY_HEADERS.values()):
        table.add_column(column, justify="left" if column in ("config", "learner") else "right")
    for s in outcome.summaries:
        table.add_row(
            s.config_name, s.learner, str(len(s.seeds)), *(f"{s.mean[k]:.2f} ± {s.std[k]:.2f}" for k in SUMMARY_METRICS)
        )
    console.print(table)
    console.print(f"report: {outcome.report_path}")
    console.print(outcome.reuse_line)
    console.print(f"MLflow parent run: {outcome.parent_run_id}")
    console.print(f"open it: {outcome.parent_url}")


@app.command("report")
@user_facing
def report_cmd(
    results_dir: Annotated[str, typer.Argument(help="A reproduction's output folder (or its results.parquet).")],
) -> None:
    """Re-render report.md and acc_per_phase.png from results.parquet alone, without MLflow."""
    from pipeline.report import write_report

    console.print(f"report: {write_report(results_dir)}")


@app.command(
    "sweep",
    epilog=(
        "Examples:\n\n"
        "  imbcil sweep sweeps/quickstart.yaml --data-root ../shared/data\n\n"
        "  imbcil sweep sweeps/cifar100_lt_lfs10.yaml train.epochs=80 --address 10.0.0.5:6380 --storage /shared/ray_results\n\n"
        "  imbcil sweep sweeps/quickstart.yaml --resume --data-root ../shared/data"
    ),
)
@user_facing
def sweep_cmd(
    sweep_file: Annotated[str, typer.Argument(metavar="SWEEP.yaml", help="Sweep file: a base run config, a search space over dotted keys, tune settings.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides of the base config as dotted key=value, e.g. train.epochs=2.")] = None,
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster to run on (HOST:PORT or ray://HOST:PORT); default: start Ray on this machine, on 127.0.0.1.")
    ] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Folder for Ray's results and checkpoints (default ./ray_results); on a cluster, one that every node sees.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep of the same name in --storage; finished trials are kept.")] = False,
    tracking_uri: TrackingUri = None,
    data_root: DataRoot = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the sweep's tune.name).")] = None,
    phase_store: PhaseStoreOption = None,
    dry_run: DryRun = False,
) -> None:
    """Search hyperparameters with Ray Tune + Optuna: one MLflow run per trial under a sweep run."""
    from method.results import reported_beside
    from pipeline.sweep.driver import SweepError, plan_sweep, sweep_command
    from pipeline.sweep.results import leaderboard_table

    def say(line: str) -> None:
        print(line, flush=True)  # one unwrapped line each: these are log lines, not a layout

    try:
        if dry_run:
            plan = plan_sweep(
                sweep_file, overrides or [], address=address, storage=storage, resume=resume,
                tracking_uri=tracking_uri, data_root=data_root, phase_store=phase_store,
            )  # fmt: skip
            print_sweep_plan(plan, say)
            return
        outcome = sweep_command(
            sweep_file, overrides or [], address=address, storage=storage, resume=resume,
            tracking_uri=tracking_uri, data_root=data_root, experiment=experiment, phase_store=phase_store, say=say,
        )  # fmt: skip
    except SweepError as exc:
        error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    metric = outcome.spec.tune.metric
    # Off a terminal (a log file, CI) rich would squeeze the table into 80 columns.
    wide_console().print(leaderboard_table(outcome.trials, outcome.spec))
    best = outcome.best
    if best is not None:
        beside = reported_beside(metric)
        reported = f", test {beside} {best.last_value(beside):.4f}" if beside else ""
        say(f"best trial {best.trial_id}: final {metric} {best.last_value(metric):.4f}{reported} (MLflow run {best.mlflow_run_id})")
    say(f"results table: {outcome.table_path}")
    say(f"MLflow: {outcome.url}")
    say(f"sweep wall time: {outcome.wall_seconds:.0f} s")
    if outcome.interrupted:
        resume_hint = f"imbcil sweep {sweep_file} --resume" + (f" --storage {storage}" if storage else "")
        error(f"interrupted: some trials did not finish; continue with: {resume_hint}")
        raise typer.Exit(EXIT_INTERRUPTED)
    say(f"export the best config: imbcil export {outcome.experiment_dir} -o best.yaml")


@app.command(
    "export",
    epilog=(
        "Examples:\n\n"
        "  imbcil export ray_results/quickstart -o best.yaml\n\n"
        "  imbcil export quickstart --rank 2 --metric acc --mode max -o second.yaml"
    ),
)
@user_facing
def export_cmd(
    sweep: Annotated[str, typer.Argument(metavar="SWEEP", help="A sweep's results folder (<storage>/<name>) or its MLflow experiment name.")],
    metric: Annotated[Optional[str], typer.Option(help="Rank by this metric's final value (default: the sweep's tune.metric).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="max or min (default: the sweep's tune.mode).")] = None,
    rank: Annotated[int, typer.Option(help="Which trial to export: 1 is the best.")] = 1,
    output: Annotated[str, typer.Option("--output", "-o", help="The YAML file to write.")] = "best.yaml",
    tracking_uri: TrackingUri = None,
) -> None:
    """Write the complete run config of a sweep's best (or K-th best) finished trial."""
    from pipeline.export import ExportError, export_command

    try:
        outcome = export_command(sweep, metric=metric, mode=mode, rank=rank, output=output, tracking_uri=tracking_uri)
    except ExportError as exc:
        error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    reported = f", test {outcome.reported_metric} {outcome.reported_value:.4f}" if outcome.reported_metric else ""
    console.print(
        f"trial {outcome.trial_id} (rank {outcome.rank} of {outcome.finished}, final {outcome.metric} "
        f"{outcome.value:.4f}{reported}) -> {outcome.path}",
        markup=False,
    )
    console.print(f"run it with: imbcil run {outcome.path}", markup=False)


@app.command(
    "check",
    epilog=(
        "Examples:\n\n"
        "  imbcil check --tracking-uri http://mlflow:5000\n\n"
        "  imbcil check sweeps/quickstart.yaml --address 10.0.0.5:6380 --storage /shared/ray_results --data-root /shared/data"
    ),
)
@user_facing
def check_cmd(
    config: Annotated[
        Optional[str], typer.Argument(metavar="SWEEP_OR_CONFIG.yaml", help="A sweep file or run config: its data, trial resources, storage.")
    ] = None,
    overrides: Overrides = None,
    tracking_uri: TrackingUri = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to check (HOST:PORT); default: this machine's resources.")] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Storage folder every node must be able to write, as imbcil sweep takes it: a folder, not a URI (default for a sweep: ./ray_results).")
    ] = None,
    data_root: DataRoot = None,
) -> None:
    """Preflight: tracking store, artifacts, Ray cluster, shared storage and dataset, checked in seconds."""
    from pipeline.check import check_command, raise_on_failure, results_table

    if storage is not None and "://" in storage:
        raise ConfigError(f"--storage: give a folder (on a cluster, one every node sees), not a URI ({storage}); imbcil sweep takes only a folder")
    results = check_command(
        config, overrides or [], tracking_uri=tracking_uri, address=address, storage=storage, data_root=data_root
    )
    console.print(results_table(results))
    raise_on_failure(results)  # the last line on stderr names the first failed check; exit 2
    console.print("all checks passed")


@app.command(
    "lists",
    epilog=(
        "Examples:\n\n"
        "  imbcil lists imagefolder /data/my_dataset\n\n"
        "  imbcil lists food101 /data/food-101\n\n"
        "  imbcil lists imagenet-subset /data/ILSVRC2012 --output /data/imagenet_subset"
    ),
)
@user_facing
def lists_cmd(
    layout: Annotated[str, typer.Argument(help="imagefolder, food101, imagenet-subset or imagenet.")],
    source: Annotated[str, typer.Argument(help="The dataset's folder.")],
    output: Annotated[Optional[str], typer.Option(help="Where train.txt, test.txt and classes.txt go: the --data-root of the runs (default: the dataset's folder).")] = None,
    rho: Annotated[float, typer.Option(help="food101: the training list's imbalance ratio, largest over smallest class (1: the whole official split).")] = 100.0,
    seed: Annotated[int, typer.Option(help="food101: the seed that draws which training images each class keeps.")] = 0,
) -> None:
    """Write the train.txt / test.txt lists that the file-list datasets read, after checking the images."""
    from pathlib import Path

    from pipeline.lists import check_images, make_lists, write_lists

    folder = Path(source).expanduser().absolute()
    out = Path(output).expanduser().absolute() if output else folder
    if layout != "food101" and (rho != 100.0 or seed != 0):
        raise ConfigError(f"--rho and --seed: only the food101 layout draws a long-tailed list, {layout} lists every image")
    made = make_lists(layout, folder, out, rho=rho, seed=seed)
    check_images(made, out)
    written = write_lists(made, out)
    train, test = made.counts("train"), made.counts("test")
    console.print(
        f"{len(made.classes)} classes; training images per class {min(train)}..{max(train)} ({sum(train)} in all), "
        f"test images per class {min(test)}..{max(test)} ({sum(test)} in all)"
    )
    console.print(f"wrote {', '.join(str(p) for p in written)}; run with --data-root {out}")


@app.command(
    "phases",
    epilog=(
        "Examples:\n\n"
        "  imbcil phases\n\n"
        "  imbcil phases --store ray_results/phases --prune --older-than 30\n\n"
        "  imbcil phases --prune --stale-code"
    ),
)
@user_facing
def phases_cmd(
    store: Annotated[
        Optional[str], typer.Option(help="The phase store (default: $IMBCIL_PHASE_STORE, else ~/.cache/imbcil/phases; a sweep's is <storage>/phases).")
    ] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Remove entries first: those the other options name, and leftovers of writers that died.")] = False,
    older_than: Annotated[Optional[float], typer.Option(help="With --prune: entries no run has used for this many days.")] = None,
    stale_code: Annotated[bool, typer.Option("--stale-code", help="With --prune: entries of other method code, which no run can use.")] = False,
    everything: Annotated[bool, typer.Option("--all", help="With --prune: every entry.")] = False,
) -> None:
    """List the phase store: each stored phase's key, phase, size, who trained it and which runs used it."""
    from pipeline.phase_store import FolderPhaseStore, resolve_store_folder, user_store_folder

    folder = resolve_store_folder(store, user_store_folder())
    if folder is None:
        raise ConfigError("--store: the phase store is off; name a folder")
    if older_than is not None and older_than < 0:
        raise ConfigError(f"--older-than: must be >= 0 days (got {older_than:g})")
    if (older_than is not None or stale_code or everything) and not prune:
        raise ConfigError("--older-than, --stale-code and --all choose what --prune removes; add --prune")
    phase_store = FolderPhaseStore(folder)
    if prune:
        removed = phase_store.prune(older_than_s=None if older_than is None else older_than * 86400, stale_code=stale_code, everything=everything)
        console.print(f"removed {len(removed)} entries ({sum(e.bytes for e in removed) / 1e6:.1f} MB)")
    entries = phase_store.entries()
    console.print(phase_store_table(entries, folder))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
