"""The long-tailed class-incremental data protocol (method.md §1) on real and hand-written data.

CIFAR-10-LT is read from the shared offline Parquet file (the session fixture `cifar10_raw`).
CIFAR-100 and the CIFAR-10 python folder cannot be brought onto these machines, so the tests
write them in the real pickle format; their pixels encode the label and the original index, so
a test can tell exactly which source image ended up where. File-list datasets are written as
tiny PNG/JPEG files plus `train.txt` / `test.txt`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from method.batches import FileImages
from method.config import DataConfig, ProtocolConfig
from method.data import (
    CIFAR10_ORDER,
    CIFAR100_ORDER,
    NORMALIZATION,
    PARQUET_FILE,
    Benchmark,
    DataError,
    RawData,
    Split,
    build_benchmark,
    holdout_validation,
    load_raw,
    long_tail_counts,
    read_file_list,
    subsample_cifar,
    subsample_first_lines,
    task_split,
)

# int(5000 * 100 ** (-c / 9)) for c = 0..9, written out; 12,406 in all.
CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
# round_half_even(0.1 * n): 299.7 -> 300, 64.5 -> 64 (half to even), 5.0 -> 5.
CIFAR10_LT_VAL = [500, 300, 180, 108, 64, 39, 23, 14, 8, 5]
CIFAR10_LT_TRAIN = [4500, 2697, 1616, 969, 581, 348, 209, 125, 75, 45]

LFS5 = ProtocolConfig(first_task_classes=2, incremental_tasks=4)
LFH5_CIFAR10 = ProtocolConfig(first_task_classes=5, incremental_tasks=5)
LFS10 = ProtocolConfig(first_task_classes=10, incremental_tasks=9)


def counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def before_holdout(bench: Benchmark) -> np.ndarray:
    """Training images per class position before the validation hold-out."""
    return np.bincount(np.concatenate([bench.train.labels, bench.val.labels]), minlength=bench.num_classes)


def cifar10_config(**kw) -> DataConfig:
    return DataConfig(dataset="cifar10", **kw)


# ----------------------------------------------------------------------------- CIFAR-10-LT (Parquet)


def test_cifar10_raw_is_the_full_dataset(cifar10_raw: RawData):
    assert cifar10_raw.train_images.shape == (50000, 3, 32, 32)
    assert cifar10_raw.test_images.shape == (10000, 3, 32, 32)
    assert cifar10_raw.train_images.dtype == torch.uint8
    assert counts(cifar10_raw.train_labels, 10) == [5000] * 10
    assert counts(cifar10_raw.test_labels, 10) == [1000] * 10
    assert cifar10_raw.class_names[0] == "airplane" and cifar10_raw.class_names[9] == "truck"


def test_cifar10_lt_counts_before_and_after_holdout(cifar10_raw: RawData):
    bench = build_benchmark(cifar10_config(scenario="ordered"), LFS5, seed=0, raw=cifar10_raw)
    assert bench.class_order == list(range(10))
    assert before_holdout(bench).tolist() == CIFAR10_LT
    assert sum(CIFAR10_LT) == 12406 and len(bench.train) + len(bench.val) == 12406
    assert counts(bench.val.labels, 10) == CIFAR10_LT_VAL
    assert counts(bench.train.labels, 10) == CIFAR10_LT_TRAIN
    assert bench.train_counts.tolist() == CIFAR10_LT_TRAIN
    assert counts(bench.test.labels, 10) == [1000] * 10
    assert bench.image_size == 32
    assert (bench.mean, bench.std) == NORMALIZATION["cifar10"]
    assert bench.train.images.shape == (len(bench.train), 3, 32, 32)
    assert bench.val.images.shape == (len(bench.val), 3, 32, 32)


def _fingerprints(images: torch.Tensor) -> torch.Tensor:
    """A per-image integer hash of the first 256 bytes: enough to tell CIFAR images apart."""
    weights = torch.randint(1, 2**20, (256,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    return (images.reshape(len(images), -1)[:, :256].to(torch.int64) * weights).sum(1)


def test_cifar10_lt_shuffled_profile_follows_the_original_label(cifar10_raw: RawData):
    bench = build_benchmark(cifar10_config(scenario="shuffled"), LFS5, seed=0, raw=cifar10_raw)
    assert bench.class_order == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    # Position p holds original class order[p], which keeps CIFAR10_LT[order[p]] images.
    assert before_holdout(bench).tolist() == [CIFAR10_LT[c] for c in bench.class_order]
    assert bench.task_classes[0] == [0, 1]
    assert [bench.class_order[p] for p in bench.task_classes[0]] == [4, 2]
    assert bench.class_names[:2] == ["deer", "bird"]
    assert bench.train_counts[:2].tolist() == [581, 1616]
    # Every image sits under the position of its own original class.
    raw_fp = _fingerprints(cifar10_raw.train_images)
    for split in (bench.train, bench.val):
        fp = _fingerprints(split.images)
        for p in (0, 1, 9):
            original = bench.class_order[p]
            assert bool(torch.isin(fp[split.labels == p], raw_fp[cifar10_raw.train_labels == original]).all())
    test_fp = _fingerprints(bench.test.images[bench.test.labels == 0])
    assert bool(torch.isin(test_fp, _fingerprints(cifar10_raw.test_images[cifar10_raw.test_labels == 4])).all())


def test_cifar10_ordered_head_first_tail_last(cifar10_raw: RawData):
    bench = build_benchmark(cifar10_config(scenario="ordered"), LFS5, seed=0, raw=cifar10_raw)
    assert bench.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    first = [bench.class_order[p] for p in bench.task_classes[0]]
    last = [bench.class_order[p] for p in bench.task_classes[-1]]
    assert first == [0, 1] and last == [8, 9]
    per_task = [int(bench.train_counts[t].sum()) for t in bench.task_classes]
    assert per_task == [4500 + 2697, 1616 + 969, 581 + 348, 209 + 125, 75 + 45]
    assert per_task == sorted(per_task, reverse=True)


def test_cifar10_lfh5_split(cifar10_raw: RawData):
    bench = build_benchmark(cifar10_config(), LFH5_CIFAR10, seed=0, raw=cifar10_raw)
    assert bench.task_classes == [[0, 1, 2, 3, 4], [5], [6], [7], [8], [9]]
    assert bench.num_tasks == 6
    assert len(bench.task_indices(bench.test, [0])) == 5000
    assert len(bench.task_indices(bench.test, range(1, 3))) == 2000


def test_conventional_scenario_keeps_every_image(cifar10_raw: RawData):
    bench = build_benchmark(cifar10_config(scenario="conventional"), LFS5, seed=0, raw=cifar10_raw)
    assert bench.class_order == CIFAR10_ORDER
    assert before_holdout(bench).tolist() == [5000] * 10
    assert counts(bench.train.labels, 10) == [4500] * 10
    assert counts(bench.val.labels, 10) == [500] * 10


def test_train_and_test_fraction_shrink_every_class_to_at_least_one(cifar10_raw: RawData):
    data = cifar10_config(scenario="ordered", train_fraction=0.01, test_fraction=0.0001)
    bench = build_benchmark(data, LFS5, seed=0, raw=cifar10_raw)
    # max(1, int(0.01 * n)) of the LT counts: 29.97 -> 29, 0.83 -> 1, 0.5 -> 1.
    assert before_holdout(bench).tolist() == [50, 29, 17, 10, 6, 3, 2, 1, 1, 1]
    # Then the hold-out: round(5.0)=5, round(2.9)=3, round(1.7)=2, 1, round(0.6)=1, 0, ...
    assert counts(bench.val.labels, 10) == [5, 3, 2, 1, 1, 0, 0, 0, 0, 0]
    assert counts(bench.test.labels, 10) == [1] * 10


# ----------------------------------------------------------------------------- determinism


def test_subsample_cifar_is_seeded_by_subset_seed(cifar10_raw: RawData):
    labels = cifar10_raw.train_labels
    profile = np.array(CIFAR10_LT)
    a = subsample_cifar(labels, profile, 0)
    b = subsample_cifar(labels, profile, 0)
    c = subsample_cifar(labels, profile, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for kept in (a, c):
        assert np.all(np.diff(kept) > 0)  # sorted, no repeats
        assert counts(labels[kept], 10) == CIFAR10_LT


def test_subsample_cifar_is_one_stream_over_classes_in_label_order():
    # Two classes of 4 images, interleaved. One RandomState: class 0's shuffle draws first, then
    # class 1's from the same stream (not a fresh RandomState per class).
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    rng = np.random.RandomState(7)
    first = np.array([0, 2, 4, 6])
    rng.shuffle(first)
    second = np.array([1, 3, 5, 7])
    rng.shuffle(second)
    expected = np.sort(np.concatenate([first[:3], second[:2]]))
    np.testing.assert_array_equal(subsample_cifar(labels, np.array([3, 2]), 7), expected)


def test_holdout_rounds_half_to_even():
    # n = 5 -> round(0.5) = 0 (all kept); 25 -> round(2.5) = 2; 45 -> round(4.5) = 4; 15 -> 2.
    labels = np.repeat(np.arange(4), [5, 25, 45, 15])
    held = holdout_validation(labels, [[0, 1], [2, 3]], 0.1, seed=0)
    assert counts(labels[held], 4) == [0, 2, 4, 2]
    np.testing.assert_array_equal(held, holdout_validation(labels, [[0, 1], [2, 3]], 0.1, seed=0))
    assert not np.array_equal(held, holdout_validation(labels, [[0, 1], [2, 3]], 0.1, seed=1))
    assert not holdout_validation(labels, [[0, 1], [2, 3]], 0.0, seed=0).any()


# ----------------------------------------------------------------------------- CIFAR-100 (pickle folder)


def _write_pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _encoded_images(labels: np.ndarray) -> np.ndarray:
    """N x 3072 uint8 rows: R(0,0) = label, G(0,0) = index // 256, B(0,0) = index % 256."""
    rows = np.zeros((len(labels), 3072), dtype=np.uint8)
    index = np.arange(len(labels))
    rows[:, 0] = labels
    rows[:, 1024] = index // 256
    rows[:, 2048] = index % 256
    return rows


