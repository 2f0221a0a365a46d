"""Results of a reproduction: the Parquet table, the summary statistics and the Markdown report.

The report is a pure function of `results.parquet`: the rows hold every per-phase metric, and
the schema metadata holds the settings the text needs (epochs, fractions, paper keys, MLflow
ids, wall time). So `imbcil report DIR` re-renders the same text later, anywhere, without
MLflow, and the numbers in the report are exactly the numbers in the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from method.config import DATASET_FACTS, RunConfig, protocol_name
from pipeline import plots
from pipeline.config import ConfigError
from pipeline.names import REPORT_FILE, REPORT_PLOT_FILE, REPRODUCTION_TABLE_FILE
from pipeline.paper import DATASET_LABELS, DATASETS, DGR, PROTOCOLS, paper_protocol, paper_reference, paper_row, paper_table

META_KEY = b"imbcil.reproduction"
META_FORMAT = 1

# Summary name -> the per-phase metric whose final-phase value it is.
SUMMARY_METRICS = {"avg_incremental_acc": "avg_incremental_acc", "last_acc": "acc", "forgetting": "forgetting"}
SUMMARY_HEADERS = {
    "avg_incremental_acc": "avg incremental acc (%)",
    "last_acc": "last acc (%)",
    "forgetting": "forgetting (pp)",
}

SCHEMA = pa.schema(
    [
        ("config_name", pa.string()),
        ("learner", pa.string()),
        ("seed", pa.int64()),
        ("phase", pa.int64()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("mlflow_run_id", pa.string()),
        ("dataset", pa.string()),
        ("scenario", pa.string()),
        ("protocol", pa.string()),
    ]
)


@dataclass
class SeedResult:
    """One finished run: its config's name, seed, MLflow run and the metrics of every phase."""

    config_name: str
    learner: str
    seed: int
    run_id: str
    metrics_by_phase: list[dict[str, float]]


# ---------------------------------------------------------------------------------------------
# Metadata


def config_settings(config_name: str, cfg: RunConfig, path: Optional[str] = None) -> dict[str, Any]:
    """What the report says about one config: its learner and budget, as plain JSON values."""
    return {
        "config_name": config_name,
        "path": path,
        "learner": cfg.learner.name,
        "two_stage": cfg.learner.two_stage,
        "paper_row": paper_row(cfg.learner.name, cfg.learner.two_stage),
        "epochs": cfg.train.epochs,
        "milestones": list(cfg.train.milestones or []),
        "lr": cfg.train.lr,
        "batch_size": cfg.train.batch_size,
        "train_fraction": cfg.data.train_fraction,
        "test_fraction": cfg.data.test_fraction,
        "imbalance": cfg.data.imbalance,
        "rho": cfg.data.rho,
        "memory_budget": cfg.memory.budget,
        "memory_per_class": cfg.memory.per_class,
        "memory_total": cfg.memory.total,
        "memory_selection": cfg.memory.selection,
        # How `imbcil export` chose this config, when it did (its header says so).
        "selection": _selection(path),
    }


def _selection(path: Optional[str]) -> Optional[dict[str, Any]]:
    from pipeline.export import read_selection

    found = read_selection(path) if path else None
    return None if found is None else {"sweep": found.sweep, "trial_id": found.trial_id, "metric": found.metric, "value": found.value, "split": found.split}


