"""`imbcil lists` on small trees written here: exact lines, the reference's subset, one-line refusals."""

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.lists import imagenet_subset_classes


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def assert_one_line_exit_2(code, stdout, stderr):
    assert code == 2, stdout + stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and "Traceback" not in stderr
    return stderr.strip()


def test_an_imagefolder_tree_gives_sorted_classes_and_relative_paths(tmp_path):
    root = tmp_path / "pets"
    for name, count in (("dog", 3), ("cat", 2), ("axolotl", 1)):
        for i in range(count):
            image(root / "train" / name / f"{i}.jpg")
        image(root / "val" / name / "v.png")
    code, out, err = invoke("lists", "imagefolder", root)
    assert code == 0, out + err
    assert lines(root / "classes.txt") == ["axolotl", "cat", "dog"]
    assert lines(root / "train.txt") == [
        "train/axolotl/0.jpg 0", "train/cat/0.jpg 1", "train/cat/1.jpg 1",
        "train/dog/0.jpg 2", "train/dog/1.jpg 2", "train/dog/2.jpg 2",
    ]  # fmt: skip
    assert lines(root / "test.txt") == ["val/axolotl/v.png 0", "val/cat/v.png 1", "val/dog/v.png 2"]
    assert "3 classes; training images per class 1..3 (6 in all), test images per class 1..1 (3 in all)" in out.replace("\n", " ")
    # Elsewhere: paths relative to the output folder, which is the runs' data root.
    code, out, err = invoke("lists", "imagefolder", root, "--output", tmp_path / "lists")
    assert code == 0 and lines(tmp_path / "lists" / "train.txt")[0] == "../pets/train/axolotl/0.jpg 0"


def food101_tree(root: Path, classes=("beignets", "apple_pie"), train_ids=(("1", "2"), ("3",)), test_ids=(("9",), ("8",))) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(sorted(classes)) + "\n")
    ordered = sorted(zip(classes, train_ids, test_ids))
    (root / "meta" / "train.txt").write_text("".join(f"{c}/{i}\n" for c, ids, _ in ordered for i in ids))
    (root / "meta" / "test.txt").write_text("".join(f"{c}/{i}\n" for c, _, ids in ordered for i in ids))
    for c, train, test in ordered:
        for i in (*train, *test):
            image(root / "images" / c / f"{i}.jpg")
    return root


def test_the_food101_archive_gives_its_own_split_and_class_order(tmp_path):
    root = food101_tree(tmp_path / "food-101")
    code, out, err = invoke("lists", "food101", root, "--rho", "1")  # rho 1: the whole official split
    assert code == 0, out + err
    assert lines(root / "classes.txt") == ["apple_pie", "beignets"]
    assert lines(root / "train.txt") == ["images/apple_pie/3.jpg 0", "images/beignets/1.jpg 1", "images/beignets/2.jpg 1"]
    assert lines(root / "test.txt") == ["images/apple_pie/8.jpg 0", "images/beignets/9.jpg 1"]


def test_the_food101_training_list_is_long_tailed_by_a_seeded_draw(tmp_path):
    classes = ("apple_pie", "beignets", "churros")
    train_ids = tuple(tuple(f"{c[0]}{i}" for i in range(8)) for c in classes)
    root = food101_tree(tmp_path / "food-101", classes, train_ids, (("t1",), ("t2",), ("t3",)))
    code, out, err = invoke("lists", "food101", root, "--rho", "4", "--seed", "3")
    assert code == 0, out + err
    train = lines(root / "train.txt")
    # int(8 * 4^(-i/2)) for class i: 8, 4, 2; each class's picks from one RandomState(3) stream, in turn.
    rng = np.random.RandomState(3)
    expected = []
    for label, ids in enumerate(train_ids):
        keep = sorted(rng.permutation(8)[: (8, 4, 2)[label]])
        expected += [f"images/{classes[label]}/{ids[i]}.jpg {label}" for i in keep]
    assert train == expected
    assert lines(root / "test.txt") == ["images/apple_pie/t1.jpg 0", "images/beignets/t2.jpg 1", "images/churros/t3.jpg 2"]
    assert "training images per class 2..8 (14 in all)" in out.replace("\n", " ")
    invoke("lists", "food101", root, "--rho", "4", "--seed", "4")
    other = lines(root / "train.txt")
    assert other != train and [l.split()[1] for l in other] == [l.split()[1] for l in train]  # same counts, other images
    assert_one_line_exit_2(*invoke("lists", "food101", root, "--rho", "0.5"))
    assert_one_line_exit_2(*invoke("lists", "imagefolder", root, "--rho", "4"))