def _decode_index(images: torch.Tensor) -> np.ndarray:
    return (images[:, 1, 0, 0].to(torch.int64) * 256 + images[:, 2, 0, 0].to(torch.int64)).numpy()


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    """A real-format `cifar-100-python` folder: 500 train / 100 test images per class."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    train_labels = np.repeat(np.arange(100), 500)
    np.random.RandomState(5).shuffle(train_labels)  # classes interleaved, as in the real file
    test_labels = np.repeat(np.arange(100), 100)
    _write_pickle(folder / "train", {b"data": _encoded_images(train_labels), b"fine_labels": train_labels.tolist()})
    _write_pickle(folder / "test", {b"data": _encoded_images(test_labels), b"fine_labels": test_labels.tolist()})
    _write_pickle(folder / "meta", {b"fine_label_names": [f"class{c}".encode() for c in range(100)]})
    return root


@pytest.fixture(scope="module")
def cifar100_raw(cifar100_root: Path) -> RawData:
    return load_raw(DataConfig(dataset="cifar100", root=str(cifar100_root)))


def test_cifar100_folder_reads_real_format(cifar100_raw: RawData):
    assert cifar100_raw.train_images.shape == (50000, 3, 32, 32)
    assert cifar100_raw.test_images.shape == (10000, 3, 32, 32)
    assert cifar100_raw.class_names[:2] == ["class0", "class1"]
    # Row layout is R plane, G plane, B plane: channel 0 pixel (0, 0) is the label.
    np.testing.assert_array_equal(cifar100_raw.train_images[:, 0, 0, 0].numpy(), cifar100_raw.train_labels)
    np.testing.assert_array_equal(_decode_index(cifar100_raw.train_images), np.arange(50000))


def test_cifar100_lt_counts(cifar100_raw: RawData):
    bench = build_benchmark(DataConfig(dataset="cifar100", scenario="ordered"), LFS10, seed=0, raw=cifar100_raw)
    kept = before_holdout(bench)
    assert kept[0] == 500 and kept[1] == 477 and kept[99] == 5
    assert kept.tolist() == [int(500 * 100 ** (-c / 99)) for c in range(100)]
    assert kept.sum() == 10847
    # Class 99 has n = 5: k = round(0.5) = 0, it keeps all of them.
    assert bench.train_counts[99] == 5 and counts(bench.val.labels, 100)[99] == 0
    assert bench.train_counts[0] == 450
    assert counts(bench.test.labels, 100) == [100] * 100
    assert (bench.mean, bench.std) == NORMALIZATION["cifar100"]


def test_cifar100_shuffled_order_and_images_follow_labels(cifar100_raw: RawData):
    bench = build_benchmark(DataConfig(dataset="cifar100"), LFS10, seed=0, raw=cifar100_raw)
    assert bench.class_order[:4] == [68, 56, 78, 8]
    assert bench.class_order == CIFAR100_ORDER and sorted(bench.class_order) == list(range(100))
    assert bench.class_names[0] == "class68"
    assert [bench.class_order[p] for p in bench.task_classes[0]] == CIFAR100_ORDER[:10]
    # The LT profile follows the original label: position p keeps int(500 * 100^(-order[p]/99)).
    assert before_holdout(bench).tolist() == [int(500 * 100 ** (-c / 99)) for c in CIFAR100_ORDER]
    order = np.array(bench.class_order)
    for split in (bench.train, bench.val, bench.test):
        np.testing.assert_array_equal(split.images[:, 0, 0, 0].numpy(), order[split.labels])


def test_run_seed_changes_only_the_holdout(cifar100_raw: RawData):
    data = DataConfig(dataset="cifar100")
    a = build_benchmark(data, LFS10, seed=0, raw=cifar100_raw)
    a2 = build_benchmark(data, LFS10, seed=0, raw=cifar100_raw)
    b = build_benchmark(data, LFS10, seed=1, raw=cifar100_raw)
    other_subset = build_benchmark(DataConfig(dataset="cifar100", subset_seed=1), LFS10, seed=0, raw=cifar100_raw)

    def pool(bench):
        return np.sort(np.concatenate([_decode_index(bench.train.images), _decode_index(bench.val.images)]))

    # The LT subset is exactly subsample_cifar with the subset seed, whatever the run seed.
    profile = np.array([int(500 * 100 ** (-c / 99)) for c in range(100)])
    expected = subsample_cifar(cifar100_raw.train_labels, profile, 0)
    np.testing.assert_array_equal(pool(a), expected)
    np.testing.assert_array_equal(pool(b), expected)
    assert not np.array_equal(pool(other_subset), expected)
    # Same seed, same hold-out; another run seed, another hold-out of the same sizes.
    np.testing.assert_array_equal(_decode_index(a.val.images), _decode_index(a2.val.images))
    assert not np.array_equal(np.sort(_decode_index(a.val.images)), np.sort(_decode_index(b.val.images)))
    assert counts(a.val.labels, 100) == counts(b.val.labels, 100)
    assert a.class_order == b.class_order == other_subset.class_order


@pytest.mark.parametrize(
    "first, incremental, sizes",
    [
        (10, 9, [10] * 10),  # LFS-10
        (5, 19, [5] * 20),  # LFS-20
        (50, 5, [50] + [10] * 5),  # LFH-5
        (50, 10, [50] + [5] * 10),  # LFH-10
    ],
)
def test_cifar100_task_splits(first, incremental, sizes):
    tasks = task_split(100, ProtocolConfig(first_task_classes=first, incremental_tasks=incremental))
    assert [len(t) for t in tasks] == sizes
    flat = [c for t in tasks for c in t]
    assert sorted(flat) == list(range(100)) and len(set(flat)) == 100
    assert flat == list(range(100))  # contiguous ranges of positions


def test_cifar10_task_splits():
    assert task_split(10, LFS5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert task_split(10, LFH5_CIFAR10) == [[0, 1, 2, 3, 4], [5], [6], [7], [8], [9]]


# ----------------------------------------------------------------------------- CIFAR-10 (pickle folder)


@pytest.fixture
def cifar10_folder_root(tmp_path: Path) -> Path:
    """A real-format `cifar-10-batches-py`: 5 batches of 200 (100 per class), 10 test per class."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    labels = np.repeat(np.arange(10), 100)
    np.random.RandomState(3).shuffle(labels)
    rows = _encoded_images(labels)
    for i in range(5):
        part = slice(200 * i, 200 * (i + 1))
        _write_pickle(folder / f"data_batch_{i + 1}", {b"data": rows[part], b"labels": labels[part].tolist(), b"batch_label": b"x"})
    test_labels = np.repeat(np.arange(10), 10)
    _write_pickle(folder / "test_batch", {b"data": _encoded_images(test_labels), b"labels": test_labels.tolist()})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 200})
    return tmp_path


