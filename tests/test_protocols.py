"""Protocol splits: sizes, class balance, disjointness and determinism, on the real data."""

import numpy as np
import pytest

from vdsh.data import ProtocolSplit, load_protocol, split_protocol


def check_split(split, labels, n_pool, n_query, n_train, per_class_query, per_class_train):
    assert len(split.query) == n_query and len(split.train) == n_train
    assert len(split.database) == n_pool - n_query if split.protocol != "cifar10-50k" else 50_000
    assert not np.intersect1d(split.query, split.database).size, "queries leak into the database"
    assert np.isin(split.train, split.database).all(), "training images must come from the database"
    if per_class_query:
        assert labels[split.query].sum(0).tolist() == [per_class_query] * labels.shape[1]
    if per_class_train:
        assert labels[split.train].sum(0).tolist() == [per_class_train] * labels.shape[1]


@pytest.mark.parametrize(
    "name, n_pool, n_query, n_train, per_q, per_t",
    [
        ("mnist-5k", 70_000, 1_000, 5_000, 100, 500),
        ("mnist-69k", 70_000, 1_000, 69_000, 100, None),
        ("cifar10-5k", 60_000, 1_000, 5_000, 100, 500),
        ("cifar10-59k", 60_000, 1_000, 59_000, 100, None),
        ("cifar10-50k", 60_000, 10_000, 50_000, 1_000, 5_000),
    ],
)
@pytest.mark.slow
def test_real_protocol_sizes_and_balance(data_root, name, n_pool, n_query, n_train, per_q, per_t):
    pool, split = load_protocol(name, data_root)
    assert len(pool) == n_pool
    check_split(split, pool.labels, n_pool, n_query, n_train, per_q, per_t)


@pytest.mark.slow
def test_splits_are_deterministic_and_seeded(data_root):
    _, a = load_protocol("cifar10-5k", data_root, seed=0)
    _, b = load_protocol("cifar10-5k", data_root, seed=0)
    _, c = load_protocol("cifar10-5k", data_root, seed=1)
    assert np.array_equal(a.query, b.query) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.query, c.query)
    _, big = load_protocol("cifar10-59k", data_root, seed=0)
    assert np.array_equal(a.query, big.query), "5k and 59k settings share the same 1,000 queries"


def test_embedded_sample_protocol():
    pool, split = load_protocol("mnist-sample")
    check_split(split, pool.labels, 10_000, 1_000, 5_000, 100, 500)


def test_split_saves_and_reloads(tmp_path):
    pool, split = load_protocol("mnist-sample")
    split.save(tmp_path / "split.npz")
    again = ProtocolSplit.load(tmp_path / "split.npz")
    assert again.protocol == "mnist-sample" and again.seed == 0
    for part in ("train", "query", "database"):
        assert np.array_equal(getattr(again, part), getattr(split, part))


def test_multi_label_protocol_draws_per_concept():
    rng = np.random.default_rng(0)
    labels = (rng.random((30_000, 21)) < 0.15).astype(np.uint8)
    labels[np.arange(30_000), rng.integers(0, 21, 30_000)] = 1
    split = split_protocol("nuswide-21", labels)
    assert len(split.query) == 2_100 and len(split.train) == 10_500
    assert (labels[split.query].sum(0) >= 100).all()
    assert not np.intersect1d(split.query, split.database).size


def test_unknown_protocol_lists_the_known_ones():
    with pytest.raises(ValueError, match="cifar10-5k"):
        split_protocol("cifar-5", np.zeros((10, 2)))


def labelled_folder(root, counts: dict[str, int]):
    from PIL import Image

    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (12, 10), i * 7 % 256).save(root / name / f"{i}.png")
    return f"folder:{root}"


def test_user_protocol_on_a_folder_is_shaped_by_options(tmp_path):
    folder = labelled_folder(tmp_path / "imgs", {"a": 30, "b": 50})
    pool, split = load_protocol(folder, queries_per_class=4, train_per_class=10)
    assert pool.images.shape == (80, 1, 10, 10) and pool.class_names == ["a", "b"]
    check_split(split, pool.labels, 80, 8, 20, 4, 10)
    _, auto = load_protocol(folder)  # a tenth of the smallest class as queries, training on the whole database
    assert auto.spec.queries_per_class == 3 and len(auto.query) == 6
    assert np.array_equal(auto.train, auto.database) and len(auto.database) == 74


def test_user_protocol_errors_name_the_fix(tmp_path):
    folder = labelled_folder(tmp_path / "imgs", {"a": 3, "b": 50})
    with pytest.raises(ValueError, match="class 'a' has 3 available images.*--queries-per-class"):
        load_protocol(folder, queries_per_class=5)
    with pytest.raises(ValueError, match="mnist-sample fixes its split.*--protocol mnist-sample"):
        load_protocol("mnist-sample", queries_per_class=5)


def test_saved_protocol_reloads_exactly_and_notices_a_changed_folder(tmp_path):
    from vdsh.data.protocols import save_protocol, split_part

    folder = labelled_folder(tmp_path / "imgs", {"a": 20, "b": 20})
    pool, split = load_protocol(folder, seed=3, queries_per_class=2, train_per_class="all")
    save_protocol(tmp_path / "run", split, pool.images.shape)
    for reference in (tmp_path / "run", tmp_path / "run" / "protocol.json", tmp_path / "run" / "split.npz"):
        again_pool, again = load_protocol(str(reference))
        assert again.seed == 3 and again.spec == split.spec and again_pool.images.shape == pool.images.shape
        for part in ("train", "query", "database"):
            assert np.array_equal(again.part(part), split.part(part))
    assert np.array_equal(split_part(f"{tmp_path / 'run' / 'split.npz'}:query"), split.query)
    labelled_folder(tmp_path / "imgs", {"c": 1})
    with pytest.raises(ValueError, match="split 40 images but .* now has 41"):
        load_protocol(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="drawn from 40 images but this dataset has 41"):
        split_part(f"{tmp_path / 'run'}:query", pool_size=41)


def test_default_augmentation_follows_the_dataset():
    from vdsh.training.augment import default_augmentation

    digits, photos = default_augmentation("mnist-5k"), default_augmentation("cifar10")
    assert (digits.crop_padding, digits.flip) == (2, False) and (photos.crop_padding, photos.flip) == (4, True)
    assert default_augmentation("folder:/any/images") is None, "unknown data: no augmentation unless asked"


def test_built_in_class_names():
    from vdsh.data.cifar10 import INFO as CIFAR
    from vdsh.data.datasets import dataset_info

    assert dataset_info("mnist").class_names == tuple("0123456789")
    assert CIFAR.class_names[:3] == ("airplane", "automobile", "bird") and len(CIFAR.class_names) == 10
