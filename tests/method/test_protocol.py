"""Facts about a run config that every verb names it by."""

from method.config import RunConfig, protocol_name


def test_protocol_names():
    cfg = RunConfig()
    assert protocol_name(cfg) == "LFS-10"  # CIFAR-100 10 + 9x10
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 50, 5
    assert protocol_name(cfg) == "LFH-5"
    cfg.data.dataset = "cifar10"
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    assert protocol_name(cfg) == "LFS-5"
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 5, 5
    assert protocol_name(cfg) == "LFH-5"
    cfg.data.dataset = "food101"  # 101 classes: the left-over class goes to the first task
    for first, tasks, name in [(11, 9, "LFS-10"), (6, 19, "LFS-20"), (51, 5, "LFH-5"), (51, 10, "LFH-10")]:
        cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = first, tasks
        assert protocol_name(cfg) == name, (first, tasks)