def test_cifar10_folder_source(cifar10_folder_root: Path):
    for source in ("folder", "auto"):  # auto falls back to the folder where no Parquet file is
        raw = load_raw(cifar10_config(root=str(cifar10_folder_root), source=source))
        assert raw.train_images.shape == (1000, 3, 32, 32) and raw.test_images.shape == (100, 3, 32, 32)
        np.testing.assert_array_equal(_decode_index(raw.train_images), np.arange(1000))  # batches in order
        np.testing.assert_array_equal(raw.train_images[:, 0, 0, 0].numpy(), raw.train_labels)
        assert raw.class_names[4] == "deer"
    data = cifar10_config(root=str(cifar10_folder_root), source="folder", scenario="ordered")
    bench = build_benchmark(data, LFS5, seed=0)
    # int(100 * 100^(-c/9)): 59.9 -> 59, 35.9 -> 35, ..., 1.29 -> 1.
    assert before_holdout(bench).tolist() == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert counts(bench.val.labels, 10) == [10, 6, 4, 2, 1, 1, 0, 0, 0, 0]
    assert counts(bench.test.labels, 10) == [10] * 10


# ----------------------------------------------------------------------------- missing / corrupt data


def test_missing_parquet_names_the_path_and_the_settings(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_raw(cifar10_config(root=str(tmp_path), source="parquet"))
    message = str(info.value)
    assert str(tmp_path / PARQUET_FILE) in message
    assert "--data-root" in message and "IMBCIL_DATA" in message


def test_empty_root_for_cifar10_auto_names_both_places(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_raw(cifar10_config(root=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / PARQUET_FILE) in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--data-root" in message and "IMBCIL_DATA" in message


def test_corrupt_parquet_names_the_file(tmp_path: Path):
    path = tmp_path / PARQUET_FILE
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    for data in (cifar10_config(root=str(tmp_path)), cifar10_config(root=str(path), source="parquet")):
        with pytest.raises(DataError, match="unreadable") as info:
            load_raw(data)
        assert str(path) in str(info.value)


def test_missing_cifar100_folder(tmp_path: Path):
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(dataset="cifar100", root=str(tmp_path)))
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "IMBCIL_DATA" in message


def test_corrupt_or_incomplete_cifar_folder(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert str(folder / "train") in str(info.value)
    _write_pickle(folder / "train", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataError) as info:
        load_raw(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert str(folder / "test") in str(info.value)  # names the missing file


def test_no_root_at_all():
    for dataset in ("cifar10", "cifar100", "imagenet_subset"):
        with pytest.raises(DataError) as info:
            load_raw(DataConfig(dataset=dataset, root=None))
        assert "--data-root" in str(info.value) and "IMBCIL_DATA" in str(info.value)


def test_wrong_number_of_classes_is_refused(cifar10_raw: RawData):
    with pytest.raises(DataError, match="100 classes"):
        build_benchmark(DataConfig(dataset="cifar100"), LFS10, seed=0, raw=cifar10_raw)


# ----------------------------------------------------------------------------- file-list datasets


COLOURS = {0: (200, 30, 30), 1: (30, 200, 30), 2: (30, 30, 200)}


@pytest.fixture
def file_list_root(tmp_path: Path) -> Path:
    """12 solid-colour 40x40 images (PNG and JPEG) over 3 classes, listed in train.txt / test.txt."""
    from PIL import Image

    lines = []
    for i in range(12):
        c = i % 3
        ext = "png" if i % 2 == 0 else "jpg"
        rel = Path("images") / f"class{c}" / f"{i}.{ext}"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), COLOURS[c]).save(tmp_path / rel)
        lines.append(f"{rel} {c}")
    (tmp_path / "train.txt").write_text("\n".join(lines[:9]) + "\n\n")  # a trailing blank line is skipped
    (tmp_path / "test.txt").write_text("\n".join(lines[9:]) + "\n")
    return tmp_path


def test_read_file_list_resolves_relative_paths(file_list_root: Path, tmp_path: Path):
    paths, labels = read_file_list(file_list_root / "train.txt", file_list_root)
    assert labels.tolist() == [0, 1, 2] * 3 and labels.dtype == np.int64
    assert paths[0] == str(file_list_root / "images" / "class0" / "0.png")
    assert all(Path(p).is_file() for p in paths)
    # Absolute paths stay as they are; a path may contain spaces (the label is the last field).
    listing = tmp_path / "abs.txt"
    listing.write_text(f"{paths[0]} 0\nsome dir/an image.jpg 2\n")
    abs_paths, abs_labels = read_file_list(listing, Path("/elsewhere"))
    assert abs_paths == [paths[0], "/elsewhere/some dir/an image.jpg"] and abs_labels.tolist() == [0, 2]


def test_read_file_list_bad_line_names_file_and_line(tmp_path: Path):
    listing = tmp_path / "train.txt"
    listing.write_text("a.jpg 0\nb.jpg 1\nc.jpg cat\n")
    with pytest.raises(DataError) as info:
        read_file_list(listing, tmp_path)
    assert f"{listing}:3" in str(info.value)
    listing.write_text("a.jpg 0\nlonely\n")
    with pytest.raises(DataError, match=r"train\.txt:2"):
        read_file_list(listing, tmp_path)
    with pytest.raises(DataError, match="file list not found"):
        read_file_list(tmp_path / "missing.txt", tmp_path)


def test_load_raw_file_lists(file_list_root: Path):
    raw = load_raw(DataConfig(dataset="imagenet_subset", root=str(file_list_root)))
    assert raw.train_images is None and len(raw.train_paths) == 9 and len(raw.test_paths) == 3
    assert raw.class_names == ["0", "1", "2"]
    assert raw.test_labels.tolist() == [0, 1, 2]


def test_subsample_first_lines_keeps_the_first_lines():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 0])
    # class 0 sits on lines 0, 2, 5, 7 -> first 3: 0, 2, 5; class 1: 1; class 2: 3.
    assert subsample_first_lines(labels, np.array([3, 1, 1])).tolist() == [0, 1, 2, 3, 5]
    assert subsample_first_lines(labels, np.array([0, 5, 0])).tolist() == [1, 4]


