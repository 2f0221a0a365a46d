"""Datasets and the long-tailed class-incremental protocol (method.md §1).

`build_benchmark(cfg.data, cfg.protocol, seed)` reads a dataset, applies the long-tail profile,
the class order of the scenario, the task split and the per-class validation hold-out, and
returns a `Benchmark` whose labels are positions in the class order (task u owns a contiguous
range of positions). 32x32 datasets are held as one uint8 tensor; file-list datasets keep paths
and decode lazily.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from method.config import DATASET_FACTS, DataConfig, ProtocolConfig

PARQUET_FILE = "cifar10-jpeg.parquet"
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

# The iCaRL class order (numpy seed 1993) used by the shuffled CIFAR-100 scenario.
CIFAR100_ORDER = [
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
    19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31,
    54, 37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94,
    11, 12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
]  # fmt: skip
# numpy RandomState(1993).permutation(10)
CIFAR10_ORDER = [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)),
    "imagenet_subset": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "food101": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Datasets whose training list is used as it is (the authors' code expects it long-tailed
# already, or balanced for conventional CIL), with a seeded class order and a 224 resize first.
AS_LISTED = ("food101", "imagenet")


class DataError(RuntimeError):
    """A dataset that cannot be found or read; the message says where we looked and what to do."""


@dataclass
class Split:
    """A labelled set of images: a uint8 tensor (N, 3, H, W) or a list of file paths."""

    labels: np.ndarray  # (N,) int64 class positions
    images: Optional[torch.Tensor] = None
    paths: Optional[list[str]] = None
    # (N,) each image's position in the dataset's own train or test array: what shows that
    # validation, training and test images never overlap.
    origin: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            labels=self.labels[indices],
            images=None if self.images is None else self.images[torch.from_numpy(indices)],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            origin=None if self.origin is None else self.origin[indices],
        )


@dataclass
class Benchmark:
    dataset: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_order: list[int]  # position -> original label
    class_names: list[str]  # by position
    task_classes: list[list[int]]  # positions per task
    train: Split  # after the LT profile and the validation hold-out
    val: Split
    test: Split
    resize: Optional[int] = None  # file lists: resize before cropping (Food-101)
    train_counts: np.ndarray = field(init=False)  # orig(c): training images per class position

    def __post_init__(self) -> None:
        self.train_counts = np.bincount(self.train.labels, minlength=self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    def task_indices(self, split: Split, tasks: range | list[int]) -> np.ndarray:
        """Indices of `split`'s images whose class belongs to any of `tasks`."""
        classes = [c for u in tasks for c in self.task_classes[u]]
        return np.flatnonzero(np.isin(split.labels, classes))

    def describe(self) -> str:
        """Per-task image counts, as a user reads them."""
        lines = [f"{self.dataset}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test images"]
        for u, classes in enumerate(self.task_classes):
            counts = [int(self.train_counts[c]) for c in classes]
            originals = [self.class_order[c] for c in classes]
            lines.append(f"  task {u}: classes {originals} train {counts} = {sum(counts)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- raw sources


@dataclass
class RawData:
    train_labels: np.ndarray  # original labels
    test_labels: np.ndarray
    class_names: list[str]
    train_images: Optional[torch.Tensor] = None  # uint8 (N, 3, H, W)
    test_images: Optional[torch.Tensor] = None
    train_paths: Optional[list[str]] = None
    test_paths: Optional[list[str]] = None


def resolve_source(data: DataConfig) -> str:
    if data.source != "auto":
        return data.source
    if data.dataset == "cifar10":
        root = Path(data.root) if data.root else None
        if root is not None and (root / PARQUET_FILE).is_file() or (root and root.name == PARQUET_FILE):
            return "parquet"
        return "folder"
    if data.dataset == "cifar100":
        return "folder"
    return "filelist"


def source_files(data: DataConfig) -> list[Path]:
    """The files `load_raw` decodes images from (for a cache to check against); [] for file lists."""
    if not data.root:
        return []
    root = Path(data.root).expanduser()
    source = resolve_source(data)
    if source == "parquet":
        return [root if root.suffix == ".parquet" else root / PARQUET_FILE]
    if source == "folder":
        folder = root / CIFAR_FOLDERS[data.dataset]
        return sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []
    return []


def no_data_root(dataset: str) -> str:
    """What to say when a config names no data root, wherever that is found out."""
    return f"no data root for {dataset}: pass --data-root DIR or set IMBCIL_DATA (the offline CIFAR-10 lives in shared/data/{PARQUET_FILE})"


def load_raw(data: DataConfig) -> RawData:
    if not data.root:
        raise DataError(no_data_root(data.dataset))
    root = Path(data.root).expanduser()
    source = resolve_source(data)
    if source == "parquet":
        return _read_cifar10_parquet(root if root.suffix == ".parquet" else root / PARQUET_FILE)
    if source == "folder":
        folder = root / CIFAR_FOLDERS[data.dataset]
        if not folder.is_dir() and data.download:
            _download_cifar(data.dataset, root)
        if not folder.is_dir() and data.dataset == "cifar10" and data.source == "auto":
            # auto looked for the offline Parquet file first: name both places, not just the folder.
            raise DataError(
                f"CIFAR-10 not found: neither {root / PARQUET_FILE} nor {folder} exists; point "
                f"--data-root / IMBCIL_DATA at the folder holding {PARQUET_FILE} (or cifar-10-batches-py)"
            )
        return _read_cifar_folder(data.dataset, folder)
    return _read_file_lists(root)


_DECODE_CHUNK = 4096


def _read_cifar10_parquet(path: Path) -> RawData:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchvision.io import decode_jpeg

    if not path.is_file():
        raise DataError(
            f"CIFAR-10 Parquet file not found at {path}: point --data-root / IMBCIL_DATA at the folder "
            f"holding {PARQUET_FILE}, or use a cifar-10-batches-py folder (data.source=folder)"
        )
    try:
        table = pq.read_table(path, columns=["split", "label", "jpeg"])
        names = table.schema.metadata.get(b"class_names", b"").decode().split(",")
        split = np.asarray(table.column("split").to_pylist())
        labels = table.column("label").to_numpy().astype(np.int64)
        train, test = split == "train", split == "test"
        # Train rows first, then test rows, decoded chunk by chunk straight into one tensor: the
        # two splits are views of it, and the peak stays near the decoded size (184 MB), where a
        # list of 60k decoded images, a stack and two masked copies held about five times that.
        order = np.concatenate([np.flatnonzero(train), np.flatnonzero(test)])
        jpegs = table.column("jpeg").take(order)
        images = torch.empty((len(order), 3, 32, 32), dtype=torch.uint8)
        for start in range(0, len(order), _DECODE_CHUNK):
            chunk = jpegs.slice(start, _DECODE_CHUNK).to_pylist()
            blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in chunk]
            torch.stack(decode_jpeg(blobs), out=images[start:start + len(chunk)])
    except Exception as exc:  # a truncated or foreign file: say which file, not the library's trace
        raise DataError(f"CIFAR-10 Parquet file {path} is unreadable ({type(exc).__name__}: {exc})") from None
    del table, jpegs
    pa.default_memory_pool().release_unused()  # the JPEG bytes are not needed again
    if len(names) != 10:
        raise DataError(f"CIFAR-10 Parquet file {path} does not hold 32x32 RGB CIFAR-10 images")
    n_train = int(train.sum())
    return RawData(
        train_labels=labels[train],
        test_labels=labels[test],
        class_names=names,
        train_images=images[:n_train],
        test_images=images[n_train:],
    )


