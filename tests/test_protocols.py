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
def test_real_protocol_sizes_and_balance(data_root, name, n_pool, n_query, n_train, per_q, per_t):
    pool, split = load_protocol(name, data_root)
    assert len(pool) == n_pool
    check_split(split, pool.labels, n_pool, n_query, n_train, per_q, per_t)


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