def build_metadata(
    name: str,
    configs: Sequence[tuple[str, RunConfig, Optional[str]]],
    seeds: Sequence[int],
    *,
    experiment: str = "",
    parent_run_id: str = "",
    parent_run_url: str = "",
    full_budget: bool = False,
    command: str = "",
    wall_seconds: Optional[float] = None,
    failed: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Everything the report needs beyond the rows. `configs` are (config name, config, path)."""
    first = configs[0][1]
    return {
        "format": META_FORMAT,
        "name": name,
        "experiment": experiment,
        "parent_run_id": parent_run_id,
        "parent_run_url": parent_run_url,
        "dataset": first.data.dataset,
        "scenario": first.data.scenario,
        "protocol": protocol_name(first),
        "paper_protocol": paper_protocol(first),
        "first_task_classes": first.protocol.first_task_classes,
        "incremental_tasks": first.protocol.incremental_tasks,
        "paper_epochs": DATASET_FACTS[first.data.dataset]["epochs"],
        "seeds": [int(s) for s in seeds],
        "full_budget": bool(full_budget),
        "command": command,
        "wall_seconds": wall_seconds,
        "configs": [config_settings(n, c, p) for n, c, p in configs],
        "failed": [dict(f) for f in failed],
    }


# ---------------------------------------------------------------------------------------------
# The table


def build_table(results: Sequence[SeedResult], meta: Mapping[str, Any]) -> pa.Table:
    """One row per config x seed x phase x metric, with the metadata in the schema."""
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for result in results:
        for phase, metrics in enumerate(result.metrics_by_phase):
            for metric, value in metrics.items():
                columns["config_name"].append(result.config_name)
                columns["learner"].append(result.learner)
                columns["seed"].append(int(result.seed))
                columns["phase"].append(phase)
                columns["metric"].append(metric)
                columns["value"].append(math.nan if value is None else float(value))
                columns["mlflow_run_id"].append(result.run_id)
                columns["dataset"].append(meta["dataset"])
                columns["scenario"].append(meta["scenario"])
                columns["protocol"].append(meta["protocol"])
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata({META_KEY: json.dumps(dict(meta), sort_keys=True).encode()})


def write_table(table: pa.Table, results_dir: str | Path) -> Path:
    path = Path(results_dir) / REPRODUCTION_TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_table(results_dir: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """The results table and its metadata; a one-line error when it is not a reproduction's."""
    folder = Path(results_dir)
    path = folder / REPRODUCTION_TABLE_FILE if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table here (imbcil reproduce writes {REPRODUCTION_TABLE_FILE})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or not set(SCHEMA.names) <= set(table.column_names):
        raise ConfigError(f"{path}: not a results table written by imbcil reproduce")
    meta = json.loads(raw)
    if meta.get("format") != META_FORMAT:
        raise ConfigError(f"{path}: results format {meta.get('format')!r} is not the one this imbcil reads ({META_FORMAT})")
    return table, meta


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class ConfigSummary:
    """The seeds of one config: final values per seed, their mean and sample std, the curves."""

    config_name: str
    learner: str
    seeds: list[int]
    run_ids: dict[int, str]
    final: dict[int, dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    acc_curves: dict[int, list[float]] = field(default_factory=dict)
    mean_curve: list[float] = field(default_factory=list)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); one value has no spread, so std is 0."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def summarize(table: pa.Table, meta: Mapping[str, Any]) -> list[ConfigSummary]:
    """Per config (in the order given on the command line), the statistics the report shows."""
    cells: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    learners: dict[str, str] = {}
    run_ids: dict[str, dict[int, str]] = {}
    data = table.select(["config_name", "learner", "seed", "phase", "metric", "value", "mlflow_run_id"]).to_pydict()
    for name, learner, seed, phase, metric, value, run_id in zip(*data.values()):
        cells.setdefault(name, {}).setdefault(seed, {}).setdefault(phase, {})[metric] = value
        learners[name] = learner
        run_ids.setdefault(name, {})[seed] = run_id
    order = [c["config_name"] for c in meta.get("configs", [])]
    order += [name for name in cells if name not in order]
    summaries = []
    for name in order:
        if name not in cells:
            continue
        by_seed = cells[name]
        seeds = sorted(by_seed)
        final, curves = {}, {}
        for seed in seeds:
            phases = by_seed[seed]
            last = phases[max(phases)]
            final[seed] = {key: last.get(metric, math.nan) for key, metric in SUMMARY_METRICS.items()}
            curves[seed] = [phases.get(p, {}).get("acc", math.nan) for p in range(max(phases) + 1)]
        stats = {key: mean_std([final[s][key] for s in seeds]) for key in SUMMARY_METRICS}
        length = max(len(c) for c in curves.values())
        mean_curve = [mean_std([c[p] for c in curves.values() if p < len(c)])[0] for p in range(length)]
        summaries.append(
            ConfigSummary(
                config_name=name,
                learner=learners[name],
                seeds=seeds,
                run_ids=run_ids[name],
                final=final,
                mean={k: v[0] for k, v in stats.items()},
                std={k: v[1] for k, v in stats.items()},
                acc_curves=curves,
                mean_curve=mean_curve,
            )
        )
    return summaries


# ---------------------------------------------------------------------------------------------
# Rendering


def _cell(text: Any) -> str:
    """A Markdown table cell: pipes would split the cell, newlines the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(values: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(v) for v in values) + " |"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(headers), "|" + "|".join("---" for _ in headers) + "|", *(_row(r) for r in rows)]


def _num(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(mean: float, std: float) -> str:
    return f"{_num(mean)} ± {_num(std)}"


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:g}%"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _memory(c: Mapping[str, Any]) -> str:
    if c["memory_budget"] == "per_class":
        return f"{c['memory_per_class']} per class ({c['memory_selection']})"
    if c["memory_budget"] == "total":
        return f"{c['memory_total']} in total ({c['memory_selection']})"
    return "none"


def _learner(c: Mapping[str, Any]) -> str:
    two_stage = c.get("two_stage") or "none"
    if two_stage is True:  # results written before two_stage named its kind: the refit
        two_stage = "refit"
    return c["learner"] if two_stage == "none" else f"{c['learner']} ({two_stage} 2-stage)"


def _reductions(c: Mapping[str, Any], paper_epochs: int) -> list[str]:
    """How a config's training budget falls short of the paper's."""
    out = []
    if c["epochs"] != paper_epochs:
        out.append(f"{_epochs(c['epochs'])} per task (the paper: {paper_epochs})")
    if c["train_fraction"] < 1.0:
        out.append(f"{_percent(c['train_fraction'])} of the training images")
    if c["test_fraction"] < 1.0:
        out.append(f"{_percent(c['test_fraction'])} of the test images")
    return out


def _budget(c: Mapping[str, Any], paper_epochs: int) -> str:
    """The training budget in words, measured against the paper's."""
    reduced = _reductions(c, paper_epochs)
    return "reduced: " + ", ".join(reduced) if reduced else f"the paper's: {paper_epochs} epochs per task, all images"


def _protocol_differences(c: Mapping[str, Any], paper_epochs: int) -> list[str]:
    """Where a config departs from the setting the paper's numbers were measured in."""
    out = _reductions(c, paper_epochs)
    if c["imbalance"] != "exp" or c["rho"] != 100.0:
        out.append(f"imbalance {c['imbalance']} rho {c['rho']:g} (the paper: exp, rho 100)")
    if c["memory_budget"] != "per_class" or c["memory_per_class"] != 20:
        out.append(f"memory {_memory(c)} (the paper: 20 per class)")
    return out


def _protocol_text(meta: Mapping[str, Any]) -> str:
    first, tasks = meta["first_task_classes"], meta["incremental_tasks"]
    total = DATASET_FACTS[meta["dataset"]]["num_classes"]
    per_task = (total - first) // tasks
    return f"{meta['protocol']}: {first} classes in the first task, then {tasks} tasks of {per_task}"


def render_report(table: pa.Table, meta: Mapping[str, Any]) -> str:
    """The whole report.md text, from the results table and its metadata alone."""
    summaries = summarize(table, meta)
    configs = {c["config_name"]: c for c in meta["configs"]}
    paper_epochs = meta["paper_epochs"]
    dataset_label = DATASET_LABELS.get(meta["dataset"], meta["dataset"])
    setting = f"{dataset_label} {meta['scenario']} {meta['protocol']}"
    seeds = ", ".join(str(s) for s in meta["seeds"])
    budgets = {_budget(c, paper_epochs) for c in meta["configs"]}
    budget = budgets.pop() if len(budgets) == 1 else "differs per config (see Configs)"
    first = meta["configs"][0]

    lines = [f"# Reproduction: {meta['name']}", ""]
    lines += [
        f"{len(meta['configs'])} config(s) x {len(meta['seeds'])} seed(s) on {setting}; "
        "average incremental accuracy is the mean over all phases of the accuracy on the classes "
        "seen so far, the number in the paper's table.",
        "",
        "## Settings",
        "",
    ]
    settings = [
        ("dataset", f"{dataset_label} (`{meta['dataset']}`), imbalance {first['imbalance']}, rho {first['rho']:g}"),
        ("scenario", meta["scenario"]),
        ("protocol", _protocol_text(meta)),
        ("seeds", seeds),
        ("budget", budget + (" (--full-budget)" if meta.get("full_budget") else "")),
    ]
    if meta.get("experiment"):
        settings.append(("MLflow", f"experiment `{meta['experiment']}`, parent run `{meta['parent_run_id']}`"))
    if meta.get("parent_run_url"):
        settings.append(("open in MLflow", meta["parent_run_url"]))
    settings.append(("wall time", _duration(meta.get("wall_seconds"))))
    if meta.get("command"):
        settings.append(("command", f"`{meta['command']}`"))
    lines += _table(("setting", "value"), settings)

    lines += ["", "### Configs", ""]
    lines += _table(
        ("config", "learner", "epochs / task", "milestones", "lr", "batch", "train images", "test images", "memory"),
        [
            (
                c["config_name"], _learner(c), c["epochs"], ", ".join(str(m) for m in c["milestones"]) or "-",
                f"{c['lr']:g}", c["batch_size"], _percent(c["train_fraction"]), _percent(c["test_fraction"]), _memory(c),
            )
            for c in meta["configs"]
        ],
    )

    lines += ["", *_selection_lines(meta["configs"])]

    lines += ["", "## Mean ± std over seeds", ""]
    if summaries:
        lines.append("Final-phase values; std is the sample standard deviation over seeds (0 with one seed).")
        lines.append("")
        lines += _table(
            ("config", "learner", "seeds", *SUMMARY_HEADERS.values()),
            [
                (s.config_name, _learner(configs.get(s.config_name, {"learner": s.learner})), len(s.seeds),
                 *(_pm(s.mean[k], s.std[k]) for k in SUMMARY_METRICS))
                for s in summaries
            ],
        )
    else:
        lines.append("No run finished, so there is nothing to aggregate.")

    lines += ["", "## Per seed", ""]
    lines += _table(
        ("config", "learner", "seed", *SUMMARY_HEADERS.values(), "MLflow run"),
        [
            (s.config_name, s.learner, seed, *(_num(s.final[seed][k]) for k in SUMMARY_METRICS), f"`{s.run_ids[seed]}`")
            for s in summaries
            for seed in s.seeds
        ],
    )

    if summaries:
        phases = max(len(s.mean_curve) for s in summaries)
        lines += ["", "## Accuracy per phase", ""]
        lines.append("Mean over seeds of the accuracy on all classes seen so far (%); the plot has one line per seed.")
        lines.append("")
        lines += _table(
            ("config", *(f"phase {p}" for p in range(phases))),
            [(s.config_name, *(_num(s.mean_curve[p]) if p < len(s.mean_curve) else "-" for p in range(phases))) for s in summaries],
        )
        lines += ["", f"![accuracy per phase, one line per seed]({REPORT_PLOT_FILE})"]

    lines += ["", "## Compared with the paper", ""]
    lines += _paper_section(meta, summaries, configs, setting)

    if meta.get("failed"):
        lines += ["", "## Failed runs", ""]
        lines += _table(("config", "seed", "error"), [(f["config_name"], f["seed"], f["error"]) for f in meta["failed"]])
    return "\n".join(lines) + "\n"


def _selection_lines(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """How each config was chosen: every accuracy in this report is on the test set."""
    bullets = []
    for c in configs:
        sel = c.get("selection")
        if not sel:
            continue
        where = "held-out validation data" if sel["split"] == "validation" else f"{sel['split']} data"
        warning = " (selected on the test set: these test numbers are biased upwards by the search)" if sel["split"] == "test" else ""
        bullets.append(
            f"- {c['config_name']}: chosen by `imbcil export` from sweep {sel['sweep']} (trial {sel['trial_id']}) "
            f"on {sel['metric']}, {where}, final {sel['value']:.2f}{warning}."
        )
    return ["Every accuracy below is measured on the test set, as in the paper.", *([""] + bullets if bullets else [])]


def _listing(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


def _paper_section(meta, summaries, configs, setting) -> list[str]:
    reference = paper_reference(meta["dataset"], meta["scenario"], meta.get("paper_protocol"))
    if reference is None:
        return [
            f"For {setting}, no paper number exists for this setting: the paper reports the shuffled "
            f"scenario of {_listing([DATASET_LABELS[d] for d in DATASETS])} under {_listing(PROTOCOLS)} "
            "only, so there is nothing to compare with."
        ]
    other = reference.best_other_method
    lines = [
        f"The paper (He, CVPR 2024; one run per method, shuffled LT, full budget) reports for "
        f"{reference.setting}: {DGR} **{reference.dgr:.2f}%**; the best other method is {other} "
        f"with **{reference.best_other:.2f}%**. Differences are our mean minus the paper's number.",
        "",
    ]
    cell = paper_table()[(meta["dataset"], meta["paper_protocol"])]

    def own_row(s) -> str:
        """The paper's number for the row this config reproduces (LUCIR-2stage, ...), and our difference."""
        row = configs.get(s.config_name, {}).get("paper_row")
        if row is None:
            return "-"
        return f"{row} {cell[row]:.2f} ({s.mean['avg_incremental_acc'] - cell[row]:+.2f})"

    lines += _table(
        ("config", "learner", "avg incremental acc (%)", "its row in the paper", f"vs paper DGR {reference.dgr:.2f}", f"vs {other} {reference.best_other:.2f}"),
        [
            (
                s.config_name, _learner(configs.get(s.config_name, {"learner": s.learner})),
                _pm(s.mean["avg_incremental_acc"], s.std["avg_incremental_acc"]), own_row(s),
                f"{s.mean['avg_incremental_acc'] - reference.dgr:+.2f}",
                f"{s.mean['avg_incremental_acc'] - reference.best_other:+.2f}",
            )
            for s in summaries
        ],
    )
    differences = {
        name: _protocol_differences(c, meta["paper_epochs"]) for name, c in configs.items()
    }
    lines.append("")
    if any(differences.values()):
        lines.append("Not comparable as is: these runs depart from the paper's protocol and budget:")
        lines.append("")
        lines += [f"- {name}: {'; '.join(d)}" for name, d in differences.items() if d]
    else:
        lines.append("Same protocol and budget as the paper; the paper's numbers are single runs, ours a mean over seeds.")
    return lines


def render_plot(table: pa.Table, meta: Mapping[str, Any], path: str | Path) -> Optional[Path]:
    """acc_per_phase.png: one line per seed (and per config when there are several)."""
    summaries = summarize(table, meta)
    if not summaries:
        return None
    several = len(summaries) > 1
    curves = {
        (f"{s.config_name} seed {seed}" if several else f"seed {seed}"): curve
        for s in summaries
        for seed, curve in s.acc_curves.items()
    }
    return plots.accuracy_curves(curves, path, title=f"{meta['name']}: accuracy per phase")


def write_report(results_dir: str | Path) -> Path:
    """Render report.md and the plot in `results_dir` from its results.parquet."""
    folder = Path(results_dir)
    table, meta = read_table(folder)
    if folder.suffix == ".parquet":
        folder = folder.parent
    render_plot(table, meta, folder / REPORT_PLOT_FILE)
    path = folder / REPORT_FILE
    path.write_text(render_report(table, meta))
    return path
