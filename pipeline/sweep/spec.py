"""Sweep files: a base run config, a search space over dotted config keys, and tune settings.

Everything a sweep file can get wrong is found here, before Ray starts, and reported as a
one-line `ConfigError` that names the key (`space.train.lr.loguniform: low must be > 0`). The
space is checked against the run config too: each key must be a leaf of the config tree, its
distribution must suit the field's type, and the base config must stay valid at the space's
bounds, so that no trial fails on a sampled value an hour into a sweep.

    base: configs/quickstart.yaml        # a run config, or the mapping itself
    space:
      train.lr: {loguniform: [0.01, 0.5]}
      memory.budget: {categorical: [per_class, total]}
    tune: {metric: val_avg_incremental_acc, mode: max, num_samples: 8, scheduler: asha}
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import optuna

from method.config import RunConfig
from method.results import METRIC_NAMES, TEST_METRICS, paired_metric
from pipeline.config import (
    PLACEMENT_KEYS,
    ConfigError,
    config_from_dict,
    config_to_dict,
    parse_override,
    read_yaml,
    resolve_dict,
    set_dotted,
)

DISTRIBUTIONS = ("loguniform", "uniform", "int", "categorical")
SCHEDULERS = ("asha", "median", "none")
MODES = ("max", "min")
SECTIONS = ("base", "space", "tune", "first_task")
FIRST_TASK_SUFFIX = "-first-task"  # the name of a staged sweep's first stage
# Where a run executes rather than what it computes: a resumed sweep may change these.
# Beyond this many corners of the space, only each key's own bounds are checked.
MAX_CORNERS = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SCALAR = (str, int, float, bool, type(None))

# ---------------------------------------------------------------------------------------------
# Distributions


@dataclass(frozen=True)
class Distribution:
    """One searched key: `kind` is one of DISTRIBUTIONS, `args` its (low, high) or choices."""

    kind: str
    args: tuple

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "loguniform":
            return optuna.distributions.FloatDistribution(float(self.args[0]), float(self.args[1]), log=True)
        if self.kind == "uniform":
            return optuna.distributions.FloatDistribution(float(self.args[0]), float(self.args[1]))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.args[0]), int(self.args[1]))
        return optuna.distributions.CategoricalDistribution(list(self.args))

    def bounds(self) -> list[Any]:
        """The values that bound what can be sampled: both ends of a range, or every choice."""
        return list(self.args)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.args
        if self.kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        return self.args[0] <= value <= self.args[1]

    def describe(self) -> str:
        return f"{self.kind}({', '.join(repr(a) if isinstance(a, str) else str(a) for a in self.args)})"

    def to_yaml(self) -> dict[str, list]:
        return {self.kind: list(self.args)}


# ---------------------------------------------------------------------------------------------
# Tune settings


@dataclass
class TuneSettings:
    # Held-out validation (method.md §1): selecting on the test set would bias what is reported.
    metric: str = "val_avg_incremental_acc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    searcher_seed: int = 0
    scheduler: str = "asha"
    # Counted in completed phases (tasks): ASHA/median judge a trial after this many.
    grace_period: int = 1
    reduction_factor: float = 2.0
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    # Ray retries a trial that raised this many times, from its last checkpoint.
    max_failures: int = 1
    name: str = ""
    # Points Optuna proposes first, in order, each giving every searched key (a warm start, or
    # the exact trials a test needs); then TPE proposes the rest.
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SweepSpec:
    """A validated sweep: the resolved base config, the space and the tune settings."""

    name: str
    base: RunConfig
    space: dict[str, Distribution]
    tune: TuneSettings
    source: str = ""  # the sweep file, for the record
    source_text: str = ""
    # Trials train only the first `phases` phases (a staged sweep's first stage: 1); None: all.
    phases: Optional[int] = None
    # A staged sweep: what its first stage searches on phase 0 alone (`first_stage`).
    first_task: Optional["FirstTaskStage"] = None

    @property
    def max_phases(self) -> int:
        """The most phases any trial can have (a space may search protocol.incremental_tasks)."""
        tasks = [self.base.protocol.incremental_tasks]
        searched = self.space.get("protocol.incremental_tasks")
        if searched is not None:
            tasks += [int(v) for v in searched.bounds()]
        return min(1 + max(tasks), self.phases or math.inf)

    def first_stage(self) -> Optional["SweepSpec"]:
        """The sweep of a staged sweep's first stage: its keys on phase 0 alone; None when unstaged.

        No scheduler (there is one phase to judge), the main sweep's metric, resources and seed.
        """
        if self.first_task is None:
            return None
        tune = dataclasses.replace(
            self.tune, name=self.name + FIRST_TASK_SUFFIX, num_samples=self.first_task.num_samples,
            scheduler="none", points_to_evaluate=[],
        )  # fmt: skip
        return SweepSpec(tune.name, self.base, dict(self.first_task.space), tune, self.source, self.source_text, phases=1)

    def with_first_task_of(self, params: Mapping[str, Any]) -> "SweepSpec":
        """The main stage, its base given the first stage's best values."""
        return dataclasses.replace(self, base=self.trial_config(params))

    def trial_config(self, params: Mapping[str, Any]) -> RunConfig:
        """The complete run config of one trial: the base with the sampled values set."""
        return trial_config(config_to_dict(self.base), params)

    def optuna_space(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {key: dist.to_optuna() for key, dist in self.space.items()}

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data: what `imbcil/sweep.yaml` holds next to the results."""
        return {
            "name": self.name,
            "source": self.source,
            "tune": dataclasses.asdict(self.tune),
            "space": {key: dist.to_yaml() for key, dist in self.space.items()},
            "base": config_to_dict(self.base),
            "phases": self.phases,
            "first_task": None if self.first_task is None else self.first_task.to_dict(),
        }


@dataclass
class FirstTaskStage:
    """`first_task:` of a sweep file: keys that shape phase 0, searched on phase 0 alone first."""

    space: dict[str, Distribution]
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"space": {key: dist.to_yaml() for key, dist in self.space.items()}, "num_samples": self.num_samples}


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> RunConfig:
    """Base config (plain data) + sampled dotted keys -> a validated, resolved RunConfig."""
    raw = copy.deepcopy(dict(base))
    for key, value in params.items():
        set_dotted(raw, key, _plain(value))
    return config_from_dict(raw)


def _plain(value: Any) -> Any:
    """numpy scalars (Optuna may hand them out) -> Python values, so YAML and pydantic take them."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (str, bytes)) else value


# ---------------------------------------------------------------------------------------------
# Loading


def load_sweep(path: str | Path, overrides: Iterable[str] = (), *, data_root: str | None = None) -> SweepSpec:
    """Read and validate a sweep file; `overrides` (dotted key=value) and --data-root apply to its base config."""
    path = Path(path)
    raw = read_yaml(path)
    return sweep_from_dict(
        raw,
        base_dir=path.parent,
        overrides=overrides,
        data_root=data_root,
        default_name=path.stem,
        source=str(path),
        source_text=path.read_text(),
    )


def sweep_from_dict(
    raw: Mapping[str, Any],
    *,
    base_dir: str | Path = ".",
    overrides: Iterable[str] = (),
    data_root: str | None = None,
    default_name: str = "sweep",
    source: str = "",
    source_text: str = "",
) -> SweepSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError("sweep: expected a mapping with base, space and tune")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown key (a sweep file has {', '.join(SECTIONS)})")
    space_raw = raw.get("space")
    base_raw = _base_mapping(raw.get("base"), Path(base_dir))
    overrides = list(overrides)
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(space_raw, Mapping) and key in space_raw:
            raise ConfigError(f"{key}: is searched by the sweep (space.{key}); an override would be ignored")
        set_dotted(base_raw, key, value)
    base = _base_config(base_raw, data_root)
    space = _parse_space(space_raw)
    tune = _parse_tune(raw.get("tune"), default_name)
    first_task = _parse_first_task(raw.get("first_task"), space, tune)
    spec = SweepSpec(tune.name, base, space, tune, source=source, source_text=source_text, first_task=first_task)
    _check_space_against_config(spec)
    _check_tune_against_config(spec)
    if first_task is not None:
        _check_space_against_config(spec.first_stage())
    return spec


def _parse_first_task(raw: Any, main_space: Mapping[str, Distribution], tune: TuneSettings) -> Optional[FirstTaskStage]:
    """A staged sweep's first stage: only keys that shape phase 0, none the main space searches."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"first_task: expected a mapping with space and num_samples (got {type(raw).__name__})")
    for key in raw:
        if key not in ("space", "num_samples"):
            raise ConfigError(f"first_task.{key}: unknown key (first_task has space and num_samples)")
    try:
        space = _parse_space(raw.get("space"))
    except ConfigError as exc:
        raise ConfigError(f"first_task.{exc}") from None
    for key in space:
        if key in main_space:
            raise ConfigError(f"first_task.space.{key}: is searched by the main space too; search it in one stage")
        if _first_phase(key) != 0:
            raise ConfigError(f"first_task.space.{key}: does not change phase 0, so phase 0 alone cannot choose it; search it in space")
    num_samples = _integer("first_task.num_samples", raw.get("num_samples", tune.num_samples), minimum=1)
    return FirstTaskStage(space, num_samples)


def _first_phase(key: str) -> Optional[int]:
    """The `first_phase` a config leaf declares (method/config.py)."""
    node: Any = RunConfig()
    *sections, name = key.split(".")
    for section in sections:
        node = getattr(node, section)
    return next(f.metadata["first_phase"] for f in dataclasses.fields(node) if f.name == name)


def spec_from_resolved(data: Mapping[str, Any]) -> SweepSpec:
    """Read back `SweepSpec.to_dict()` (the `imbcil/sweep.yaml` of a sweep's results)."""
    try:
        tune = TuneSettings(**data["tune"])
        space = {key: _parse_distribution(key, value) for key, value in data["space"].items()}
        base = _base_config(dict(data["base"]))
        first = data.get("first_task")
        first_task = None if first is None else FirstTaskStage(
            {key: _parse_distribution(key, value) for key, value in first["space"].items()}, int(first["num_samples"])
        )  # fmt: skip
        return SweepSpec(data["name"], base, space, tune, source=data.get("source", ""), phases=data.get("phases"), first_task=first_task)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"sweep.yaml: not a resolved sweep spec ({exc})") from None


def differing_key(given: SweepSpec, saved: SweepSpec) -> str | None:
    """The first key in which two specs differ, ignoring where runs execute; None if none."""
    ours, theirs = given.to_dict(), saved.to_dict()
    for key in ("phases", "first_task"):
        if ours.get(key) != theirs.get(key):
            return key
    for section in ("tune", "space"):
        for key in sorted(set(ours[section]) | set(theirs[section])):
            if ours[section].get(key) != theirs[section].get(key):
                return f"{section}.{key}"
    flat_ours, flat_theirs = _flat(ours["base"]), _flat(theirs["base"])
    for key in sorted(set(flat_ours) | set(flat_theirs)):
        if key not in PLACEMENT_KEYS and flat_ours.get(key) != flat_theirs.get(key):
            return f"base.{key}"
    return None


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _base_mapping(value: Any, base_dir: Path) -> dict[str, Any]:
    if value is None:
        raise ConfigError("base: missing; give a run config mapping or the path of a run config YAML")
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            return read_yaml(path)
        except ConfigError as exc:
            raise ConfigError(f"base: {exc}") from None
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    raise ConfigError(f"base: expected a run config mapping or a path (got {type(value).__name__})")


def _base_config(raw: dict[str, Any], data_root: str | None = None) -> RunConfig:
    try:
        return resolve_dict(raw, data_root=data_root)
    except ConfigError as exc:
        raise ConfigError(f"base.{exc}") from None


# ---------------------------------------------------------------------------------------------
# The space


def _parse_space(raw: Any) -> dict[str, Distribution]:
    if raw is None or (isinstance(raw, Mapping) and not raw):
        raise ConfigError("space: empty; name at least one config key to search, e.g. train.lr: {loguniform: [0.01, 0.5]}")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"space: expected a mapping of dotted config keys (got {type(raw).__name__})")
    space = {}
    for key, value in raw.items():
        key = str(key)
        field_type = _leaf_type(key)
        dist = _parse_distribution(key, value)
        _check_type(key, dist, field_type)
        space[key] = dist
    return space


