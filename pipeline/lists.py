"""`imbcil lists`: the train.txt / test.txt that the file-list datasets read, made from a folder tree.

Every line is `<path relative to the data root> <label>`; `classes.txt` beside them names the
classes by label, one per line, so that plots and tables say `apple_pie`, not `0`. Each layout
says what it expects, and a tree that does not look like it is refused in one line:

- imagefolder: `train/<class>/*` and `val/<class>/*` (or `test/<class>/*`); classes sorted.
- food101: the official archive, `images/<class>/<id>.jpg` with `meta/classes.txt`,
  `meta/train.txt` and `meta/test.txt`. A run uses a Food-101 training list as it is (the
  authors' code expects it long-tailed already), so the training list written here is the long
  tail: class i of classes.txt keeps int(750 * rho^(-i/100)) of its official training images,
  drawn with a seeded shuffle (`long_tailed`); the test list is the official one. The authors'
  own list cannot be rebuilt: they cut it from a re-split of the images of their own and
  shuffled it with a seed their code does not record.
- imagenet-subset / imagenet: ILSVRC-2012 `train/<wnid>/*` and `val/<wnid>/*`; the subset is the
  100 classes Long-Tailed-CIL's selection gives (see `imagenet_subset_classes`).

Every listed file must exist, and a sample of them is decoded, before anything is written.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.config import ConfigError

LAYOUTS = ("imagefolder", "food101", "imagenet-subset", "imagenet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
DECODE_SAMPLE = 200
IMAGENET_CLASSES = 1000
SUBSET_CLASSES, SUBSET_SEED = 100, 1993
FOOD101_RHO = 100.0  # the paper's imbalance ratio: 750 training images down to 7


class ListsError(ConfigError):
    """The tree is not the layout asked for, or a listed image is missing or unreadable."""


@dataclass
class Lists:
    classes: list[str]  # by label
    train: list[tuple[str, int]]  # (path relative to the output folder, label)
    test: list[tuple[str, int]]

    def counts(self, which: str) -> list[int]:
        counted = Counter(label for _, label in getattr(self, which))
        return [counted.get(label, 0) for label in range(len(self.classes))]


def imagenet_subset_classes(wnids: Sequence[str]) -> list[str]:
    """Long-Tailed-CIL's ImageNet-Subset: numpy seed 1993, 100 of the sorted classes without replacement."""
    np.random.seed(SUBSET_SEED)
    return [str(c) for c in np.random.choice(sorted(wnids), SUBSET_CLASSES, replace=False)]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir())


def _folder_split(root: Path, split: Path, classes: Sequence[str], out: Path) -> list[tuple[str, int]]:
    lines = []
    for label, name in enumerate(classes):
        folder = split / name
        if not folder.is_dir():
            raise ListsError(f"{split}: has no folder for class {name}, which {root / 'train'} has")
        lines.extend((_relative(image, out), label) for image in _images(folder))
    return lines


def _relative(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)


def _test_folder(root: Path) -> Path:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    raise ListsError(f"{root}: no val/ or test/ folder beside train/; an ImageFolder tree has train/<class>/ and val/<class>/")


def imagefolder(root: Path, out: Path, classes: Optional[Sequence[str]] = None) -> Lists:
    train = root / "train"
    if not train.is_dir():
        raise ListsError(f"{root}: no train/ folder; an ImageFolder tree has train/<class>/ and val/<class>/ (or test/<class>/)")
    test = _test_folder(root)
    found = _class_folders(train)
    if not found:
        raise ListsError(f"{train}: holds no class folders")
    chosen = list(found if classes is None else classes)
    missing = [c for c in chosen if c not in found]
    if missing:
        raise ListsError(f"{train}: has no folder for class {missing[0]}")
    extra = sorted(set(_class_folders(test)) - set(found))
    if extra:
        raise ListsError(f"{test}: holds class {extra[0]}, which {train} does not")
    lists = Lists(chosen, _folder_split(root, train, chosen, out), _folder_split(root, test, chosen, out))
    empty = [c for c, n in zip(chosen, lists.counts("train")) if n == 0]
    if empty:
        raise ListsError(f"{train / empty[0]}: holds no images")
    return lists


