"""Loaders return the real data in the original order, and bad data fails with a useful message."""

import gzip
from importlib import resources
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from vdsh.data import DatasetNotFoundError, load


def test_embedded_sample_is_the_official_mnist_test_set():
    sample = load("mnist-sample")
    assert sample.images.shape == (10_000, 1, 28, 28) and sample.images.dtype == np.uint8
    assert sample.labels.sum(1).tolist() == [1] * 10_000
    # Published class histogram of the MNIST test set.
    assert sample.labels.sum(0).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert sample.targets[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.slow
def test_mnist_all_is_train_then_test(data_root):
    mnist = load("mnist", data_root)
    assert mnist.images.shape == (70_000, 1, 28, 28)
    assert mnist.targets[:3].tolist() == [5, 0, 4]  # first training digits
    assert np.array_equal(mnist.images[60_000:], load("mnist-sample").images)
    assert abs(mnist.images[:60_000].mean() / 255 - 0.1307) < 1e-3


@pytest.mark.slow
def test_cifar10_reads_rebuilt_pickles(data_root):
    test = load("cifar10", data_root, split="test")
    assert test.images.shape == (10_000, 3, 32, 32)
    assert test.class_names[3] == "cat" and test.targets[0] == 3
    assert tuple(test.images[0, :, 0, 0]) == (158, 112, 49)  # published first pixel of test[0]
    assert test.labels.sum(0).tolist() == [1000] * 10


def test_missing_dataset_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "MNIST" / "raw")) as err:
        load("mnist", tmp_path)
    assert "download=True" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load("cifar10", tmp_path)


def test_truncated_mnist_file_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    sample_dir = resources.files("vdsh.data") / "sample"
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(sample_dir / name, raw / name)
    data = gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte.gz").unlink()
    (raw / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        load("mnist", tmp_path, split="test")


def test_corrupt_cifar_batch_is_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        load("cifar10", tmp_path, split="test")


def make_folder(root, classes=("cats", "dogs"), per_class=3):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 30), (80 * c, 10 * i, 0)).save(root / name / f"{i}.png")


def test_image_folder_loads_and_caches(tmp_path):
    make_folder(tmp_path / "imgs")
    first = load(f"folder:{tmp_path / 'imgs'}")
    assert first.images.shape == (6, 3, 30, 30), "the images' own shape: colour, their shorter side"
    assert first.class_names == ["cats", "dogs"]
    assert first.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert first.sources[0].endswith("cats/0.png")
    again = load(f"folder:{tmp_path / 'imgs'}")
    assert np.array_equal(np.asarray(again.images), first.images)
    assert load(f"folder:{tmp_path / 'imgs'}", channels=1, size=12).images.shape == (6, 1, 12, 12)


def test_folder_shape_follows_the_images_up_to_a_cap(tmp_path):
    from vdsh.data.folder import MAX_SIZE

    for name, mode, side in [("grey", "L", 20), ("big", "RGB", 300)]:
        (tmp_path / name / "a").mkdir(parents=True)
        for i in range(3):
            Image.new(mode, (side + i, side)).save(tmp_path / name / "a" / f"{i}.png")
    assert load(f"folder:{tmp_path / 'grey'}").images.shape[1:] == (1, 20, 20)
    assert load(f"folder:{tmp_path / 'big'}").images.shape[1:] == (3, MAX_SIZE, MAX_SIZE)


def test_fixed_shape_dataset_refuses_another_shape_before_reading(tmp_path):
    with pytest.raises(ValueError, match="mnist-sample images are 1 x 28 x 28.*drop"):
        load("mnist-sample", channels=3, size=32)


def test_failed_load_leaves_no_cache(tmp_path, monkeypatch):
    from vdsh.data import cache

    make_folder(tmp_path / "imgs")
    before = set((cache.cache_dir() / "datasets").glob("*"))
    saved = []

    def full_disk(path, array):  # the images are written, then the disk fills up
        if saved:
            raise OSError("No space left on device")
        saved.append(path)
        np.save(path, array)
    monkeypatch.setattr(cache, "_atomic_save", full_disk)
    with pytest.raises(OSError, match="No space"):
        load(f"folder:{tmp_path / 'imgs'}")
    assert saved and set((cache.cache_dir() / "datasets").glob("*")) == before, "the half-written entry must go"


def test_corrupt_image_in_folder_names_the_file(tmp_path):
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dogs" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with pytest.raises(DatasetNotFoundError, match="bad.jpg"):
        load(f"folder:{tmp_path / 'imgs'}")


def test_nuswide_list_layout_is_multi_label(tmp_path):
    root = tmp_path / "nus-wide"
    (root / "images").mkdir(parents=True)
    rows = {"database.txt": [], "test.txt": []}
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.new("RGB", (50, 40), tuple(int(v) for v in rng.integers(0, 255, 3))).save(root / "images" / f"{i}.jpg")
        labels = (rng.random(21) < 0.2).astype(int)
        labels[i % 21] = 1
        rows["database.txt" if i < 9 else "test.txt"].append(f"images/{i}.jpg " + " ".join(map(str, labels)))
    for name, lines in rows.items():
        (root / name).write_text("\n".join(lines) + "\n")
    nus = load("nuswide", tmp_path)
    assert nus.images.shape == (12, 3, 64, 64) and nus.labels.shape == (12, 21)
    assert nus.class_names[0] == "animal" and not nus.is_single_label
    assert load("nuswide", tmp_path, split="test").labels.tolist() == nus.labels[9:].tolist()
    (root / "test.txt").write_text("images/0.jpg 1 0 x\n")
    with pytest.raises(DatasetNotFoundError, match="test.txt:1"):
        load("nuswide", tmp_path, split="test")
