"""The shared floor: scoped environment, store paths and error lines, each with one definition."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pipeline.runtime import absolute_store_uri, error_line, exception_line, ray_task_device, scoped_env


def test_relative_stores_become_absolute_for_trials_that_run_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_store_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_store_uri("sqlite:///sub/m.db?timeout=5") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}?timeout=5"
    assert absolute_store_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_store_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_store_uri("mlruns") == str(tmp_path / "mlruns")  # a plain path is a file store
    assert absolute_store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_scoped_env_restores_what_was_there_and_lets_a_user_setting_win(monkeypatch):
    monkeypatch.setenv("IMBCIL_TEST_A", "user")
    monkeypatch.delenv("IMBCIL_TEST_B", raising=False)
    with scoped_env({"IMBCIL_TEST_A": "ours", "IMBCIL_TEST_B": "ours"}):
        assert (os.environ["IMBCIL_TEST_A"], os.environ["IMBCIL_TEST_B"]) == ("ours", "ours")
    assert os.environ["IMBCIL_TEST_A"] == "user" and "IMBCIL_TEST_B" not in os.environ
    with scoped_env({"IMBCIL_TEST_A": "ours", "IMBCIL_TEST_B": "ours"}, user_wins=True):
        assert (os.environ["IMBCIL_TEST_A"], os.environ["IMBCIL_TEST_B"]) == ("user", "ours")
    assert "IMBCIL_TEST_B" not in os.environ
    with pytest.raises(RuntimeError), scoped_env({"IMBCIL_TEST_B": "x"}):
        raise RuntimeError("restored on the way out too")
    assert "IMBCIL_TEST_B" not in os.environ


def test_error_line_takes_the_telling_line_of_a_traceback():
    traceback = "Traceback (most recent call last):\n  File 'x.py', line 1\n    boom()\nValueError: bad   value\n  (raised here)"
    assert error_line(traceback) == "ValueError: bad value"
    assert error_line("just a message\nand its last line") == "and its last line"
    assert error_line("") == ""
    long = "RuntimeError: " + "x" * 600
    assert len(error_line(long)) == 500 and error_line(long).endswith("...")
    assert exception_line(KeyError("k")) == "KeyError: 'k'" and exception_line(OSError()) == "OSError"


# ---------------------------------------------------------------------------------------------
# The decoded-data cache


def tiny_parquet(path, seed=0):
    """A CIFAR-10-shaped Parquet file of 30 JPEG images (2 train, 1 test per class)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(seed)
    splits, labels, blobs = [], [], []
    for split, per_class in (("train", 2), ("test", 1)):
        for label in range(10):
            for _ in range(per_class):
                image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
                splits.append(split)
                labels.append(label)
                blobs.append(encode_jpeg(image).numpy().tobytes())
    table = pa.table({"split": splits, "label": np.asarray(labels, dtype=np.int64), "jpeg": pa.array(blobs, pa.binary())})
    names = ",".join(f"class{c}" for c in range(10))
    pq.write_table(table.replace_schema_metadata({b"class_names": names.encode()}), path)
    return path


def cifar10_at(folder):
    from method.config import DataConfig

    return DataConfig(dataset="cifar10", root=str(folder), source="parquet")


def same_data(a, b):
    import numpy as np
    import torch

    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert np.array_equal(a.train_labels, b.train_labels) and np.array_equal(a.test_labels, b.test_labels)
    assert a.class_names == b.class_names


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from pipeline import runtime

    folder = tmp_path / "cache"
    monkeypatch.setenv(runtime.CACHE_ENV, str(folder))
    runtime.forget_decoded_data()
    yield folder
    runtime.forget_decoded_data()


def test_the_cache_gives_the_bytes_of_a_fresh_decode_and_is_read_back(tmp_path, cache, monkeypatch):
    import method.data
    from method.data import load_raw
    from pipeline import runtime

    tiny_parquet(tmp_path / "cifar10-jpeg.parquet")
    data = cifar10_at(tmp_path)
    fresh = load_raw(data)
    first = runtime.decoded_data(data)
    same_data(first, fresh)
    (entry,) = cache.iterdir()
    assert {p.name for p in entry.iterdir()} == {"train_images.npy", "test_images.npy", "train_labels.npy", "test_labels.npy", "meta.json"}
    # A new process (here: the in-process copy dropped) reads the entry instead of decoding.
    runtime.forget_decoded_data()
    monkeypatch.setattr(method.data, "load_raw", lambda data: pytest.fail("decoded again despite a valid cache"))
    same_data(runtime.decoded_data(data), fresh)


def test_the_cache_is_rebuilt_when_the_source_changes(tmp_path, cache):
    import os

    from method.data import load_raw
    from pipeline import runtime

    source = tiny_parquet(tmp_path / "cifar10-jpeg.parquet", seed=0)
    data = cifar10_at(tmp_path)
    before = runtime.decoded_data(data)
    tiny_parquet(source, seed=1)  # other images in the same file
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock could keep the time
    runtime.forget_decoded_data()
    after = runtime.decoded_data(data)
    same_data(after, load_raw(data))
    assert not torch_equal(after.train_images, before.train_images)
    assert len(list(cache.iterdir())) == 2  # the old entry no longer matches and is never read


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_two_processes_filling_the_cache_at_once_leave_one_valid_entry(tmp_path, cache):
    import subprocess
    import sys

    from method.data import load_raw
    from pipeline import runtime

    tiny_parquet(tmp_path / "cifar10-jpeg.parquet")
    data = cifar10_at(tmp_path)
    script = (
        "import sys; from method.config import DataConfig; from pipeline.runtime import decoded_data; "
        f"decoded_data(DataConfig(dataset='cifar10', root={str(tmp_path)!r}, source='parquet'))"
    )
    env = {**os.environ, runtime.CACHE_ENV: str(cache)}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    entries = list(cache.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no staging copy left behind
    runtime.forget_decoded_data()
    same_data(runtime.decoded_data(data), load_raw(data))


def test_no_cache_when_it_is_off_or_for_file_lists(tmp_path, monkeypatch):
    from method.config import DataConfig
    from method.data import source_files
    from pipeline import runtime

    tiny_parquet(tmp_path / "cifar10-jpeg.parquet")
    monkeypatch.setenv(runtime.CACHE_ENV, "off")
    runtime.forget_decoded_data()
    runtime.decoded_data(cifar10_at(tmp_path))
    runtime.forget_decoded_data()
    assert not (tmp_path / "cache").exists()
    assert source_files(DataConfig(dataset="food101", root=str(tmp_path))) == []  # decoded lazily, nothing to keep


@pytest.mark.parametrize("gpu_ids, expected", [([], "cpu"), ([0], "cuda")])
def test_a_ray_task_trains_on_a_gpu_only_when_ray_gave_it_one(monkeypatch, gpu_ids, expected):
    # Ray 2.60 leaves every card visible to a task given no GPU; torch would then say CUDA is there.
    import ray
    import torch

    import pipeline.reproduce as reproduce

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(gpu_ids))
    assert ray_task_device("auto").type == expected  # what a trial trains on
    seen = {}
    monkeypatch.setattr(reproduce, "run_seed", lambda job, *args, device=None: seen.setdefault("device", device))
    job = SimpleNamespace(cfg=SimpleNamespace(device="auto"))
    reproduce.run_seed_in_ray(job, "sqlite:///unused.db", "experiment", "parent")  # what a reproduction seed trains on
    assert seen["device"].type == expected