def _download_cifar(dataset: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:
        raise DataError(f"could not download {dataset} into {root}: {exc}") from None


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        with path.open("rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__})") from None


def _read_cifar_folder(dataset: str, folder: Path) -> RawData:
    if not folder.is_dir():
        raise DataError(
            f"{dataset} folder not found at {folder}: put the extracted python version of the dataset "
            f"there (--data-root / IMBCIL_DATA names its parent), or set data.download=true where the "
            f"internet is reachable"
        )
    if dataset == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, meta_file, label_key, names_key = [folder / "test_batch"], folder / "batches.meta", b"labels", b"label_names"
    else:
        train_files, test_files = [folder / "train"], [folder / "test"]
        meta_file, label_key, names_key = folder / "meta", b"fine_labels", b"fine_label_names"

    def read(files: list[Path]) -> tuple[torch.Tensor, np.ndarray]:
        blobs = [_unpickle(f) for f in files]
        try:
            data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in blobs])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in blobs])
        except KeyError as exc:
            raise DataError(f"{folder}: a batch file lacks the key {exc.args[0]!r}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{folder}: batch arrays are not N x 3072 images with N labels")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels

    train_images, train_labels = read(train_files)
    test_images, test_labels = read(test_files)
    meta = _unpickle(meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    return RawData(train_labels, test_labels, names, train_images, test_images)


def read_file_list(path: Path, root: Path) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise DataError(f"file list not found at {path}: --data-root must hold train.txt and test.txt")
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected '<image path> <label>', got {line!r}")
        image = Path(parts[0])
        paths.append(str(image if image.is_absolute() else root / image))
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64)