def _leaf_type(key: str) -> Any:
    """The declared type of a config leaf, refusing keys the run config does not have."""
    node: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise ConfigError(f"space.{'.'.join(parts[: i + 1])}: unknown config key")
        node = hints[part]
    if dataclasses.is_dataclass(node):
        raise ConfigError(f"space.{key}: is a section; search one of its keys")
    return node


def _parse_distribution(key: str, value: Any) -> Distribution:
    where = f"space.{key}"
    usage = "expected one of {loguniform: [low, high]}, {uniform: [low, high]}, {int: [low, high]}, {categorical: [a, b, ...]}"
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{where}: {usage}")
    kind, args = next(iter(value.items()))
    where = f"{where}.{kind}"
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution; use {', '.join(DISTRIBUTIONS)}")
    if kind == "categorical":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: expected a non-empty list of choices")
        for choice in args:
            if not isinstance(choice, _SCALAR):
                raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null (got {choice!r})")
        for i, choice in enumerate(args):
            # `1 == True` in Python; compare types too, so [1, true] are two choices.
            if any(choice == other and type(choice) is type(other) for other in args[:i]):
                raise ConfigError(f"{where}: duplicate choice {choice!r}")
        return Distribution(kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: expected [low, high] (got {args!r})")
    low, high = args
    numbers = (int,) if kind == "int" else (int, float)
    for name, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, numbers) or not math.isfinite(bound):
            what = "an integer" if kind == "int" else "a finite number"
            raise ConfigError(f"{where}: {name} must be {what} (got {bound!r})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low must be > 0 (got {low!r})")
    if not low < high:
        raise ConfigError(f"{where}: low must be < high (got [{low!r}, {high!r}])")
    return Distribution(kind, (low, high))


