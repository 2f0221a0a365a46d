"""Load, override, validate and save run configs (the dataclass tree of `method.config`).

Types and unknown keys are checked by pydantic over the dataclasses; the bounds and choices
declared in each field's metadata and the cross-field protocol rules are checked here. Every
failure is a `ConfigError` whose message is one line that names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Iterable

import pydantic
import yaml

from method.config import DATASET_FACTS, RunConfig, resolve_dataset_defaults
from method.learners import LEARNERS


# Where the data lives when neither --data-root nor the config says.
DATA_ENV = "IMBCIL_DATA"


class ConfigError(ValueError):
    """An invalid config; the message is one line naming the key."""


def _dataclass_types(cls) -> Iterable[type]:
    yield cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _dataclass_types(hints[f.name])


for _cls in _dataclass_types(RunConfig):
    _cls.__pydantic_config__ = {"extra": "forbid", "strict": False}

_RUN_CONFIG_ADAPTER = pydantic.TypeAdapter(RunConfig)


def config_from_dict(raw: dict[str, Any] | None) -> RunConfig:
    """A resolved, validated RunConfig from plain data (as read from YAML), with no outside options."""
    cfg = _build(raw)
    resolve_dataset_defaults(cfg)
    _check_rules(cfg)
    return cfg


def _build(raw: dict[str, Any] | None) -> RunConfig:
    """Types and unknown keys (pydantic), declared bounds and choices; the joint rules come after."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of keys, got {type(raw).__name__}")
    raw = _upgraded(copy.deepcopy(raw))
    try:
        cfg = _RUN_CONFIG_ADAPTER.validate_python(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
    _check_bounds(cfg, prefix="")  # before anything looks a dataset's facts up
    return cfg


def _upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """A config as older releases wrote it, in today's keys: learner.two_stage was a switch for
    the refit (every exported config names it), and now names the kind of second stage."""
    learner = raw.get("learner")
    if isinstance(learner, dict) and isinstance(learner.get("two_stage"), bool):
        learner["two_stage"] = "refit" if learner["two_stage"] else "none"
    return raw


# Where and how a run executes, not what it computes: a resumed run or sweep may change them.
PLACEMENT_KEYS = ("data.root", "device", "data.num_workers", "train.cuda_graph")


def resolve(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    data_root: str | None = None,
    device: str | None = None,
) -> RunConfig:
    """The one way a verb gets its run config, validated once with everything that decides it.

    In order: the YAML file (or the defaults), the `key=value` overrides, the command line's
    --data-root (which beats the config's data.root, which beats $IMBCIL_DATA) and --device,
    the dataset's defaults, an absolute data root (trials and seeds run in other folders); then
    `validate`, so that `--device cpu` with `train.cuda_graph=true` is refused here.
    """
    return resolve_dict(read_yaml(path) if path is not None else {}, overrides, data_root=data_root, device=device)


def resolve_dict(
    raw: dict[str, Any], overrides: Iterable[str] = (), *, data_root: str | None = None, device: str | None = None
) -> RunConfig:
    """`resolve` for a config already read as plain data (a logged config, a sweep's base)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    data = raw.get("data")
    configured_root = data.get("root") if isinstance(data, dict) else None
    if data_root or (not configured_root and os.environ.get(DATA_ENV)):
        set_dotted(raw, "data.root", data_root or os.environ[DATA_ENV])
    if device:
        raw["device"] = device
    cfg = _build(raw)
    if cfg.data.root:
        cfg.data.root = str(Path(cfg.data.root).expanduser().absolute())
    resolve_dataset_defaults(cfg)
    _check_rules(cfg)
    return cfg


def _one_line(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    # Stdlib dataclasses report an unknown key as unexpected_keyword_argument, not extra_forbidden.
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{key}: unknown key"
    value = err.get("input")
    return f"{key}: {err['msg'].lower()} (got {value!r})"


def validate(cfg: RunConfig) -> None:
    """Check declared bounds/choices and the protocol's cross-field rules."""
    _check_bounds(cfg, prefix="")
    _check_rules(cfg)


def _check_rules(cfg: RunConfig) -> None:
    """The rules that join fields (and the dataset's facts); bounds and choices come first."""
    facts = DATASET_FACTS[cfg.data.dataset]
    num_classes = facts["num_classes"]
    first = cfg.protocol.first_task_classes
    tasks = cfg.protocol.incremental_tasks
    if first >= num_classes:
        raise ConfigError(
            f"protocol.first_task_classes: {first} leaves no classes for incremental tasks "
            f"({cfg.data.dataset} has {num_classes})"
        )
    rest = num_classes - first
    if rest % tasks != 0:
        raise ConfigError(
            f"protocol.incremental_tasks: {rest} remaining classes do not split evenly into {tasks} tasks"
        )
    for key, ms in (("train.milestones", cfg.train.milestones), ("train.first_task.milestones", cfg.train.first_task.milestones)):
        if ms is not None and (any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:]))):
            raise ConfigError(f"{key}: must be increasing positive epochs (got {ms})")
    if cfg.memory.budget == "total":
        seen_at_end = num_classes
        if cfg.memory.total < seen_at_end:
            raise ConfigError(
                f"memory.total: {cfg.memory.total} is below one exemplar per class ({seen_at_end} classes)"
            )
    learner = LEARNERS[cfg.learner.name]
    if cfg.memory.budget == "none" and learner.needs_memory:
        raise ConfigError(f"memory.budget: learner {cfg.learner.name} needs exemplars (budget 'none' given)")
    if not learner.uses_memory and cfg.memory.budget != "none":
        # A learner defined as learning without memory: say so rather than silently ignore it.
        raise ConfigError(f"memory.budget: learner {cfg.learner.name} keeps no memory; set memory.budget=none")
    if cfg.train.cuda_graph and learner.needs_features:
        raise ConfigError(f"train.cuda_graph: learner {cfg.learner.name} runs a plain autograd step, which is not captured")
    if cfg.learner.two_stage == "refit" and learner.head != "linear":
        raise ConfigError(
            f"learner.two_stage: refit fits linear heads; {cfg.learner.name} has {learner.head} heads (use lws)"
        )
    if cfg.train.cuda_graph and cfg.device == "cpu":
        raise ConfigError("train.cuda_graph: CUDA graphs need device cuda (or auto on a CUDA machine), not cpu")
    source = cfg.data.source
    if source == "parquet" and cfg.data.dataset != "cifar10":
        raise ConfigError(f"data.source: parquet holds CIFAR-10 only (dataset {cfg.data.dataset})")
    if source == "filelist" and facts["image_size"] == 32:
        raise ConfigError(f"data.source: {cfg.data.dataset} is read from folders or parquet, not file lists")
    if source in ("parquet", "folder") and facts["image_size"] != 32:
        raise ConfigError(f"data.source: {cfg.data.dataset} is read from train.txt/test.txt lists (filelist)")


