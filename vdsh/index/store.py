"""The on-disk format of an `ItemIndex` (`vdsh.index.items`): an index directory, saved atomically.

Layout of a saved directory::

    <dir>/CURRENT                 the committed version's name, e.g. "v000003"
    <dir>/v000003/index.faiss     IndexBinaryIDMap2 with the real ids: plain `faiss.read_index_binary` reads it
    <dir>/v000003/meta.h5         ids, codes, labels (multi-hot), sources, thumbnails, model id, bits, kind,
                                  the next id (above every id ever held, so deleted ids are never reused;
                                  absent in older files, where it is read as the largest id + 1),
                                  and the FAISS file's SHA-256 so that a mixed pair is caught
    <dir>/v000003/d000001.delta   changes since that full save, one file per commit (items added or
    <dir>/v000003/d000002.delta   removed), each checksummed; replayed in order on load
    <dir>/v000002/...             the previous version, kept so that a reader who just read CURRENT can finish

A full save (`save_index`) writes the new version into a temporary sibling (``.tmp-*``), fsyncs every
file and the directory, renames it to its version name, then replaces CURRENT (write ``CURRENT.tmp``,
fsync, rename). CURRENT names a complete version before and after every step, so a crash at any point
leaves the old index or the new one, never a broken one; leftovers of a crashed save are removed by
the next.

A small change (`save_changes`: the server's POST /items and DELETE /items) is one delta file instead
of a full save: written to a temporary name, fsynced, renamed to the next sequence number, and the
directory fsynced. The rename is the commit: a crash leaves the change wholly there or wholly absent.
Every `COMPACT_EVERY` deltas (and at any explicit `save_index`) the state is saved in full again, which
starts a version with no deltas, so loading never replays more than that many; that one change waits
for the full save, searches meanwhile go on (both costs: BENCHMARKS.md, "Index changes").
The module is over 400 lines on purpose: the directory format's writer and reader (full versions and delta files)
are one module, so that every field written has its reader beside it; the in-memory side is vdsh.index.items.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vdsh.files import file_sha256, fsync_dir, fsync_file
from vdsh.index.hamming_index import KINDS, HammingIndex
from vdsh.index.items import ItemIndex

FORMAT = "vdsh-index"
FORMAT_VERSION = 1
FAISS_FILE = "index.faiss"
META_FILE = "meta.h5"
POINTER_FILE = "CURRENT"
LOCK_FILE = ".lock"
# deltas on top of a full save before the next change is saved in full: spread over this many changes, a
# full save (thumbnails and all) costs each about what writing its own delta does (BENCHMARKS.md, "Index
# changes"); loading replays at most this many small files, as one add
COMPACT_EVERY = 256
DELTA_MAGIC = b"VDSH-DELTA-1\n"
_VERSION = re.compile(r"^v(\d{6,})$")
_DELTA = re.compile(r"^d(\d{6,})\.delta$")
# a delta file: DELTA_MAGIC, the SHA-256 of the rest, then these arrays as .npy records in this order
_DELTA_FIELDS = ("removed", "ids", "codes", "labels", "sources", "thumbnail_shapes", "thumbnail_offsets", "thumbnail_data")
_OURS = re.compile(r"^(v\d{6,}|\.tmp-.*|CURRENT|CURRENT\.tmp|\.lock)$")


class IndexMismatchError(ValueError):
    """The FAISS file, the metadata, or what the caller expects disagree."""


# ------------------------------------------------------------------ saving


@dataclass(frozen=True)
class _DiskState:
    """Where an ItemIndex's state is saved: a directory's version plus its first `deltas` delta files."""

    directory: Path
    version: str
    deltas: int


# the saved state each ItemIndex extends (what `save_changes` appends a delta to), kept here so that the
# in-memory ItemIndex knows nothing of files; an entry goes with its ItemIndex
_SAVED: weakref.WeakKeyDictionary[ItemIndex, _DiskState] = weakref.WeakKeyDictionary()


def save_index(directory: str | Path, item_index: ItemIndex) -> Path:
    """Commit `item_index` as the directory's new version (atomic); returns the version's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(directory)
    with _writer_lock(directory):
        return _save_version(directory, item_index)


