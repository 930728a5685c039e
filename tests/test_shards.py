"""Several index directories searched as one: answers equal one index over their union, in order."""

from __future__ import annotations

import numpy as np
import pytest

from vdsh.index.bench import clustered_codes
from vdsh.index.hamming_index import HammingIndex
from vdsh.index.shards import ShardedItems, merge_knn
from vdsh.index.items import ItemIndex
from vdsh.index.store import IndexMismatchError, save_index

CLASSES = ["a", "b", "c"]


def shard(codes: np.ndarray, ids: np.ndarray, kind: str = "flat", model_id: str = "m", bits: int = 64) -> ItemIndex:
    items = ItemIndex(HammingIndex(bits, kind), model_id=model_id, class_names=CLASSES)
    thumbnails = [np.full((2, 3, 1), i % 256, np.uint8) if i % 2 else None for i in ids]
    items.add(codes, ids, labels=ids % 3, sources=[f"src:{i}" for i in ids], thumbnails=thumbnails)
    return items


@pytest.fixture(scope="module")
def split_collection():
    """3,000 clustered codes with many ties, ids shuffled, cut into three unequal shards."""
    codes = clustered_codes(3000, 64, centres=5, flip=0.02, seed=11)
    ids = np.random.default_rng(11).permutation(50_000)[:3000].astype(np.int64)
    cuts = [0, 700, 2100, 3000]
    kinds = ["flat", "distinct", "auto"]
    shards = [shard(codes[a:b], ids[a:b], kinds[i]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    union = shard(codes, ids)
    queries = np.concatenate([clustered_codes(15, 64, centres=5, flip=0.05, seed=11, draw=1), codes[[5, 1500, 2999]]])
    return ShardedItems(shards), union, queries


@pytest.mark.parametrize("k", [1, 10, 333, 5000])
def test_sharded_knn_equals_one_index_over_the_union(split_collection, k):
    sharded, union, queries = split_collection
    got_ids, got_d = sharded.search(queries, k)
    want_ids, want_d = union.search(queries, k)
    np.testing.assert_array_equal(got_d, want_d)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert got_ids.shape == (len(queries), k) and (got_ids[:, 3000:] == -1).all()


@pytest.mark.parametrize("radius", [0, 3, 10])
def test_sharded_radius_search_equals_the_union(split_collection, radius):
    sharded, union, queries = split_collection
    for (gi, gd), (wi, wd) in zip(sharded.range_search(queries, radius), union.range_search(queries, radius)):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gd, wd)


def test_metadata_comes_from_the_shard_that_holds_each_id(split_collection):
    sharded, union, queries = split_collection
    ids = sharded.search(queries[:3], 40)[0].ravel()
    np.testing.assert_array_equal(sharded.labels_of(ids), union.labels_of(ids))
    assert sharded.sources_of(ids) == union.sources_of(ids) == [f"src:{i}" for i in ids]
    np.testing.assert_array_equal(sharded.codes_of(ids), union.codes_of(ids))
    odd = int(ids[ids % 2 == 1][0])
    assert sharded.thumbnail_of(odd)[0, 0, 0] == odd % 256 and sharded.thumbnail_of(int(ids[ids % 2 == 0][0])) is None
    assert len(sharded) == 3000 and sharded.kind == "flat+distinct+auto" and sharded.class_names == CLASSES
    with pytest.raises(KeyError, match="unknown ids"):
        sharded.labels_of([10**9])


def test_merge_knn_orders_ties_by_shard_then_rank_and_pads():
    first = (np.array([[5, 9, -1]]), np.array([[1, 2, -1]], np.int32))
    second = (np.array([[7, 3, 4]]), np.array([[0, 1, 2]], np.int32))
    ids, dists = merge_knn([first, second], 7)
    assert ids.tolist() == [[7, 5, 3, 9, 4, -1, -1]] and dists.tolist() == [[0, 1, 1, 2, 2, -1, -1]]


def test_shards_that_cannot_be_merged_are_refused(tmp_path):
    codes = clustered_codes(20, 64, seed=2)
    with pytest.raises(IndexMismatchError, match="id 3 is in both"):
        ShardedItems([shard(codes[:10], np.arange(10)), shard(codes[10:], np.arange(3, 13))])
    with pytest.raises(IndexMismatchError, match="disagree on model"):
        ShardedItems([shard(codes[:10], np.arange(10)), shard(codes[10:], np.arange(10, 20), model_id="other")])
    with pytest.raises(IndexMismatchError, match="disagree on code length"):
        ShardedItems([shard(codes[:10], np.arange(10)), shard(codes[10:, :4], np.arange(10, 20), bits=32)])


def test_sharded_items_load_saved_directories_with_the_usual_checks(tmp_path, split_collection):
    sharded, union, queries = split_collection
    dirs = []
    for i, part in enumerate(sharded.shards):
        save_index(tmp_path / f"shard{i}", part)
        dirs.append(tmp_path / f"shard{i}")
    loaded = ShardedItems.load(dirs, model_id="m", bits=64)
    for a, b in zip(loaded.search(queries, 50), union.search(queries, 50)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexMismatchError, match="model differs"):
        ShardedItems.load(dirs, model_id="another")
