"""Index directories: round trip, plain-FAISS readability, mismatch errors, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest

from vdsh.data.transforms import thumbnail
from vdsh.index import store
from vdsh.index.bench import clustered_codes
from vdsh.index.hamming_index import HammingIndex
from vdsh.index.items import ItemIndex
from vdsh.index.store import IndexMismatchError, committed_version, load_index, save_changes, save_index

REPO = Path(__file__).resolve().parents[1]


def make_items(n: int = 300, kind: str = "flat", model_id: str = "model-a", seed: int = 0, **params) -> ItemIndex:
    rng = np.random.default_rng(seed)
    items = ItemIndex(HammingIndex(64, kind, **params), model_id=model_id, class_names=["a", "b", "c", "d"])
    thumbnails = [rng.integers(0, 256, (8 + i % 5, 6, 3), dtype=np.uint8) if i % 3 else None for i in range(n)]
    items.add(
        clustered_codes(n, 64, centres=4, flip=0.05, seed=seed),
        np.arange(n, dtype=np.int64) * 7 + seed,
        labels=rng.integers(0, 2, (n, 4)),
        sources=[f"cifar10:{i}" for i in range(n)],
        thumbnails=thumbnails,
    )
    return items


def assert_same_items(a: ItemIndex, b: ItemIndex) -> None:
    assert (a.model_id, a.bits, a.index.kind, a.class_names) == (b.model_id, b.bits, b.index.kind, b.class_names)
    np.testing.assert_array_equal(a.index.ids, b.index.ids)
    np.testing.assert_array_equal(a.index.codes, b.index.codes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.sources == b.sources
    assert len(a.thumbnails) == len(b.thumbnails)
    for x, y in zip(a.thumbnails, b.thumbnails):
        assert (x is None and y is None) or np.array_equal(x, y)


@pytest.mark.parametrize("kind", ["flat", "distinct", "auto", "hash", "multihash", "ivf"])
def test_round_trip_keeps_items_metadata_and_answers(tmp_path, kind):
    items = make_items(kind=kind)
    save_index(tmp_path / "idx", items)
    loaded = load_index(tmp_path / "idx", model_id="model-a", bits=64)
    assert_same_items(items, loaded)
    queries = items.index.codes[:20]
    for a, b in zip(items.search(queries, 30), loaded.search(queries, 30)):
        np.testing.assert_array_equal(a, b)
    assert loaded.index.params == items.index.params
    np.testing.assert_array_equal(loaded.labels_of([7, 0]), items.labels[[1, 0]])
    assert loaded.sources_of([14]) == ["cifar10:2"] and loaded.thumbnail_of(0) is None
    assert loaded.thumbnail_of(7).shape == (9, 6, 3)


def test_plain_faiss_reads_the_file_and_returns_real_ids(tmp_path):
    items = make_items()
    save_index(tmp_path / "idx", items)
    plain = faiss.read_index_binary(str(committed_version(tmp_path / "idx") / "index.faiss"))
    queries = items.index.codes[:10]
    dists, ids = plain.search(queries, 5)
    want_ids, want_dists = items.search(queries, 5)
    np.testing.assert_array_equal(dists, want_dists)
    np.testing.assert_array_equal(ids, want_ids)


def test_remove_drops_metadata_with_items_and_saves(tmp_path):
    items = make_items(n=30)
    items.remove([7, 21])
    assert len(items) == 28 and len(items.sources) == 28 and len(items.thumbnails) == 28
    assert items.sources_of([0, 14]) == ["cifar10:0", "cifar10:2"]
    save_index(tmp_path / "idx", items)
    assert_same_items(items, load_index(tmp_path / "idx"))


def test_loading_names_what_disagrees(tmp_path):
    save_index(tmp_path / "idx", make_items())
    with pytest.raises(IndexMismatchError, match="model differs.*'model-a'.*'model-b'"):
        load_index(tmp_path / "idx", model_id="model-b")
    with pytest.raises(IndexMismatchError, match="code length differs.*64-bit.*32 bits"):
        load_index(tmp_path / "idx", bits=32)
    # a FAISS file from another save next to this metadata
    save_index(tmp_path / "other", make_items(n=200, seed=1))
    version = committed_version(tmp_path / "idx")
    os.replace(committed_version(tmp_path / "other") / "index.faiss", version / "index.faiss")
    with pytest.raises(IndexMismatchError, match="not the FAISS file.*checksum"):
        load_index(tmp_path / "idx")


def test_metadata_that_contradicts_the_faiss_file_is_refused(tmp_path):
    save_index(tmp_path / "idx", make_items())
    meta = committed_version(tmp_path / "idx") / "meta.h5"
    with h5py.File(meta, "r+") as f:
        ids = f["ids"][()]
        f["ids"][0] = ids[1]  # same count, same checksum of the FAISS file, different ids
    with pytest.raises(IndexMismatchError, match="ids"):
        load_index(tmp_path / "idx")
    with h5py.File(meta, "r+") as f:
        f["ids"][0] = ids[0]
        f.attrs["bits"] = 32
    with pytest.raises(IndexMismatchError, match="d=32.*d=64|32-bit codes"):
        load_index(tmp_path / "idx")


def test_save_refuses_a_foreign_directory_and_missing_index_is_clear(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a vdsh index directory"):
        save_index(tmp_path / "photos", make_items(n=10))
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"x"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no committed index"):
        load_index(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_index(tmp_path / "nowhere")


def test_saves_keep_the_previous_version_and_prune_older(tmp_path):
    for seed in range(4):
        save_index(tmp_path / "idx", make_items(n=20 + seed, seed=seed))
    versions = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("v"))
    assert versions == ["v000003", "v000004"]
    assert len(load_index(tmp_path / "idx")) == 23


class Crash(Exception):
    pass



CRASHING_CALLS = ("replace", "rename", "fsync")


def crashes_at_step(step: int, action) -> bool:
    """Run `action` with the (step+1)-th of os.replace/rename/fsync raising Crash; True if it crashed.

    The real calls are back in place afterwards, whatever happened.
    """
    real = {name: getattr(os, name) for name in CRASHING_CALLS}
    calls = {"n": 0}

    def failing(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step + 1:
                raise Crash(f"{name} at step {step}")
            return real[name](*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as patch:
        for name in real:
            patch.setattr(os, name, failing(name))
        try:
            action()
        except Crash:
            return True
    return False


def test_a_crash_at_any_step_leaves_the_old_or_the_new_index(tmp_path):
    """Fail the n-th file-system step of a save for every n; the directory always loads a whole state."""
    directory = tmp_path / "idx"
    old, new = make_items(n=50, model_id="old"), make_items(n=80, model_id="new", seed=1)
    step = 0
    while True:
        save_index(directory, old)
        crashed = crashes_at_step(step, lambda: save_index(directory, new))
        loaded = load_index(directory)
        assert loaded.model_id in ("old", "new")
        assert_same_items(loaded, old if loaded.model_id == "old" else new)
        if not crashed:
            break
        step += 1
    assert step >= 5  # fsyncs of both files and directories, the renames: every one was interrupted
    save_index(directory, old)  # a later save cleans up what crashed saves left
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-") or p.name == "CURRENT.tmp"]


def test_a_crash_before_the_first_commit_leaves_no_index_but_a_clear_error(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise Crash("replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        save_index(tmp_path / "idx", make_items(n=10))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no committed index"):
        load_index(tmp_path / "idx")
    save_index(tmp_path / "idx", make_items(n=10))
    assert len(load_index(tmp_path / "idx")) == 10


CHILD = textwrap.dedent(
    """
    import sys, types
    sys.modules["torch"] = types.ModuleType("torch")  # saving never touches torch; skip its slow import
    import numpy as np
    from vdsh.index.hamming_index import HammingIndex
    from vdsh.index.items import ItemIndex
    from vdsh.index.store import save_index
    directory = sys.argv[1]
    codes = np.random.default_rng(0).integers(0, 256, (60_000, 8), dtype=np.uint8)
    for state in range(1, 1000):
        items = ItemIndex(HammingIndex(64, "flat"), model_id=f"state-{state}")
        n = 1000 * state % 60_000 + 1
        items.add(codes[:n], np.arange(n), sources=[str(state)] * n)
        save_index(directory, items)
        print(state, flush=True)
    """
)


@pytest.mark.slow
def test_killing_a_saving_process_never_leaves_a_broken_index(tmp_path):
    """SIGKILL a process that saves again and again, at varied moments; what is left always loads whole."""
    directory = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.03, 0.11, 0.23, 0.37):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory)], env=env, stdout=subprocess.PIPE)
        first = child.stdout.readline()  # one save done: from here on, a committed state exists
        assert first.strip(), "the saving process died before its first save"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        loaded = load_index(directory)
        state = int(loaded.model_id.split("-")[1])
        n = 1000 * state % 60_000 + 1
        assert len(loaded) == n and loaded.sources[:1] == [str(state)] and loaded.index.search(loaded.index.codes[:1], 1)[0][0, 0] == 0


def test_thumbnails_are_checked_and_made_small():
    image = np.random.default_rng(0).integers(0, 256, (3, 200, 100), dtype=np.uint8)
    thumb = thumbnail(image)
    assert thumb.dtype == np.uint8 and thumb.shape == (64, 32, 3)  # shrunk to fit, aspect kept, no padding
    grey = np.random.default_rng(1).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    small = thumbnail(grey)  # one channel, never enlarged: the pixels as they were
    np.testing.assert_array_equal(small, grey[0][..., None])
    items = ItemIndex(HammingIndex(8), class_names=["x"])
    with pytest.raises(ValueError, match="1 to 64 pixels"):
        items.add(np.zeros((1, 1), np.uint8), [1], thumbnails=[np.zeros((65, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        items.add(np.zeros((1, 1), np.uint8), [1], thumbnails=[np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 1\)"):
        items.add(np.zeros((1, 1), np.uint8), [1], labels=np.array([3]))
    assert len(items) == 0
    items.add(np.zeros((1, 1), np.uint8), [1], labels=np.array([0]))
    np.testing.assert_array_equal(items.labels, [[1]])


def test_store_module_writes_through_os_functions():
    """The crash test patches os.replace/rename/fsync: the store must call them through `os`."""
    assert store.os is os


def test_threads_adding_removing_and_searching_keep_metadata_aligned():
    import threading

    items = ItemIndex(HammingIndex(64, "auto"), class_names=[str(c) for c in range(4)])
    codes = clustered_codes(4000, 64, centres=4, flip=0.02, seed=2)
    errors = []

    def worker(t: int) -> None:
        try:
            for batch in range(10):
                ids = np.arange(100) + 1000 * (10 * t + batch)
                items.add(codes[ids % 4000], ids, labels=ids % 4, sources=[str(i) for i in ids])
                found, _ = items.search(codes[:8], 20)
                assert (found >= 0).all()
                items.remove(ids[::2])
        except Exception as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(items) == 4 * 10 * 50 == len(items.sources) == len(items.labels)
    ids = items.index.ids
    np.testing.assert_array_equal(items.labels_of(ids).argmax(axis=1), ids % 4)
    assert items.sources_of(ids) == [str(i) for i in ids]


# ------------------------------------------------------------ incremental changes


def version_files(directory: Path) -> list[str]:
    version = committed_version(directory)
    return sorted(f"{version.name}/{p.name}" for p in version.iterdir())


def add_some(items: ItemIndex, first_id: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = list(range(first_id, first_id + n))
    items.add(clustered_codes(n, 64, centres=4, flip=0.05, seed=seed), ids, labels=rng.integers(0, 2, (n, 4)),
              sources=[f"new:{i}" for i in ids], thumbnails=[rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), *[None] * (n - 1)])
    return ids


@pytest.mark.parametrize("kind", ["flat", "auto", "ivf"])
def test_changes_are_delta_files_replayed_on_load(tmp_path, kind):
    directory = tmp_path / "idx"
    save_index(directory, make_items(kind=kind))
    items = load_index(directory)
    added = add_some(items, 10_000, 3, seed=1)
    assert save_changes(directory, items, added=added).name == "d000001.delta"
    items.remove([7, 14])
    save_changes(directory, items, removed=[7, 14])
    added = add_some(items, 20_000, 1, seed=2)
    save_changes(directory, items, added=added)
    assert version_files(directory) == ["v000001/d000001.delta", "v000001/d000002.delta", "v000001/d000003.delta",
                                        "v000001/index.faiss", "v000001/meta.h5"]
    loaded = load_index(directory, model_id="model-a", bits=64)
    assert_same_items(loaded, items)
    assert loaded.thumbnail_of(10_000).shape == (5, 7, 3) and loaded.sources_of([20_000]) == ["new:20000"]
    for a, b in zip(items.search(items.index.codes[:10], 25), loaded.search(items.index.codes[:10], 25)):
        np.testing.assert_array_equal(a, b)
    added = add_some(loaded, 30_000, 2, seed=3)  # the loaded index goes on from the deltas it replayed
    assert save_changes(directory, loaded, added=added).name == "d000004.delta"
    assert_same_items(load_index(directory), loaded)


def test_every_compact_every_changes_a_full_save_starts_a_version_without_deltas(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "COMPACT_EVERY", 2)
    directory = tmp_path / "idx"
    items = make_items(n=50)
    save_index(directory, items)
    paths = [save_changes(directory, items, added=add_some(items, 1000 + 10 * i, 2, seed=i)) for i in range(5)]
    assert [p.name for p in paths] == ["d000001.delta", "d000002.delta", "v000002", "d000001.delta", "d000002.delta"]
    assert committed_version(directory).name == "v000002" and len(version_files(directory)) == 4
    assert_same_items(load_index(directory), items)
    save_index(directory, items)  # an explicit save compacts too
    assert version_files(directory) == ["v000003/index.faiss", "v000003/meta.h5"]
    assert_same_items(load_index(directory), items)


def test_a_damaged_or_missing_delta_is_refused_with_its_name(tmp_path):
    directory = tmp_path / "idx"
    items = make_items(n=40)
    save_index(directory, items)
    for i in range(2):
        save_changes(directory, items, added=add_some(items, 500 + 10 * i, 2, seed=i))
    second = committed_version(directory) / "d000002.delta"
    data = bytearray(second.read_bytes())
    data[-5] ^= 1
    second.write_bytes(bytes(data))
    with pytest.raises(IndexMismatchError, match="d000002.delta is damaged"):
        load_index(directory)
    (committed_version(directory) / "d000001.delta").unlink()
    with pytest.raises(IndexMismatchError, match=r"not numbered 1..1; one is missing"):
        load_index(directory)


def test_a_change_on_top_of_another_writers_save_is_saved_in_full(tmp_path):
    """Two loaded copies change one directory: the second cannot extend a state it has not seen."""
    directory = tmp_path / "idx"
    save_index(directory, make_items(n=40))
    first, second = load_index(directory), load_index(directory)
    save_changes(directory, first, added=add_some(first, 900, 1, seed=1))
    assert save_changes(directory, second, added=add_some(second, 950, 2, seed=2)).name == "v000002"
    assert_same_items(load_index(directory), second)
    fresh = make_items(n=10)  # never saved here: also a full save
    assert save_changes(directory, fresh, added=[]).name == "v000003"


def test_a_crash_at_any_step_of_a_delta_leaves_the_change_whole_or_absent(tmp_path):
    directory = tmp_path / "idx"
    step = 0
    while True:
        items = make_items(n=30)
        save_index(directory, items)
        before = load_index(directory)
        changed = load_index(directory)
        added = add_some(changed, 700, 2, seed=4)
        crashed = crashes_at_step(step, lambda: save_changes(directory, changed, added=added))
        loaded = load_index(directory)
        assert_same_items(loaded, changed if loaded.index.contains(700) else before)
        if not crashed:
            break
        step += 1
    assert step >= 3  # the file's fsync, the rename, the directory's fsync


DELTA_CHILD = textwrap.dedent(
    """
    import sys, types
    sys.modules["torch"] = types.ModuleType("torch")  # saving never touches torch; skip its slow import
    import numpy as np
    from vdsh.index import store
    from vdsh.index.hamming_index import HammingIndex
    from vdsh.index.items import ItemIndex
    from vdsh.index.store import load_index, save_changes, save_index
    store.COMPACT_EVERY = 7  # compactions happen during the run too
    directory = sys.argv[1]
    items = load_index(directory)
    codes = np.random.default_rng(1).integers(0, 256, (5000, 8), dtype=np.uint8)
    for i in range(len(items), 5000):
        items.add(codes[i : i + 1], [i], sources=[f"item-{i}"], thumbnails=[np.full((4, 4, 1), i % 256, np.uint8)])
        save_changes(directory, items, added=[i])
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_killing_a_process_that_saves_changes_leaves_every_committed_item_whole(tmp_path):
    """SIGKILL a process committing one item at a time: each acknowledged item survives, whole."""
    directory = tmp_path / "idx"
    items = ItemIndex(HammingIndex(64, "flat"), model_id="m")
    items.add(np.zeros((1, 8), np.uint8), [0], sources=["item-0"], thumbnails=[np.zeros((4, 4, 1), np.uint8)])
    save_index(directory, items)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.05, 0.13, 0.29):
        child = subprocess.Popen([sys.executable, "-c", DELTA_CHILD, str(directory)], env=env, stdout=subprocess.PIPE)
        acknowledged = int(child.stdout.readline())
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        acknowledged = max([acknowledged] + [int(line) for line in child.stdout.read().split()])
        child.stdout.close()
        loaded = load_index(directory)
        n = len(loaded)
        assert acknowledged < n <= acknowledged + 2  # every acknowledged item, at most the one in flight
        np.testing.assert_array_equal(loaded.index.ids, np.arange(n))
        assert loaded.sources == [f"item-{i}" for i in range(n)]
        assert [int(t[0, 0, 0]) for t in loaded.thumbnails[1:]] == [i % 256 for i in range(1, n)]