def test_a_missing_image_and_a_wrong_layout_are_one_line_each(tmp_path):
    root = food101_tree(tmp_path / "food-101")
    (root / "images" / "beignets" / "2.jpg").unlink()
    message = assert_one_line_exit_2(*invoke("lists", "food101", root, "--rho", "1"))
    assert message == f"error: {root / 'images' / 'beignets' / '2.jpg'}: listed but missing"
    assert not (root / "train.txt").exists()  # nothing written
    folder = tmp_path / "pets"
    image(folder / "train" / "dog" / "0.jpg")
    image(folder / "val" / "dog" / "0.jpg")
    message = assert_one_line_exit_2(*invoke("lists", "food101", folder))
    assert message.startswith(f"error: {folder}: no meta/classes.txt; the Food-101 archive has")
    message = assert_one_line_exit_2(*invoke("lists", "imagenet", folder))
    assert message == f"error: {folder / 'train'}: holds 1 class folders, ILSVRC-2012 has 1000"
    (folder / "train" / "dog" / "0.jpg").write_bytes(b"not an image")
    message = assert_one_line_exit_2(*invoke("lists", "imagefolder", folder))
    assert message == f"error: {folder / 'train' / 'dog' / '0.jpg'}: does not decode as an image (UnidentifiedImageError)"
    assert_one_line_exit_2(*invoke("lists", "cifar", folder))


def test_the_imagenet_subset_is_the_reference_selection_and_loads_as_imagenet_subset(tmp_path):
    wnids = [f"n{index:08d}" for index in np.random.RandomState(5).choice(10**8, 1000, replace=False)]
    root = tmp_path / "ILSVRC2012"
    for wnid in wnids:
        image(root / "train" / wnid / f"{wnid}_1.JPEG")
        image(root / "train" / wnid / f"{wnid}_2.JPEG")
        image(root / "val" / wnid / "ILSVRC2012_val.JPEG")
    # The rule of Long-Tailed-CIL's subset.py, computed here on its own.
    np.random.seed(1993)
    expected = list(np.random.choice(sorted(wnids), 100, replace=False))
    assert imagenet_subset_classes(list(reversed(wnids))) == expected
    out = tmp_path / "subset"
    code, stdout, stderr = invoke("lists", "imagenet-subset", root, "--output", out)
    assert code == 0, stdout + stderr
    assert lines(out / "classes.txt") == expected
    assert lines(out / "train.txt")[:2] == [f"../ILSVRC2012/train/{expected[0]}/{expected[0]}_{i}.JPEG 0" for i in (1, 2)]
    assert len(lines(out / "train.txt")) == 200 and len(lines(out / "test.txt")) == 100
    # The runs read it: 100 classes of 2 training images (val_fraction 0 keeps both), 50 + 5 x 10.
    config = tmp_path / "subset.yaml"
    config.write_text(
        "data: {dataset: imagenet_subset, scenario: conventional, val_fraction: 0.0}\n"
        "protocol: {first_task_classes: 50, incremental_tasks: 5}\n"
    )
    code, stdout, stderr = invoke("data", config, "--data-root", out)
    assert code == 0, stdout + stderr
    assert stdout.splitlines()[0] == "imagenet_subset: 200 train / 0 val / 100 test images"
    assert " ".join(stdout.split()).count("train [2, 2, 2, 2, 2, 2, 2, 2, 2, 2] = 20") == 5  # the terminal may wrap it
    full = tmp_path / "full"
    code, stdout, stderr = invoke("lists", "imagenet", root, "--output", full)
    assert code == 0 and lines(full / "classes.txt") == sorted(wnids) and len(lines(full / "train.txt")) == 2000
    # ImageNet-1000 reads the whole list as it is: the authors' conventional LFS-10, 100 + 9 x 100.
    config.write_text(
        "data: {dataset: imagenet, scenario: conventional, val_fraction: 0.0}\n"
        "protocol: {first_task_classes: 100, incremental_tasks: 9}\n"
    )
    code, stdout, stderr = invoke("data", config, "--data-root", full)
    assert code == 0, stdout + stderr
    assert stdout.splitlines()[0] == "imagenet: 2000 train / 0 val / 1000 test images"
    assert " ".join(stdout.split()).count("= 200") == 10  # every task: 100 classes of 2 training images
