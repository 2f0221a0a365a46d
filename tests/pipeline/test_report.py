"""The reproduction report and its results table, by hand: a pure function of results.parquet."""

from __future__ import annotations

import math
import statistics

import pytest

from method.config import RunConfig, resolve_dataset_defaults
from pipeline import report


def c100_config(name, learner, epochs=None, two_stage="none"):
    cfg = RunConfig()  # the paper's defaults: CIFAR-100-LT shuffled LFS-10
    cfg.name, cfg.learner.name, cfg.learner.two_stage = name, learner, two_stage
    cfg.train.epochs = epochs
    return resolve_dataset_defaults(cfg)


def hand_results(finals: dict[str, dict[int, float]]) -> list[report.SeedResult]:
    """Ten phases per run; the final avg incremental accuracy is the given value."""
    results = []
    for name, by_seed in finals.items():
        for seed, aia in by_seed.items():
            phases = [
                {"acc": 60.0 - 3 * p, "avg_incremental_acc": aia + 9 - p, "forgetting": float(p)} for p in range(9)
            ] + [{"acc": 30.0 + seed, "avg_incremental_acc": aia, "forgetting": 12.0 + seed}]
            results.append(report.SeedResult(name, name, seed, f"run-{name}-{seed}", phases))
    return results


def test_cifar100_report_compares_with_the_paper(tmp_path):
    configs = [
        ("dgr", c100_config("dgr", "dgr"), None),
        ("replay", c100_config("replay", "replay"), None),
        ("lucir", c100_config("lucir", "lucir", two_stage="lws"), None),
    ]
    meta = report.build_metadata("c100", configs, [0, 1], experiment="reproduce/c100", parent_run_id="p1", wall_seconds=125.0)
    assert (meta["dataset"], meta["scenario"], meta["protocol"], meta["paper_protocol"]) == ("cifar100", "shuffled", "LFS-10", "LFS-10")
    finals = {"dgr": {0: 36.0, 1: 34.0}, "replay": {0: 30.0, 1: 31.0}, "lucir": {0: 32.0, 1: 32.0}}
    table = report.build_table(hand_results(finals), meta)
    report.write_table(table, tmp_path)
    text = report.write_report(tmp_path).read_text()

    # mean 35, sample std sqrt(2); the paper: DGR 35.66, best other EEIL-2stage 33.64
    assert "| dgr | dgr | 2 | 35.00 ± 1.41 | 30.50 ± 0.71 | 12.50 ± 0.71 |" in text
    assert "| replay | replay | 2 | 30.50 ± 0.71 |" in text
    assert "CIFAR100-LT shuffled LFS-10: DGR (Ours) **35.66%**" in text
    assert "EEIL-2stage with **33.64%**" in text
    # Each config beside its own row of the paper, where it has one: LUCIR-2stage 31.09, 32 - 31.09.
    assert "| dgr | dgr | 35.00 ± 1.41 | DGR (Ours) 35.66 (-0.66) | -0.66 | +1.36 |" in text
    assert "| replay | replay | 30.50 ± 0.71 | - | -5.16 | -3.14 |" in text
    assert "| lucir | lucir (lws 2-stage) | 32.00 ± 0.00 | LUCIR-2stage 31.09 (+0.91) | -3.66 | -1.64 |" in text
    assert "Same protocol and budget as the paper" in text
    assert "no paper number exists" not in text
    assert "| wall time | 2 min 5 s |" in text
    # pure: the same table renders the same text
    assert report.render_report(*report.read_table(tmp_path)) == text


def test_reduced_budget_says_it_is_not_comparable(tmp_path):
    configs = [("dgr", c100_config("dgr", "dgr", epochs=4), None)]
    meta = report.build_metadata("short", configs, [0])
    text = report.render_report(report.build_table(hand_results({"dgr": {0: 20.0}}), meta), meta)
    assert "| dgr | dgr | 1 | 20.00 ± 0.00 |" in text
    assert "Not comparable as is" in text and "4 epochs per task (the paper: 160)" in text


def test_cifar10_report_has_no_paper_number():
    cfg = RunConfig()
    cfg.data.dataset = "cifar10"
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    meta = report.build_metadata("c10", [("dgr", resolve_dataset_defaults(cfg), None)], [0])
    results = [report.SeedResult("dgr", "dgr", 0, "r", [{"acc": 50.0, "avg_incremental_acc": 55.0, "forgetting": 3.0}] * 5)]
    text = report.render_report(report.build_table(results, meta), meta)
    assert "For CIFAR-10-LT shuffled LFS-5, no paper number exists for this setting" in text
    assert "DGR (Ours) **" not in text


def test_one_seed_has_zero_std():
    assert report.mean_std([42.0]) == (42.0, 0.0)
    mean, std = report.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert all(math.isnan(v) for v in report.mean_std([]))


def test_a_config_from_an_export_reports_its_selection_metric(tmp_path):
    from pipeline.config import save_config
    from pipeline.export import Selection

    cfg = c100_config("dgr", "dgr")
    exported = tmp_path / "best.yaml"
    header = "Exported by imbcil export\n" + Selection("c100-sweep", "t7", "val_avg_incremental_acc", 41.25).line() + "; max is best"
    save_config(cfg, exported, header=header)
    plain = tmp_path / "replay.yaml"
    save_config(c100_config("replay", "replay"), plain)
    configs = [("dgr", cfg, str(exported)), ("replay", c100_config("replay", "replay"), str(plain))]
    meta = report.build_metadata("c100", configs, [0])
    assert meta["configs"][0]["selection"]["metric"] == "val_avg_incremental_acc" and meta["configs"][1]["selection"] is None
    text = report.render_report(report.build_table(hand_results({"dgr": {0: 36.0}, "replay": {0: 30.0}}), meta), meta)
    assert "Every accuracy below is measured on the test set, as in the paper." in text
    assert (
        "- dgr: chosen by `imbcil export` from sweep c100-sweep (trial t7) on val_avg_incremental_acc, "
        "held-out validation data, final 41.25." in text
    )
    assert "- replay:" not in text and "biased upwards" not in text
    # A config selected on the test set says what that does to the numbers.
    save_config(cfg, exported, header=Selection("s", "t1", "avg_incremental_acc", 40.0).line())
    meta = report.build_metadata("c100", [("dgr", cfg, str(exported))], [0])
    text = report.render_report(report.build_table(hand_results({"dgr": {0: 36.0}}), meta), meta)
    assert "on avg_incremental_acc, test data, final 40.00 (selected on the test set" in text