def test_labels_and_sources_stay_readable_while_a_full_save_writes(tmp_path, monkeypatch):
    """A full save copies what it writes under the lock, then writes without it: readers do not wait."""
    import threading

    items = make_items(n=100)
    writing, release = threading.Event(), threading.Event()
    real_write_meta = store._write_meta

    def slow_write_meta(*args):
        writing.set()
        assert release.wait(10)
        real_write_meta(*args)

    monkeypatch.setattr(store, "_write_meta", slow_write_meta)
    saver = threading.Thread(target=save_index, args=(tmp_path / "idx", items))
    saver.start()
    assert writing.wait(10)
    answers = []
    reader = threading.Thread(target=lambda: answers.append(items.sources_of([7])))
    reader.start()
    reader.join(5)
    answered_during_the_save = not reader.is_alive()
    release.set()
    saver.join(10)
    reader.join(10)
    assert answered_during_the_save and answers == [["cifar10:1"]]
    assert_same_items(load_index(tmp_path / "idx"), items)


def test_add_latency_times_every_way_of_committing_a_change(tmp_path):
    from vdsh.index.bench import add_latency

    result = add_latency(300, adds=6, full_saves=2, thumbnail_side=8, directory=tmp_path)
    assert {name: row["count"] for name, row in result.items()} == {"add, full save": 2, "add, delta": 6,
                                                                  "delete, delta": 1, "load": 1}
    for row in result.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] and row["mean_ms"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary index is gone


def test_the_next_id_outlives_deletes_deltas_and_full_saves(tmp_path):
    items = make_items(30)  # ids 0, 7, ..., 203
    assert items.next_id() == 204
    save_index(tmp_path, items)
    top = np.array([203], dtype=np.int64)
    items.remove(top)
    save_changes(tmp_path, items, removed=top)
    assert load_index(tmp_path).next_id() == 204  # the full save recorded it; the largest id is now 196
    items.add(items.index.get_codes([0]), np.array([204]))
    save_changes(tmp_path, items, added=[204])
    items.remove(np.array([204]))
    save_changes(tmp_path, items, removed=[204])
    assert load_index(tmp_path).next_id() == 205  # replayed from the deltas alone
    save_index(tmp_path, items)
    assert load_index(tmp_path).next_id() == 205


def test_an_index_saved_before_the_next_id_existed_still_loads(tmp_path):
    save_index(tmp_path, make_items(30))
    with h5py.File(committed_version(tmp_path) / store.META_FILE, "r+") as f:
        del f.attrs["next_id"]  # as older vdsh wrote it
    assert load_index(tmp_path).next_id() == 204
