"""Run configs: the paper's defaults, YAML round trips, dotted overrides and one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from method.config import LearnerConfig, MemoryConfig, RunConfig
from pipeline.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    flatten,
    load_config,
    save_config,
    unflatten,
    validate,
)


def test_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.data.dataset == "cifar100"
    assert cfg.train.lr == 0.1 and cfg.train.momentum == 0.9 and cfg.train.batch_size == 128
    assert cfg.train.epochs == 160 and cfg.train.milestones == [80, 120] and cfg.train.lr_decay == 0.1
    assert cfg.train.weight_decay == 5e-4
    assert cfg.model.backbone == "resnet32"
    assert cfg.memory.budget == "per_class" and cfg.memory.per_class == 20 and cfg.memory.selection == "herding"
    dgr = cfg.learner.dgr
    assert cfg.learner.name == "dgr"
    assert (dgr.lambda_b, dgr.attenuation, dgr.temperature) == (0.7, 1.0, 2.0)
    assert dgr.distillation == "dakd" and dgr.beta_schedule == "sqrt" and dgr.dakd_prior == "l2"
    assert dgr.logit_adjustment and dgr.intra_phase_reweighting and dgr.inter_phase_reweighting
    assert cfg.data.rho == 100.0 and cfg.data.imbalance == "exp" and cfg.data.scenario == "shuffled"
    assert cfg.data.subset_seed == 0 and cfg.data.val_fraction == 0.1
    assert (cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks) == (10, 9)
    assert cfg.train.validate_every_epoch is False and cfg.train.precision == "fp32"


def test_unresolved_config_leaves_dataset_defaults_open():
    cfg = load_config(resolve=False)
    assert cfg.train.epochs is None and cfg.train.milestones is None and cfg.train.weight_decay is None
    assert cfg.model.backbone == "auto"
    assert cfg == RunConfig()


def test_imagenet_subset_resolves_to_its_paper_values():
    cfg = load_config(overrides=["data.dataset=imagenet_subset"])
    assert cfg.train.epochs == 90 and cfg.train.milestones == [30, 60] and cfg.train.weight_decay == 1e-4
    assert cfg.model.backbone == "resnet18"
    assert cfg.data.source == "auto"


def test_explicit_values_win_over_dataset_defaults():
    cfg = load_config(overrides=["data.dataset=imagenet_subset", "train.epochs=5", "train.milestones=[2,4]"])
    assert cfg.train.epochs == 5 and cfg.train.milestones == [2, 4] and cfg.train.weight_decay == 1e-4


def test_cifar10_lfs5_and_lfh5_validate():
    lfs = load_config(overrides=["data.dataset=cifar10", "protocol.first_task_classes=2", "protocol.incremental_tasks=4"])
    lfh = load_config(overrides=["data.dataset=cifar10", "protocol.first_task_classes=5", "protocol.incremental_tasks=5"])
    assert lfs.train.epochs == lfh.train.epochs == 160 and lfs.model.backbone == "resnet32"


def test_yaml_round_trip(tmp_path: Path):
    cfg = load_config(
        overrides=["data.dataset=cifar10", "protocol.first_task_classes=2", "protocol.incremental_tasks=4", "train.lr=0.05"]
    )
    path = save_config(cfg, tmp_path / "sub" / "run.yaml", header="a header\nover two lines")
    text = path.read_text()
    assert text.startswith("# a header\n# over two lines\n")
    again = load_config(path)
    assert again == cfg
    # dump -> load -> dump gives the same text, byte for byte.
    assert dump_yaml(again) == dump_yaml(cfg)
    second = save_config(again, tmp_path / "again.yaml", header="a header\nover two lines")
    assert second.read_text() == text


def test_unresolved_round_trip_keeps_nulls(tmp_path: Path):
    cfg = load_config(resolve=False)
    path = save_config(cfg, tmp_path / "run.yaml")
    assert "epochs: null" in path.read_text()
    assert load_config(path, resolve=False) == cfg
    assert load_config(path) == load_config()


def test_flatten_unflatten_round_trip():
    cfg = load_config()
    flat = flatten(cfg)
    assert flat["train.lr"] == 0.1 and flat["learner.dgr.lambda_b"] == 0.7
    assert config_from_dict(unflatten(flat)) == cfg
    assert config_to_dict(cfg) == dataclasses.asdict(cfg)


def test_dotted_overrides_apply_with_yaml_types(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.2\n  epochs: 12\nlearner:\n  dgr:\n    attenuation: 2.0\n")
    cfg = load_config(
        path,
        [
            "train.lr=0.05",
            "learner.dgr.lambda_b=0.5",
            "train.milestones=[5,8]",
            "train.validate_every_epoch=true",
            "data.scenario=ordered",
            "seed=3",
            "name=my run",
        ],
    )
    assert cfg.train.lr == 0.05 and isinstance(cfg.train.lr, float)
    assert cfg.learner.dgr.lambda_b == 0.5
    assert cfg.train.milestones == [5, 8] and all(type(m) is int for m in cfg.train.milestones)
    assert cfg.train.validate_every_epoch is True
    assert cfg.data.scenario == "ordered" and cfg.seed == 3 and cfg.name == "my run"
    # Values of the file that no override touched survive.
    assert cfg.train.epochs == 12 and cfg.learner.dgr.attenuation == 2.0
    # A later override of the same key wins.
    assert load_config(overrides=["train.lr=0.3", "train.lr=0.01"]).train.lr == 0.01


BAD_OVERRIDES = [
    (["bogus=1"], "bogus"),
    (["device=cpu", "train.cuda_graph=true"], "train.cuda_graph"),
    (["train.lrr=0.1"], "train.lrr"),
    (["learner.dgr.lambda=0.5"], "learner.dgr.lambda"),
    (["train=5"], "train"),
    (["train.lr=abc"], "train.lr"),
    (["train.lr=-0.1"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.momentum=1.0"], "train.momentum"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.milestones=abc"], "train.milestones"),
    (["train.milestones=[120,80]"], "train.milestones"),
    (["train.milestones=[80,80]"], "train.milestones"),
    (["train.milestones=[0,5]"], "train.milestones"),
    (["protocol.incremental_tasks=0"], "protocol.incremental_tasks"),
    (["protocol.first_task_classes=100"], "protocol.first_task_classes"),
    (["protocol.first_task_classes=150"], "protocol.first_task_classes"),
    (["protocol.incremental_tasks=7"], "protocol.incremental_tasks"),
    (["data.dataset=cifar10"], "protocol.first_task_classes"),  # 10 classes, first task of 10
    (["data.dataset=cifar10", "protocol.first_task_classes=1"], "protocol.first_task_classes"),
    (["data.dataset=cifar10", "protocol.first_task_classes=4", "protocol.incremental_tasks=4"], "protocol.incremental_tasks"),
    (["memory.budget=total", "memory.total=99"], "memory.total"),
    (["memory.per_class=0"], "memory.per_class"),
    (["learner.name=foo"], "learner.name"),
    (["data.scenario=random"], "data.scenario"),
    (["data.dataset=mnist"], "data.dataset"),
    (["data.rho=0.5"], "data.rho"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["data.train_fraction=0"], "data.train_fraction"),
    (["data.source=parquet"], "data.source"),
    (["data.dataset=imagenet_subset", "data.source=folder"], "data.source"),
    (["data.source=filelist"], "data.source"),
    (["learner.name=replay", "memory.budget=none"], "memory.budget"),
    (["learner.dgr.temperature=0"], "learner.dgr.temperature"),
    (["learner.two_stage=twice"], "learner.two_stage"),
    (["learner.name=lucir", "learner.two_stage=refit"], "learner.two_stage"),  # refit fits linear heads
    (["learner.name=podnet", "train.cuda_graph=true", "device=cuda"], "train.cuda_graph"),  # an autograd step
    (["learner.lucir.hard_negatives=0"], "learner.lucir.hard_negatives"),
    (["trainlr"], "trainlr"),
    (["=5"], "=5"),
]


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key}:"), message


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("bogus: 1\n", "bogus"),
        ("train:\n  lrr: 0.1\n", "train.lrr"),
        ("learner:\n  dgr:\n    lambda: 0.1\n", "learner.dgr.lambda"),
        ("train:\n  lr: abc\n", "train.lr"),
        ("train: 5\n", "train"),
        ("protocol:\n  first_task_classes: 1\n", "protocol.first_task_classes"),
    ],
)
def test_bad_yaml_value_is_one_line_naming_the_key(tmp_path: Path, yaml_text, key):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}:"), message


def test_a_config_of_the_two_stage_switch_still_loads():
    # Exported configs of before name learner.two_stage as true/false: the refit, or none.
    assert config_from_dict({"learner": {"two_stage": True}}).learner.two_stage == "refit"
    assert config_from_dict({"learner": {"two_stage": False}}).learner.two_stage == "none"
    assert load_config(overrides=["learner.two_stage=true"]).learner.two_stage == "refit"


def test_lucir_weight_follows_the_datasets_schedule():
    # The reference's lambda base: 5 for the 160-epoch CIFAR runs, 10 for the 90-epoch ImageNet ones.
    assert config_from_dict({}).learner.lucir.lambda_base == 5.0
    assert config_from_dict({"data": {"dataset": "imagenet_subset"}}).learner.lucir.lambda_base == 10.0
    assert config_from_dict({"learner": {"lucir": {"lambda_base": 2.0}}}).learner.lucir.lambda_base == 2.0


def test_unknown_keys_say_so():
    for raw, key in (({"bogus": 1}, "bogus"), ({"train": {"lrr": 1}}, "train.lrr")):
        with pytest.raises(ConfigError, match=r"unknown key") as info:
            config_from_dict(raw)
        assert str(info.value).startswith(f"{key}:")


def test_bad_files(tmp_path: Path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [0.1\n")
    for path, words in (
        (listing, "mapping"),
        (tmp_path / "missing.yaml", "not found"),
        (broken, "not valid YAML"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and words in message, message
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config()


@pytest.mark.parametrize(
    "learner, budget, refused",
    [
        ("replay", "none", "learner replay needs exemplars"),
        ("finetune", "per_class", "learner finetune keeps no memory"),
        ("lwf", "none", None),  # LwF runs with distillation alone, or with replay
        ("lwf", "per_class", None),
        ("dgr", "total", None),
    ],
)
def test_memory_rules_come_from_the_learners_declarations(learner, budget, refused):
    cfg = RunConfig(learner=LearnerConfig(name=learner), memory=MemoryConfig(budget=budget))
    cfg.train.epochs, cfg.train.milestones, cfg.train.weight_decay = 1, [1], 0.0
    if refused is None:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=f"^memory.budget: {refused}"):
            validate(cfg)