def save_changes(directory: str | Path, item_index: ItemIndex, added: Sequence[int] = (), removed: Sequence[int] = ()) -> Path:
    """Persist `added` and `removed` ids, already applied to `item_index`, as one delta file; returns its path.

    A delta extends the saved state `item_index` was loaded from or last saved to; when the directory
    holds another state (or none), or already `COMPACT_EVERY` deltas, this is a full save instead.
    """
    directory = Path(directory)
    added, removed = np.asarray(added, dtype=np.int64), np.asarray(removed, dtype=np.int64)
    if directory.is_dir():
        with _writer_lock(directory):
            state = _SAVED.get(item_index)
            if _extends(directory, state) and state.deltas < COMPACT_EVERY:
                with item_index.lock:
                    payload = _delta_payload(item_index, added, removed)
                path = _write_delta(directory / state.version, state.deltas + 1, payload)
                _SAVED[item_index] = _DiskState(state.directory, state.version, state.deltas + 1)
                return path
    return save_index(directory, item_index)


def _save_version(directory: Path, item_index: ItemIndex) -> Path:
    """The body of `save_index`, under the writer lock."""
    previous = _read_pointer(directory)
    version = f"v{_next_version(directory):06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=directory))
    try:
        _write_version(staging, _Snapshot.of(item_index))
        os.rename(staging, directory / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(directory)
    _write_pointer(directory, version)
    _remove_stale(directory, keep={version, previous})
    _SAVED[item_index] = _DiskState(directory.resolve(), version, 0)
    return directory / version


def _extends(directory: Path, state: _DiskState | None) -> bool:
    """Whether the directory's committed state is exactly `state` (no other writer saved since)."""
    if state is None or state.directory != directory.resolve():
        return False
    try:
        current = _read_pointer(directory)
    except FileNotFoundError:
        return False
    return current == state.version and _delta_numbers(directory / current) == list(range(1, state.deltas + 1))


def _delta_payload(item_index: ItemIndex, added: np.ndarray, removed: np.ndarray) -> bytes:
    """The added items (code, labels, source, thumbnail) and removed ids: a delta file's payload."""
    rows = item_index.index.rows_of(added) if len(added) else np.empty(0, np.int64)
    shapes, offsets, data = _pack_thumbnails([item_index.thumbnails[r] for r in rows])
    arrays = {
        "removed": removed,
        "ids": added,
        "codes": item_index.index.get_codes(added) if len(added) else np.empty((0, item_index.index.nbytes), np.uint8),
        "labels": item_index.labels[rows],
        "sources": np.array([item_index.sources[r] for r in rows], dtype=str),
        "thumbnail_shapes": shapes,
        "thumbnail_offsets": offsets,
        "thumbnail_data": data,
    }
    buffer = io.BytesIO()
    for name in _DELTA_FIELDS:  # .npy records back to back: a zip (np.savez) costs far more a commit
        np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def _write_delta(version_dir: Path, number: int, payload: bytes) -> Path:
    """Commit one delta: temporary file, fsync, rename to its number (the commit point), fsync the directory."""
    for leftover in os.listdir(version_dir):  # of a writer killed before its rename
        if leftover.startswith(".tmp-"):
            (version_dir / leftover).unlink(missing_ok=True)
    path = version_dir / f"d{number:06d}.delta"
    tmp = version_dir / f".tmp-{path.name}"
    with open(tmp, "wb") as f:
        f.write(DELTA_MAGIC + hashlib.sha256(payload).digest() + payload)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(version_dir)
    return path


@dataclass(frozen=True)
class _Snapshot:
    """What a full save writes, copied under the ItemIndex's lock (array copies) so that the writing
    (every thumbnail, far slower) runs without it and searches, which read labels, go on."""

    faiss_index: faiss.IndexBinary  # `HammingIndex.to_faiss`: a copy
    bits: int
    kind: str
    params: dict[str, int]
    model_id: str
    class_names: list[str]
    next_id: int
    ids: np.ndarray
    codes: np.ndarray
    labels: np.ndarray  # replaced, never changed in place, by ItemIndex
    sources: list[str]
    thumbnails: list[np.ndarray | None]

    @classmethod
    def of(cls, item_index: ItemIndex) -> "_Snapshot":
        with item_index.lock:
            index = item_index.index
            return cls(index.to_faiss(), index.bits, index.kind, index.params, item_index.model_id,
                       list(item_index.class_names), item_index.next_id(), index.ids, index.codes, item_index.labels,
                       list(item_index.sources), list(item_index.thumbnails))


def _write_version(staging: Path, snapshot: _Snapshot) -> None:
    faiss_path = staging / FAISS_FILE
    faiss.write_index_binary(snapshot.faiss_index, str(faiss_path))
    fsync_file(faiss_path)
    _write_meta(staging / META_FILE, snapshot, file_sha256(faiss_path))
    fsync_file(staging / META_FILE)
    fsync_dir(staging)


def _write_meta(path: Path, snapshot: _Snapshot, faiss_sha256: str) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            bits=snapshot.bits,
            kind=snapshot.kind,
            model_id=snapshot.model_id,
            count=len(snapshot.ids),
            next_id=snapshot.next_id,
            faiss_file=FAISS_FILE,
            faiss_sha256=faiss_sha256,
        )
        for name, value in snapshot.params.items():
            f.attrs[f"param_{name}"] = value
        f.create_dataset("ids", data=snapshot.ids)
        f.create_dataset("codes", data=snapshot.codes)
        f.create_dataset("labels", data=snapshot.labels)
        f.create_dataset("class_names", data=np.array(snapshot.class_names, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("sources", data=np.array(snapshot.sources, dtype=object), dtype=h5py.string_dtype())
        shapes, offsets, data = _pack_thumbnails(snapshot.thumbnails)
        f.create_dataset("thumbnails/shapes", data=shapes)
        f.create_dataset("thumbnails/offsets", data=offsets)
        f.create_dataset("thumbnails/data", data=data)


def _pack_thumbnails(thumbnails: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Variable-size thumbnails as one byte buffer, offsets and (h, w, c) shapes; (0, 0, 0) = none."""
    shapes = np.array([t.shape if t is not None else (0, 0, 0) for t in thumbnails], dtype=np.int32).reshape(-1, 3)
    sizes = shapes.prod(axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    present = [t.ravel() for t in thumbnails if t is not None]
    data = np.concatenate(present) if present else np.empty(0, dtype=np.uint8)
    return shapes, offsets, data


def _write_pointer(directory: Path, version: str) -> None:
    tmp = directory / (POINTER_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / POINTER_FILE)  # the commit point
    fsync_dir(directory)


def _read_pointer(directory: Path) -> str | None:
    """The committed version's name, or None before the first commit."""
    try:
        version = (directory / POINTER_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION.match(version) or not (directory / version).is_dir():
        raise FileNotFoundError(f"{directory / POINTER_FILE} names {version!r}, which is not a version directory here")
    return version


def _remove_stale(directory: Path, keep: set[str | None]) -> None:
    """Drop versions other than `keep` and leftovers of crashed saves; never fails a committed save."""
    for entry in directory.iterdir():
        stale_version = _VERSION.match(entry.name) and entry.name not in keep
        if stale_version or entry.name.startswith(".tmp-"):
            shutil.rmtree(entry, ignore_errors=True)


def _refuse_foreign(directory: Path) -> None:
    foreign = sorted(e.name for e in directory.iterdir() if not _OURS.match(e.name))
    if foreign:
        raise FileExistsError(
            f"{directory} exists and is not a vdsh index directory (it holds {foreign[:3]}); "
            "save to a new or empty directory"
        )


def _next_version(directory: Path) -> int:
    numbers = [int(m.group(1)) for e in directory.iterdir() if (m := _VERSION.match(e.name))]
    return max(numbers, default=0) + 1


@contextlib.contextmanager
def _writer_lock(directory: Path):
    """One writer at a time per directory (advisory lock; readers never wait)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: single-writer is the caller's duty
        yield
        return
    with open(directory / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------- loading


def committed_version(directory: str | Path) -> Path:
    """The directory holding the committed index.faiss and meta.h5 (CURRENT's target, or `directory` itself)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"index directory not found: {directory}")
    version = _read_pointer(directory)
    if version is None:
        if (directory / META_FILE).is_file():  # a bare version directory, e.g. copied out by hand
            return directory
        raise FileNotFoundError(
            f"{directory} holds no committed index (no {POINTER_FILE} file); an interrupted first save leaves this"
        )
    return directory / version


def load_index(directory: str | Path, model_id: str | None = None, bits: int | None = None) -> ItemIndex:
    """Load the committed version and replay its deltas; IndexMismatchError naming what disagrees
    (files, checksums, model, bits)."""
    for attempt in range(3):
        version_dir = committed_version(directory)
        try:
            item_index = _load_version(version_dir, model_id, bits)
            deltas = _replay_deltas(version_dir, item_index)
            if version_dir != Path(directory):  # a bare version directory has no CURRENT to extend
                _SAVED[item_index] = _DiskState(Path(directory).resolve(), version_dir.name, deltas)
            return item_index
        except FileNotFoundError:
            # a writer may have committed and pruned this version since CURRENT was read: read it again
            if attempt == 2 or committed_version(directory) == version_dir:
                raise
    raise AssertionError("unreachable")


def _load_version(version_dir: Path, model_id: str | None, bits: int | None) -> ItemIndex:
    import h5py

    faiss_path, meta_path = version_dir / FAISS_FILE, version_dir / META_FILE
    for path in (faiss_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"index file missing: {path}")
    with h5py.File(meta_path, "r") as f:
        attrs = dict(f.attrs)
        _check_attrs(attrs, meta_path, model_id, bits)
        arrays = {name: f[name][()] for name in ("ids", "codes", "labels")}
        class_names = [s.decode() if isinstance(s, bytes) else s for s in f["class_names"][()]]
        sources = [s.decode() if isinstance(s, bytes) else s for s in f["sources"][()]]
        thumbnails = _unpack_thumbnails(f["thumbnails/shapes"][()], f["thumbnails/offsets"][()], f["thumbnails/data"][()])
    if file_sha256(faiss_path) != attrs["faiss_sha256"]:
        raise IndexMismatchError(f"{faiss_path} is not the FAISS file {meta_path} was saved with (checksum differs)")
    count = int(attrs["count"])
    for name, n in (("ids", len(arrays["ids"])), ("codes", len(arrays["codes"])), ("labels", len(arrays["labels"])),
                    ("sources", len(sources)), ("thumbnails", len(thumbnails))):
        if n != count:
            raise IndexMismatchError(f"{meta_path}: {n} {name} for {count} items")
    try:
        index = HammingIndex.from_faiss(faiss.read_index_binary(str(faiss_path)), int(attrs["bits"]), str(attrs["kind"]), arrays["codes"])
    except ValueError as error:
        raise IndexMismatchError(f"{faiss_path} disagrees with {meta_path}: {error}") from error
    if not np.array_equal(index.ids, arrays["ids"]):
        raise IndexMismatchError(f"the ids in {faiss_path} differ from those in {meta_path}")
    return ItemIndex.restore(index, str(attrs["model_id"]), class_names, arrays["labels"], sources, thumbnails,
                             int(attrs.get("next_id", 0)))


def _delta_numbers(version_dir: Path) -> list[int]:
    """The sequence numbers of the committed deltas in a version directory, ascending."""
    return sorted(int(m.group(1)) for entry in os.listdir(version_dir) if (m := _DELTA.match(entry)))


def _replay_deltas(version_dir: Path, item_index: ItemIndex) -> int:
    """Apply the version's deltas in order; IndexMismatchError for a gap or a damaged file. Returns how many."""
    numbers = _delta_numbers(version_dir)
    if numbers != list(range(1, len(numbers) + 1)):
        raise IndexMismatchError(f"{version_dir}: delta files {numbers} are not numbered 1..{len(numbers)}; one is missing")
    pending: list[dict[str, np.ndarray]] = []  # consecutive additions, applied as one add
    for number in numbers:
        path = version_dir / f"d{number:06d}.delta"
        delta = _read_delta(path)
        try:
            if len(delta["removed"]):
                _add_deltas(item_index, pending)
                pending = []
                item_index.remove(delta["removed"])
            pending.append(delta)
            if number == numbers[-1]:
                _add_deltas(item_index, pending)
        except (KeyError, ValueError) as error:
            raise IndexMismatchError(f"{path} (or a delta just before it) does not apply to the index before it: {error}") from error
    return len(numbers)


def _add_deltas(item_index: ItemIndex, deltas: list[dict[str, np.ndarray]]) -> None:
    """The items added by consecutive deltas, in one add: replaying n deltas costs one copy of the index, not n."""
    deltas = [d for d in deltas if len(d["ids"])]
    if not deltas:
        return
    item_index.add(
        np.concatenate([d["codes"] for d in deltas]),
        np.concatenate([d["ids"] for d in deltas]),
        labels=np.concatenate([d["labels"] for d in deltas]),
        sources=[s for d in deltas for s in d["sources"].tolist()],
        thumbnails=[t for d in deltas for t in _unpack_thumbnails(d["thumbnail_shapes"], d["thumbnail_offsets"], d["thumbnail_data"])],
    )


def _read_delta(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    head, digest, payload = data[: len(DELTA_MAGIC)], data[len(DELTA_MAGIC) : len(DELTA_MAGIC) + 32], data[len(DELTA_MAGIC) + 32 :]
    if head != DELTA_MAGIC:
        raise IndexMismatchError(f"{path} is not a vdsh delta file")
    if hashlib.sha256(payload).digest() != digest:
        raise IndexMismatchError(f"{path} is damaged (checksum differs); restore it or drop it and the deltas after it")
    records = io.BytesIO(payload)
    try:
        return {name: np.lib.format.read_array(records, allow_pickle=False) for name in _DELTA_FIELDS}
    except ValueError as error:
        raise IndexMismatchError(f"{path} has the right checksum but not the fields of a delta: {error}") from error


def _check_attrs(attrs: dict, meta_path: Path, model_id: str | None, bits: int | None) -> None:
    if attrs.get("format") != FORMAT:
        raise IndexMismatchError(f"{meta_path} is not a vdsh index metadata file (format={attrs.get('format')!r})")
    if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
        raise IndexMismatchError(f"{meta_path} has format version {attrs['format_version']}; this vdsh reads up to {FORMAT_VERSION}")
    if str(attrs["kind"]) not in KINDS:
        raise IndexMismatchError(f"{meta_path}: unknown index kind {attrs['kind']!r}")
    if bits is not None and int(attrs["bits"]) != bits:
        raise IndexMismatchError(f"code length differs: the index holds {int(attrs['bits'])}-bit codes, expected {bits} bits")
    if model_id is not None and str(attrs["model_id"]) != model_id:
        raise IndexMismatchError(f"model differs: the index was built with model {attrs['model_id']!r}, expected {model_id!r}")


def _unpack_thumbnails(shapes: np.ndarray, offsets: np.ndarray, data: np.ndarray) -> list[np.ndarray | None]:
    return [
        data[offsets[i] : offsets[i + 1]].reshape(shape) if shape[0] else None
        for i, shape in enumerate(shapes)
    ]
