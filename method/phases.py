"""Phase keys: a digest of exactly what determines a phase's trained state, so runs share phases.

A run is a chain of phases, and runs that agree on their first phases train the same phases
again: every trial of a sweep over the beta schedule or the memory budget trains one identical
phase 0. `phase_keys(cfg, benchmark, device)` names each phase by what it depends on, read from
the `first_phase` / `per_task` declarations next to each config field (method/config.py):

    key(k) = H(key(k-1), the fields that first matter at phase k, the per-task values of phase k)

with key(-1) = H(method code version, torch version, device, data fingerprint). A config field
without a declaration cannot be keyed, and says so.

A stored phase (`StoredPhase`) holds what a run needs to go on as if it had trained that phase:
the trained model and RNG states before the memory update, the herding features the update
ranks, and the scores of the phase's evaluation where they do not depend on the memory. The
store itself (a folder, with claims) is the pipeline's; the trainer sees the `PhaseStore` shape.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any, ContextManager, Optional, Protocol

import numpy as np
import torch

from method.config import RunConfig
from method.data import Benchmark

KEY_FORMAT = 1


class UndeclaredFieldError(TypeError):
    """A config field has no `first_phase` declaration, so no phase key can account for it."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version and a digest of `method/`'s sources: phases from other code never match."""
    try:
        version = importlib.metadata.version("imbcil")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{version}+{digest.hexdigest()}"


def data_fingerprint(benchmark: Benchmark) -> str:
    """A digest of the images and labels the run trains, validates and tests on.

    It covers the data itself rather than where it lives, so two nodes with their own copies of a
    dataset share phases, and a changed file never reuses a phase trained on the old one.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([benchmark.dataset, benchmark.class_order, benchmark.task_classes]).encode())
    for split in (benchmark.train, benchmark.val, benchmark.test):
        digest.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
        if split.images is not None:
            digest.update(str(tuple(split.images.shape)).encode())
            digest.update(split.images.contiguous().numpy().tobytes())
        else:
            digest.update("\n".join(split.paths or []).encode())
    return digest.hexdigest()


def device_identity(device: torch.device) -> str:
    """What of the device can change the numbers: its kind, and on CUDA the card."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def declared_fields(cfg: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field as (dotted key, field, value), refusing one without a declaration."""
    leaves = []
    for f in dataclasses.fields(cfg):
        key, value = f"{prefix}{f.name}", getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            leaves.extend(declared_fields(value, prefix=f"{key}."))
            continue
        if "first_phase" not in f.metadata:
            raise UndeclaredFieldError(f"{key}: the config field declares no first_phase, so the phase key cannot cover it")
        leaves.append((key, f, value))
    return leaves


def _read_by_this_learner(key: str, cfg: RunConfig) -> bool:
    """`learner.<name>.*` is the section of learner <name>: no other learner reads it."""
    parts = key.split(".")
    return not (parts[0] == "learner" and len(parts) > 2 and parts[1] != cfg.learner.name)


def phase_inputs(cfg: RunConfig, task: int) -> dict[str, Any]:
    """What phase `task` adds to the key: fields first mattering there, and per-task values."""
    inputs = {}
    for key, f, value in declared_fields(cfg):
        first, per_task = f.metadata["first_phase"], f.metadata.get("per_task")
        if first is None or first > task or not _read_by_this_learner(key, cfg):
            continue
        if per_task is not None:
            inputs[key] = per_task(cfg, task)
        elif first == task:
            inputs[key] = value
    return inputs


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def phase_keys(cfg: RunConfig, benchmark: Benchmark, device: torch.device) -> list[str]:
    """key(k) for every phase of the run; equal keys mean bit-identical trained phases."""
    key = _digest(KEY_FORMAT, code_version(), torch.__version__, device_identity(device), data_fingerprint(benchmark))
    keys = []
    for task in range(benchmark.num_tasks):
        key = _digest(key, task, phase_inputs(cfg, task))
        keys.append(key)
    return keys


@dataclasses.dataclass
class StoredPhase:
    """A phase as another run trained it: enough to go on exactly as if this run had."""

    phase: int
    model: dict[str, torch.Tensor]  # after training (and the two-stage), before the memory update
    head_sizes: list[int]
    torch_rng: torch.Tensor
    cuda_rng: Optional[list[torch.Tensor]]
    generator: torch.Tensor
    loss: float
    train_seconds: float
    images_seen: int
    # Herding features of each new class under the phase's frozen model, for any budget.
    herding_features: Optional[dict[int, torch.Tensor]] = None
    # The phase's test and validation scores, where they are the model's alone (not iCaRL's means).
    evaluation: Optional[dict[str, Any]] = None
    trained_by: str = ""  # who trained it: the store fills in its owner (an MLflow run id)


class PhaseSlot(Protocol):
    """One phase key, claimed: `entry` is the stored phase, or None for the claimant to train."""

    entry: Optional[StoredPhase]
    wants_entry: bool  # False where another run is training it, or the store cannot take it

    def save(self, phase: StoredPhase) -> None: ...


class PhaseStore(Protocol):
    def slot(self, key: str, phase: int) -> ContextManager[PhaseSlot]: ...