def imagenet(root: Path, out: Path, subset: bool) -> Lists:
    train = root / "train"
    if not train.is_dir():
        raise ListsError(f"{root}: no train/ folder; ILSVRC-2012 is train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    wnids = _class_folders(train)
    if len(wnids) != IMAGENET_CLASSES:
        raise ListsError(f"{train}: holds {len(wnids)} class folders, ILSVRC-2012 has {IMAGENET_CLASSES}")
    return imagefolder(root, out, imagenet_subset_classes(wnids) if subset else wnids)


def long_tailed(lines: Sequence[tuple[str, int]], num_classes: int, rho: float, seed: int) -> list[tuple[str, int]]:
    """Class i keeps int(n_max * rho^(-i/(C-1))) of its lines (at least one), chosen by one seeded stream.

    n_max is the largest class; classes are drawn in label order, each from a permutation of its
    lines, and the kept lines stay in the list's own order.
    """
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for index, (_, label) in enumerate(lines):
        by_class[label].append(index)
    n_max = max(len(indices) for indices in by_class)
    rng = np.random.RandomState(seed)
    kept = []
    for label, indices in enumerate(by_class):
        wanted = max(1, int(n_max * rho ** (-label / max(num_classes - 1, 1))))
        chosen = rng.permutation(len(indices))[:wanted]
        kept.extend(indices[i] for i in chosen)
    return [lines[i] for i in sorted(kept)]


def food101(root: Path, out: Path) -> Lists:
    meta, images = root / "meta", root / "images"
    for needed in (meta / "classes.txt", meta / "train.txt", meta / "test.txt", images):
        if not needed.exists():
            raise ListsError(f"{root}: no {needed.relative_to(root)}; the Food-101 archive has images/<class>/<id>.jpg and meta/classes.txt, train.txt, test.txt")
    classes = [line.strip() for line in (meta / "classes.txt").read_text().splitlines() if line.strip()]
    label = {name: i for i, name in enumerate(classes)}

    def split(name: str) -> list[tuple[str, int]]:
        lines = []
        for number, line in enumerate((meta / name).read_text().splitlines(), start=1):
            entry = line.strip()
            if not entry:
                continue
            cls = entry.split("/", 1)[0]
            if cls not in label:
                raise ListsError(f"{meta / name}:{number}: class {cls} is not in meta/classes.txt")
            lines.append((_relative(images / f"{entry}.jpg", out), label[cls]))
        return lines

    return Lists(classes, split("train.txt"), split("test.txt"))


def make_lists(layout: str, source: Path, out: Path, rho: float = FOOD101_RHO, seed: int = 0) -> Lists:
    """The layout's lists; for Food-101 the training list is long-tailed by `rho`, drawn with `seed`."""
    if layout not in LAYOUTS:
        raise ListsError(f"layout: must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if not rho >= 1:
        raise ListsError(f"--rho: must be >= 1 (got {rho:g})")
    if not source.is_dir():
        raise ListsError(f"{source}: not a folder")
    if layout == "imagefolder":
        return imagefolder(source, out)
    if layout == "food101":
        lists = food101(source, out)
        lists.train = long_tailed(lists.train, len(lists.classes), rho, seed)
        return lists
    return imagenet(source, out, subset=layout == "imagenet-subset")


def check_images(lists: Lists, out: Path, sample: int = DECODE_SAMPLE, seed: int = 0) -> None:
    """Every listed file exists; `sample` of them, drawn at random, decode as images."""
    from PIL import Image

    # normpath: the output folder may not exist yet, so `out/../x` must not go through it.
    entries = [Path(os.path.normpath(out / path)) for path, _ in lists.train + lists.test]
    for path in entries:
        if not path.is_file():
            raise ListsError(f"{path}: listed but missing")
    for path in random.Random(seed).sample(entries, min(sample, len(entries))):
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 -- PIL raises many kinds for a bad file
            raise ListsError(f"{path}: does not decode as an image ({type(exc).__name__})") from None


def write_lists(lists: Lists, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in (("train.txt", lists.train), ("test.txt", lists.test)):
        (out / name).write_text("".join(f"{path} {label}\n" for path, label in lines))
        written.append(out / name)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in lists.classes))
    return [*written, out / "classes.txt"]