def _base_types(annotation: Any) -> set[type]:
    """`Optional[int]` -> {int, NoneType}; `list[int]` -> {list}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return set().union(*(_base_types(arg) for arg in typing.get_args(annotation)))
    if origin is not None:
        return {origin}
    return {annotation}


def _check_type(key: str, dist: Distribution, annotation: Any) -> None:
    types = _base_types(annotation) - {type(None)}
    where = f"space.{key}.{dist.kind}"
    if types & {list, dict, tuple}:
        raise ConfigError(f"space.{key}: a list cannot be searched; search a number, string or switch")
    if dist.kind in ("loguniform", "uniform") and not types & {float}:
        hint = "; use {int: [low, high]}" if int in types else "; use {categorical: [...]}"
        raise ConfigError(f"{where}: {key} takes {_type_words(types)}, not real numbers{hint}")
    if dist.kind == "int" and not types & {int, float}:
        raise ConfigError(f"{where}: {key} takes {_type_words(types)}; use {{categorical: [...]}}")


def _type_words(types: set[type]) -> str:
    names = {bool: "true/false", int: "integers", float: "numbers", str: "strings"}
    return " or ".join(names.get(t, t.__name__) for t in sorted(types, key=lambda t: t.__name__))


def _check_space_against_config(spec: SweepSpec) -> None:
    """Every value the space can produce must give a valid run config.

    Each key is tried at its bounds (or every choice) on its own, naming the key on failure;
    then, while cheap, every corner of the space, which catches rules that join two keys
    (e.g. memory.budget=total with a small memory.total).
    """
    base = config_to_dict(spec.base)
    for key, dist in spec.space.items():
        for value in dist.bounds():
            try:
                trial_config(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"space.{key}.{dist.kind}: {value!r} gives an invalid run config: {exc}") from None
    corners = math.prod(len(d.bounds()) for d in spec.space.values())
    if len(spec.space) < 2 or corners > MAX_CORNERS:
        return
    keys = list(spec.space)
    for values in itertools.product(*(spec.space[k].bounds() for k in keys)):
        try:
            trial_config(base, dict(zip(keys, values)))
        except ConfigError as exc:
            point = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values))
            raise ConfigError(f"space: the point {{{point}}} gives an invalid run config: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Tune settings


def _parse_tune(raw: Any, default_name: str) -> TuneSettings:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tune: expected a mapping of settings (got {type(raw).__name__})")
    known = {f.name for f in dataclasses.fields(TuneSettings)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"tune.{key}: unknown key (known: {', '.join(sorted(known))})")
    settings = TuneSettings()
    for key, value in raw.items():
        setattr(settings, key, value)
    _choice("tune.metric", settings.metric, METRIC_NAMES)
    _choice("tune.mode", settings.mode, MODES)
    _choice("tune.scheduler", settings.scheduler, SCHEDULERS)
    settings.num_samples = _integer("tune.num_samples", settings.num_samples, minimum=1)
    settings.max_concurrent = _integer("tune.max_concurrent", settings.max_concurrent, minimum=1)
    settings.searcher_seed = _integer("tune.searcher_seed", settings.searcher_seed, minimum=0)
    settings.grace_period = _integer("tune.grace_period", settings.grace_period, minimum=1)
    settings.max_failures = _integer("tune.max_failures", settings.max_failures, minimum=0)
    factor = settings.reduction_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ConfigError(f"tune.reduction_factor: must be a number > 1 (got {factor!r})")
    settings.reduction_factor = float(factor)
    settings.resources_per_trial = _resources(settings.resources_per_trial)
    name = default_name if settings.name in ("", None) else settings.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"tune.name: use letters, digits, '.', '_' and '-', starting with a letter or digit (got {name!r})")
    settings.name = name
    return settings


def _check_points(spec: SweepSpec) -> None:
    points = spec.tune.points_to_evaluate
    if not isinstance(points, list):
        raise ConfigError(f"tune.points_to_evaluate: expected a list of points (got {type(points).__name__})")
    base = config_to_dict(spec.base)
    for i, point in enumerate(points):
        where = f"tune.points_to_evaluate[{i}]"
        if not isinstance(point, Mapping):
            raise ConfigError(f"{where}: expected a mapping of searched keys to values (got {point!r})")
        missing, extra = set(spec.space) - set(point), set(point) - set(spec.space)
        if missing or extra:
            what = f"missing {', '.join(sorted(missing))}" if missing else f"{', '.join(sorted(extra))} not searched"
            raise ConfigError(f"{where}: give a value for every searched key and no other ({what})")
        for key, value in point.items():
            if not spec.space[key].contains(value):
                raise ConfigError(f"{where}.{key}: {value!r} is outside space.{key} ({spec.space[key].describe()})")
        try:
            trial_config(base, point)
        except ConfigError as exc:
            raise ConfigError(f"{where}: gives an invalid run config: {exc}") from None


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: must be an integer (got {value!r})")
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum} (got {value!r})")
    return value


def _resources(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tune.resources_per_trial: expected a mapping like {{cpu: 1, gpu: 0.5}} (got {raw!r})")
    resources = {"cpu": 1.0, "gpu": 0.0}
    for key, value in raw.items():
        if key not in resources:
            raise ConfigError(f"tune.resources_per_trial.{key}: unknown key (cpu, gpu)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"tune.resources_per_trial.{key}: must be a number (got {value!r})")
        resources[key] = float(value)
    if resources["cpu"] <= 0:
        raise ConfigError(f"tune.resources_per_trial.cpu: must be > 0 (got {resources['cpu']:g})")
    if resources["gpu"] < 0:
        raise ConfigError(f"tune.resources_per_trial.gpu: must be >= 0 (got {resources['gpu']:g})")
    if resources["gpu"] > 1 and not resources["gpu"].is_integer():
        # Ray shares a GPU only below one whole device.
        raise ConfigError(f"tune.resources_per_trial.gpu: above 1 must be a whole number (got {resources['gpu']:g})")
    return resources


def test_selection_warning(spec: SweepSpec) -> str | None:
    """One line for a sweep that selects on the test set (it still runs); None otherwise."""
    metric = spec.tune.metric
    if metric not in TEST_METRICS:
        return None
    instead = f"; {paired_metric(metric)} is its validation counterpart" if paired_metric(metric) else ""
    return f"warning: tune.metric {metric} is measured on the test set, so this sweep selects on test data{instead}"


def _check_tune_against_config(spec: SweepSpec) -> None:
    tune = spec.tune
    _check_points(spec)
    phases = spec.max_phases
    if tune.scheduler != "none" and tune.grace_period > phases:
        raise ConfigError(
            f"tune.grace_period: {tune.grace_period} phases exceeds the {phases} phases of the base config"
        )
    if tune.resources_per_trial["gpu"] > 0 and spec.base.device == "cpu":
        raise ConfigError("tune.resources_per_trial.gpu: the base config runs on device cpu; set device auto or cuda")
    if tune.resources_per_trial["gpu"] == 0 and spec.base.device == "cuda":
        # A trial Ray gives no GPU trains on the CPU (runtime.ray_task_device), never on an uncounted card.
        raise ConfigError("tune.resources_per_trial.gpu: the base config asks for device cuda but trials get no GPU; give them one or set device auto")