def test_long_tail_counts_by_hand():
    # exp: int(30 * 8^(-c/3)) = 30, 15, 7.5 -> 7, 3.75 -> 3.
    assert long_tail_counts(30, 4, "exp", 8.0).tolist() == [30, 15, 7, 3]
    assert long_tail_counts(40, 5, "exp", 16.0).tolist() == [40, 20, 10, 5, 2]
    exp100 = long_tail_counts(500, 100, "exp", 100.0)
    assert (exp100[0], exp100[1], exp100[99], exp100.sum()) == (500, 477, 5, 10847)
    # step: the first half keeps all, the rest n_max / rho.
    assert long_tail_counts(500, 10, "step", 10.0).tolist() == [500] * 5 + [50] * 5
    assert long_tail_counts(500, 5, "step", 100.0).tolist() == [500, 500, 5, 5, 5]
    assert long_tail_counts(7, 3, "none", 100.0).tolist() == [7, 7, 7]
    assert long_tail_counts(30, 4, "exp", 1.0).tolist() == [30] * 4


@pytest.fixture
def imagenet_list_root(tmp_path: Path) -> Path:
    """100 classes as train.txt/test.txt lines (lazy: the image files need not exist to build).

    Class 0 has 100 lines, every other class 120, interleaved class by class, so that the profile
    must come from the first class's count and "first lines" is about file order.
    """
    lines = []
    for i in range(120):
        for c in range(100):
            if c == 0 and i >= 100:
                continue
            lines.append(f"train/n{c:03d}/{i:03d}.JPEG {c}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(f"val/n{c:03d}/{i}.JPEG {c}" for c in range(100) for i in range(2)))
    return tmp_path


def test_imagenet_subset_profile_keeps_first_lines(imagenet_list_root: Path):
    data = DataConfig(dataset="imagenet_subset", root=str(imagenet_list_root), scenario="ordered")
    bench = build_benchmark(data, LFS10, seed=0)
    expected = [int(100 * 100 ** (-c / 99)) for c in range(100)]
    assert expected[0] == 100 and expected[99] == 1
    assert before_holdout(bench).tolist() == expected
    assert bench.class_order == list(range(100)) and bench.image_size == 224 and bench.resize is None
    for c in (0, 1, 50, 99):
        kept = sorted(p for split in (bench.train, bench.val) for p, y in zip(split.paths, split.labels) if y == c)
        assert kept == [str(imagenet_list_root / f"train/n{c:03d}/{i:03d}.JPEG") for i in range(expected[c])]
    assert counts(bench.test.labels, 100) == [2] * 100

    # shuffled: the same profile, dealt over the classes by the run seed; the order stays 0..99.
    shuffled = [
        build_benchmark(DataConfig(dataset="imagenet_subset", root=str(imagenet_list_root)), LFS10, seed=s)
        for s in (0, 0, 1)
    ]
    kept = [before_holdout(b) for b in shuffled]
    assert all(b.class_order == list(range(100)) for b in shuffled)
    assert all(sorted(k.tolist()) == sorted(expected) for k in kept)
    np.testing.assert_array_equal(kept[0], kept[1])
    assert not np.array_equal(kept[0], kept[2]) and kept[0].tolist() != expected


def _file_benchmark(root: Path, resize=None) -> Benchmark:
    paths, labels = read_file_list(root / "train.txt", root)
    empty = Split(labels=np.zeros(0, dtype=np.int64), paths=[])
    return Benchmark(
        dataset="imagenet_subset",
        image_size=224,
        mean=NORMALIZATION["imagenet_subset"][0],
        std=NORMALIZATION["imagenet_subset"][1],
        class_order=[0, 1, 2],
        class_names=["0", "1", "2"],
        task_classes=[[0, 1], [2]],
        train=Split(labels=labels, paths=paths),
        val=empty,
        test=empty,
        resize=resize,
    )


def test_file_images_decode_lazily_to_224(file_list_root: Path):
    bench = _file_benchmark(file_list_root)
    assert bench.train_counts.tolist() == [3, 3, 3]
    source = FileImages(bench.train, bench, torch.device("cpu"), num_workers=0)
    mean = torch.tensor(bench.mean).view(3, 1, 1)
    std = torch.tensor(bench.std).view(3, 1, 1)

    batches = list(source.eval_batches(torch.arange(9), batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 224, 224), (4, 3, 224, 224), (1, 3, 224, 224)]
    assert all(x.dtype == torch.float32 for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert y.tolist() == bench.train.labels.tolist()
    # No resize: the centre crop of a 40x40 image pads with black; the centre is the image's colour.
    for i in range(9):
        colour = torch.tensor(COLOURS[int(y[i])], dtype=torch.float32).view(3, 1, 1) / 255
        assert torch.allclose(x[i, :, 112:113, 112:113], (colour - mean) / std, atol=0.08)
        assert torch.allclose(x[i, :, :1, :1], (0 - mean) / std, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    train = list(source.train_batches(torch.arange(9), batch_size=5, generator=g))
    assert [tuple(x.shape) for x, _ in train] == [(5, 3, 224, 224), (4, 3, 224, 224)]
    assert sorted(torch.cat([b[1] for b in train]).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # Food-101 style: resize to 224 first, so even the corner is the image's colour.
    resized = _file_benchmark(file_list_root, resize=224)
    x, y = next(FileImages(resized.train, resized, torch.device("cpu"), num_workers=0).eval_batches(torch.tensor([2]), 1))
    colour = torch.tensor(COLOURS[2], dtype=torch.float32).view(3, 1, 1) / 255
    assert y.tolist() == [2] and torch.allclose(x[0, :, :1, :1], (colour - mean) / std, atol=0.08)