def _read_file_lists(root: Path) -> RawData:
    train_paths, train_labels = read_file_list(root / "train.txt", root)
    test_paths, test_labels = read_file_list(root / "test.txt", root)
    num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    names = [str(c) for c in range(num_classes)]
    named = root / "classes.txt"  # written by `imbcil lists`: one class name per label
    if named.is_file():
        listed = [line.strip() for line in named.read_text().splitlines() if line.strip()]
        names[: len(listed)] = listed[:num_classes]
    return RawData(train_labels, test_labels, names, train_paths=train_paths, test_paths=test_paths)


# ----------------------------------------------------------------------------- the LT protocol


def long_tail_counts(max_count: int, num_classes: int, imbalance: str, rho: float) -> np.ndarray:
    """Images kept per class (by profile position): exp n_c = int(n_max * rho^(-c/(C-1)))."""
    c = np.arange(num_classes)
    if imbalance == "exp":
        return np.array([int(max_count * rho ** (-i / (num_classes - 1))) for i in c], dtype=np.int64)
    if imbalance == "step":
        # The first half keeps every image, the second half n_max / rho.
        return np.where(c < num_classes // 2, max_count, int(max_count / rho)).astype(np.int64)
    return np.full(num_classes, max_count, dtype=np.int64)


def class_order(dataset: str, scenario: str, num_classes: int, seed: int) -> list[int]:
    if dataset in AS_LISTED:
        # Food-101's and ImageNet's class order is a seeded permutation in both scenarios (method.md §1).
        return np.random.RandomState(seed).permutation(num_classes).tolist()
    if scenario == "ordered" or dataset == "imagenet_subset":
        return list(range(num_classes))
    return list(CIFAR100_ORDER if dataset == "cifar100" else CIFAR10_ORDER)


def subsample_cifar(labels: np.ndarray, counts: np.ndarray, subset_seed: int) -> np.ndarray:
    """One RandomState stream, classes in label order, each class's indices shuffled, first n_c kept."""
    rng = np.random.RandomState(subset_seed)
    keep = []
    for c, n_c in enumerate(counts):
        indices = np.flatnonzero(labels == c)
        rng.shuffle(indices)
        keep.append(indices[:n_c])
    return np.sort(np.concatenate(keep))


def subsample_first_lines(labels: np.ndarray, counts_by_label: np.ndarray) -> np.ndarray:
    """Keep the first n_c lines of each class, as the reference does for file lists."""
    keep = [np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts_by_label)]
    return np.sort(np.concatenate(keep))