def _check_bounds(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_bounds(value, prefix=f"{key}.")
            continue
        if value is None:
            continue
        meta = f.metadata
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")
        for name, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if name in meta and not ok(value, meta[name]):
                raise ConfigError(f"{key}: must be {word} {meta[name]} (got {value!r})")


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ("train.lr", 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key=value (e.g. train.lr=0.05)")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: an override needs a key before '='")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, refusing keys the config does not have."""
    parts = key.split(".")
    node = raw
    template: Any = RunConfig()
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(template) or part not in {f.name for f in dataclasses.fields(template)}:
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: unknown key")
        template = getattr(template, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(template):
                raise ConfigError(f"{key}: is a section; set one of its keys instead")
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: expected a mapping")
            node = child


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), *, resolve: bool = True) -> RunConfig:
    """A config file as it is written (plus overrides), without the command line's options.

    For files that are complete run configs (exports, trial configs, `show-config`); a verb that
    also takes --data-root or --device uses `resolve`.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    cfg = _build(raw)
    if resolve:
        resolve_dataset_defaults(cfg)
    _check_rules(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return raw


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig, header: str = "") -> str:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def save_config(cfg: RunConfig, path: str | Path, header: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg, header))
    return path


def flatten(cfg: RunConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 0.1, ...}, for MLflow params and tables."""
    data = config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(nested, key, value)
    return nested
