"""The learner registry and the base learner's loss, by hand."""

import math

import pytest
import torch

from method.config import LearnerConfig
from method.learners import LEARNERS, TaskContext, make_learner


def test_the_registry_is_the_list_the_config_accepts():
    assert set(LEARNERS) == {"dgr", "finetune", "replay", "lwf", "icarl", "wa", "lucir", "podnet", "eeil"}
    for name, cls in LEARNERS.items():
        assert cls.name == name and type(make_learner(LearnerConfig(name=name))) is cls


def context(num_old: int, num_seen: int) -> TaskContext:
    counts = torch.full((num_seen,), 10)
    return TaskContext(task=1, num_old=num_old, num_seen=num_seen, class_counts=counts, original_counts=counts, n_seen=10, n_new=10)


def test_base_losses_by_hand():
    # Two classes, equal logits: cross-entropy log 2 whatever the target.
    logits = torch.zeros(1, 2)
    replay = make_learner(LearnerConfig(name="replay"))
    replay.begin_task(context(1, 2))
    terms = replay.loss_terms(logits, torch.zeros(1, 1), torch.tensor([1]))
    assert list(terms) == ["ce"] and terms["ce"].item() == pytest.approx(math.log(2))
    # LwF adds KD on the old classes: one old class, so softmax is 1 and the KD is -log 1 = 0.
    lwf = make_learner(LearnerConfig(name="lwf"))
    lwf.begin_task(context(1, 2))
    terms = lwf.loss_terms(logits, torch.zeros(1, 1), torch.tensor([1]))
    assert list(terms) == ["ce", "kd"] and terms["kd"].item() == pytest.approx(0.0, abs=1e-7)
    # Two old classes, teacher (0, 0), student (0, log 3) at T = 1: -(1/2) log(1/4) - (1/2) log(3/4).
    lwf.cfg.kd_temperature = 1.0
    lwf.begin_task(context(2, 3))
    student = torch.tensor([[0.0, math.log(3.0), 0.0]])
    kd = lwf.loss_terms(student, torch.zeros(1, 2), torch.tensor([2]))["kd"].item()
    assert kd == pytest.approx(-0.5 * math.log(0.25) - 0.5 * math.log(0.75))