def task_split(num_classes: int, protocol: ProtocolConfig) -> list[list[int]]:
    first = protocol.first_task_classes
    per_task = (num_classes - first) // protocol.incremental_tasks
    tasks = [list(range(first))]
    for t in range(protocol.incremental_tasks):
        start = first + t * per_task
        tasks.append(list(range(start, start + per_task)))
    return tasks


def holdout_validation(labels: np.ndarray, task_classes: list[list[int]], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out images: per task and class, round_half_even(fraction * n) at random."""
    rng = np.random.RandomState(seed)
    held = np.zeros(len(labels), dtype=bool)
    for classes in task_classes:
        for c in classes:
            indices = np.flatnonzero(labels == c)
            k = int(np.round(fraction * len(indices)))
            if k > 0:
                held[rng.choice(indices, size=k, replace=False)] = True
    return held


def keep_fraction(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Indices keeping the first max(1, int(fraction * n)) images of every class."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        indices = np.flatnonzero(labels == c)
        keep.append(indices[: max(1, int(fraction * len(indices)))])
    return np.sort(np.concatenate(keep))


def build_benchmark(data: DataConfig, protocol: ProtocolConfig, seed: int, raw: Optional[RawData] = None) -> Benchmark:
    """The whole §1 protocol; deterministic for (data.subset_seed, seed)."""
    raw = load_raw(data) if raw is None else raw
    facts = DATASET_FACTS[data.dataset]
    num_classes = facts["num_classes"]
    if len(raw.class_names) < num_classes or raw.train_labels.max(initial=0) >= num_classes:
        raise DataError(f"{data.root}: expected {num_classes} classes for {data.dataset}")
    order = class_order(data.dataset, data.scenario, num_classes, seed)
    original_counts = np.bincount(raw.train_labels, minlength=num_classes)

    if data.scenario == "conventional" or data.imbalance == "none" or data.dataset in AS_LISTED:
        keep = np.arange(len(raw.train_labels))
    elif data.dataset == "imagenet_subset":
        profile = long_tail_counts(int(original_counts[order[0]]), num_classes, data.imbalance, data.rho)
        if data.scenario == "shuffled":
            np.random.RandomState(seed).shuffle(profile)
        counts_by_label = np.empty(num_classes, dtype=np.int64)
        counts_by_label[order] = profile  # profile position i belongs to class order[i]
        keep = subsample_first_lines(raw.train_labels, counts_by_label)
    else:
        # CIFAR: the profile follows the original label, whatever the scenario's class order.
        profile = long_tail_counts(int(original_counts.max()), num_classes, data.imbalance, data.rho)
        keep = subsample_cifar(raw.train_labels, profile, data.subset_seed)

    position = np.empty(num_classes, dtype=np.int64)
    position[order] = np.arange(num_classes)
    train = _split_from_raw(raw, "train", keep)
    train.labels = position[train.labels]
    train = train.subset(keep_fraction(train.labels, data.train_fraction))
    test = _split_from_raw(raw, "test", np.arange(len(raw.test_labels)))
    test.labels = position[test.labels]
    test = test.subset(keep_fraction(test.labels, data.test_fraction))

    tasks = task_split(num_classes, protocol)
    held = holdout_validation(train.labels, tasks, data.val_fraction, seed)
    mean, std = NORMALIZATION[data.dataset]
    return Benchmark(
        dataset=data.dataset,
        image_size=facts["image_size"],
        mean=mean,
        std=std,
        class_order=order,
        class_names=[raw.class_names[c] for c in order],
        task_classes=tasks,
        train=train.subset(np.flatnonzero(~held)),
        val=train.subset(np.flatnonzero(held)),
        test=test,
        resize=224 if data.dataset in AS_LISTED else None,
    )


def _split_from_raw(raw: RawData, which: str, indices: np.ndarray) -> Split:
    labels = raw.train_labels if which == "train" else raw.test_labels
    images = raw.train_images if which == "train" else raw.test_images
    paths = raw.train_paths if which == "train" else raw.test_paths
    return Split(labels=labels.copy(), images=images, paths=paths, origin=np.arange(len(labels))).subset(indices)
