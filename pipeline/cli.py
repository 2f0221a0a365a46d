"""The `imbcil` command line. Each verb lives in its own module; this file only parses and reports.

Known failures (bad config, missing data, unreachable tracking server) end with one line on
stderr and exit code 2; a run that fails during training exits 1, Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
from typing import Annotated, Callable, Optional

import typer

from method.data import DataError
from pipeline.config import ConfigError
from pipeline.display import ProgressDisplay, console, error, phase_table
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
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, TrackingError, FileNotFoundError)
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
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides as dotted key=value, e.g. train.lr=0.05.")]


@app.command(
    epilog=(
        "Examples:\n\n"
        "  imbcil run configs/quick.yaml --data-root ../shared/data\n\n"
        "  imbcil run configs/quick.yaml train.epochs=2 learner.name=replay\n\n"
        "  imbcil run --resume 3f2a... --data-root ../shared/data"
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
) -> None:
    """Train one run phase by phase, logging every phase to MLflow."""
    from pipeline.run import run_command

    if config is None and not resume:
        raise ConfigError("config: give a run config YAML (or --resume RUN_ID)")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: must be one of auto, cpu, cuda (got {device!r})")
    with ProgressDisplay(label="run") as display:
        outcome = run_command(
            config, overrides or [], data_root=data_root, tracking_uri=tracking_uri, experiment=experiment,
            device=device, resume=resume, progress=display,
        )
    tracker = outcome.tracker
    console.print(phase_table(outcome.metrics_by_phase, title="accuracy per phase (%)"))
    final = outcome.metrics_by_phase[-1] if outcome.metrics_by_phase else {}
    if final:
        console.print(f"average incremental accuracy: {final['avg_incremental_acc']:.2f}%  last accuracy: {final['acc']:.2f}%")
    console.print(f"MLflow run: {tracker.run_id}")
    console.print(f"open it: {tracker.url}")


@app.command()
@user_facing
def data(
    config: Annotated[str, typer.Argument(help="Run config YAML.")],
    overrides: Overrides = None,
    data_root: DataRoot = None,
) -> None:
    """Print the benchmark a config builds: class order and per-task image counts."""
    from method.data import build_benchmark
    from pipeline.config import load_config
    from pipeline.run import apply_cli_options

    cfg = apply_cli_options(load_config(config, overrides or []), data_root)
    console.print(build_benchmark(cfg.data, cfg.protocol, cfg.seed).describe())


@app.command("show-config")
@user_facing
def show_config(
    config: Annotated[Optional[str], typer.Argument(help="Run config YAML (default: the paper's defaults).")] = None,
    overrides: Overrides = None,
) -> None:
    """Print the complete resolved config, every field, as YAML."""
    from pipeline.config import dump_yaml, load_config

    print(dump_yaml(load_config(config, overrides or [])), end="")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
