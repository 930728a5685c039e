"""The item index kept in a Milvus collection: the same read and write surface as `ItemIndex`, served by
Milvus, so that several `vdsh serve` processes (on several machines) share one collection.

A collection is named by a URI ``milvus://HOST:PORT/COLLECTION``, optionally ``?consistency=LEVEL``; a token
for a secured cluster comes from ``VDSH_MILVUS_TOKEN``. One row per item:

    id         INT64, primary key (vdsh's item id)
    code       BINARY_VECTOR, dim = 8 x bytes a row: vdsh's packed bytes as they are (most significant bit
               first, bit 1 = +1, padding bits zero), so Milvus's HAMMING distance is vdsh's distance
    labels     VARCHAR, the class indices of the multi-hot row, comma-separated ("3" or "0,7")
    source     VARCHAR
    thumbnail  VARCHAR, "H,W,C:" then the uint8 pixels in base64 ("" when none)

The collection's description holds the facts `ItemIndex` keeps beside its codes (JSON: format, bits, model
id, class names). The vector index is BIN_FLAT (exact) below `IVF_FROM` items and BIN_IVF_FLAT
(approximate, nprobe = nlist / 16 unless set) from there on (`choose_index`); BENCHMARKS.md, "Milvus
beside vdsh's flat index", has both.

Reads use consistency level Strong by default: a search or look-up sees every write that any process had
finished before it began, so one process's POST /items is found by the next search of another. Strong
costs latency: Milvus waits for its next time tick (200 ms apart by default) before answering.
``?consistency=Bounded`` (or Session, Eventually) answers at once from what it has, possibly seconds
stale for other processes' writes (BENCHMARKS.md shows both). Writes are durable once Milvus acknowledges
them (its write-ahead log; the tests kill the server and find them); `flush` seals them into segments.

Ties: Milvus returns items at equal distance in an order of its own (segment and row inside it, not
insertion order), and at the cut-off distance it may keep other tied items than vdsh would. We sort each
answer by (distance, id), which is vdsh's own order wherever ids grow with insertion (every index that
`vdsh index build` writes: ids 0..n-1), so answers equal vdsh's except which tied items make the cut at
the k-th distance. Rankings cut at k (mAP@k, P@k) can move by the relevance of those items; mAP@all,
which ranks everything, cannot be computed through a top-k store at all (Milvus's top-k is at most 16,384).
The module is over 400 lines on purpose: the collection's schema, its writer and its reader stay in one module, so
that every field written has its reader beside it (as vdsh.index.store does for index directories).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import numpy as np

from vdsh.index.codes import as_multi_hot, code_bytes

SCHEME = "milvus://"
FORMAT = "vdsh-milvus"
FORMAT_VERSION = 1
IVF_FROM = 1_000_000  # items from which export builds BIN_IVF_FLAT instead of exact BIN_FLAT
# Milvus builds one IVF per sealed segment (hundreds of thousands of rows here): more lists than ~4 sqrt(rows)
# of a segment only slow its k-means down, to impractical build times at 1 M codes
NLIST_MAX = 1024
MAX_TOPK = 16_384  # Milvus's limit on k (and on offset + limit of a query)
SOURCE_MAX = 4096
LABELS_MAX = 4096
THUMBNAIL_MAX = 65_535  # VARCHAR's limit; a 64 x 64 x 3 thumbnail takes 16,392 characters
INSERT_BATCH = 1000  # rows a request with thumbnails (~16 MB, under gRPC's 64 MB message limit)
INSERT_BATCH_BARE = 10_000  # rows a request without thumbnails
CONSISTENCY = "Strong"
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")


class MilvusUnavailable(OSError):
    """Milvus could not be reached, or refused a write (the write did not happen)."""


def is_milvus_uri(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class MilvusTarget:
    """Where a collection lives: the server's address and the collection's name."""

    address: str  # http://HOST:PORT, what pymilvus connects to
    collection: str
    consistency: str = CONSISTENCY

    @classmethod
    def parse(cls, uri: str) -> "MilvusTarget":
        parsed = urlparse(uri)
        name = parsed.path.strip("/")
        options = parse_qs(parsed.query)
        consistency = options.pop("consistency", [CONSISTENCY])[-1]
        if options or consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"the only option of a milvus:// URI is ?consistency= one of {', '.join(CONSISTENCY_LEVELS)}, "
                             f"got {parsed.query!r}")
        if parsed.scheme != "milvus" or not parsed.hostname or not name or "/" in name:
            raise ValueError(f"a Milvus index is named milvus://HOST:PORT/COLLECTION, got {uri!r}")
        if not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"a Milvus collection name has letters, digits and '_' and starts with a letter or '_', got {name!r}")
        return cls(f"http://{parsed.hostname}:{parsed.port or 19530}", name, consistency)


def choose_index(items: int) -> tuple[str, int]:
    """(index type, nlist): exact BIN_FLAT below IVF_FROM items, else BIN_IVF_FLAT with nlist_for(items) lists."""
    if items < IVF_FROM:
        return "BIN_FLAT", 0
    return "BIN_IVF_FLAT", nlist_for(items)


def nlist_for(items: int) -> int:
    """IVF lists: 4 sqrt(items), at most NLIST_MAX."""
    return int(min(NLIST_MAX, max(1, 4 * np.sqrt(items))))


def connect(address: str):
    """A pymilvus client; ImportError with the install line when pymilvus is missing."""
    try:
        from pymilvus import MilvusClient
    except ImportError as error:
        raise ImportError("a milvus:// index needs pymilvus: pip install 'vdsh[milvus]'") from error
    try:
        return MilvusClient(uri=address, token=os.environ.get("VDSH_MILVUS_TOKEN", ""))
    except Exception as error:  # pymilvus raises its own MilvusException for an unreachable server
        raise MilvusUnavailable(f"cannot reach Milvus at {address}: {error}") from error


class MilvusItems:
    """An item index in a Milvus collection, with the surface the server and `vdsh query` use:
    search, range_search, labels_of, sources_of, codes_of, thumbnail_of, contains, next_id, add, remove."""

    def __init__(self, client, target: MilvusTarget, facts: dict):
        self.client, self.target = client, target
        self.bits = int(facts["bits"])
        self.nbytes = code_bytes(self.bits)
        self.model_id = str(facts["model_id"])
        self.class_names = list(facts["class_names"])
        index = self._call(client.describe_index, target.collection, "code")
        self.index_type = str(index["index_type"])
        self.nprobe = default_nprobe(int(index.get("nlist", 0)))  # searched lists; 0 for BIN_FLAT
        self._largest_id = -1  # a lower bound of the largest stored id, raised by next_id

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, uri: str, model_id: str | None = None, bits: int | None = None) -> "MilvusItems":
        """An existing collection; ValueError when it is missing, not vdsh's, or for another model or length."""
        target = MilvusTarget.parse(uri)
        client = connect(target.address)
        if not client.has_collection(target.collection):
            raise ValueError(f"no collection {target.collection!r} in Milvus at {target.address}; "
                             "create it with vdsh index export --to " + uri)
        facts = _read_facts(client, target)
        if bits is not None and int(facts["bits"]) != bits:
            raise ValueError(f"code length differs: {uri} holds {facts['bits']}-bit codes, expected {bits} bits")
        if model_id is not None and facts["model_id"] and facts["model_id"] != model_id:
            raise ValueError(f"model differs: {uri} was built with model {facts['model_id']!r}, expected {model_id!r}")
        items = cls(client, target, facts)
        client.load_collection(target.collection)
        return items

    @classmethod
    def create(cls, uri: str, bits: int, model_id: str, class_names: Sequence[str], expected_items: int,
               replace: bool = False, index_type: str = "auto") -> "MilvusItems":
        """A new empty collection (ValueError if there is one, unless `replace`), indexed for
        `expected_items` items: `choose_index` when `index_type` is "auto"."""
        from pymilvus import DataType, MilvusClient

        target = MilvusTarget.parse(uri)
        client = connect(target.address)
        if client.has_collection(target.collection):
            if not replace:
                raise ValueError(f"collection {target.collection!r} already exists in Milvus at {target.address}; "
                                 "pass --replace to drop it first")
            client.drop_collection(target.collection)
        auto_type, nlist = choose_index(expected_items)
        index_type = auto_type if index_type == "auto" else index_type
        if index_type not in ("BIN_FLAT", "BIN_IVF_FLAT"):
            raise ValueError(f"index type must be auto, BIN_FLAT or BIN_IVF_FLAT, got {index_type!r}")
        if index_type == "BIN_IVF_FLAT":
            nlist = nlist or nlist_for(expected_items)
        facts = {"format": FORMAT, "format_version": FORMAT_VERSION, "bits": bits, "model_id": model_id,
                 "class_names": list(class_names)}
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=json.dumps(facts))
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=8 * code_bytes(bits))
        schema.add_field("labels", DataType.VARCHAR, max_length=LABELS_MAX)
        schema.add_field("source", DataType.VARCHAR, max_length=SOURCE_MAX)
        schema.add_field("thumbnail", DataType.VARCHAR, max_length=THUMBNAIL_MAX)
        client.create_collection(target.collection, schema=schema, index_params=_index_params(client, index_type, nlist),
                                 consistency_level=CONSISTENCY)
        client.load_collection(target.collection)
        return cls(client, target, facts)

    # -------------------------------------------------------------- facts

    def __len__(self) -> int:
        rows = self._call(self.client.query, self.target.collection, filter="", output_fields=["count(*)"],
                          consistency_level=self.target.consistency)
        return int(rows[0]["count(*)"])

    @property
    def kind(self) -> str:
        return f"milvus {self.index_type}"

    # ------------------------------------------------------------ reading

    def search(self, queries: np.ndarray, k: int, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """ids (q, k) int64 and distances (q, k) int32 by (distance, id), -1 past the last item; `device`
        is ignored (Milvus decides)."""
        queries = self._check_codes(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be an integer in [1, {MAX_TOPK}] for Milvus, got {k!r}")
        ids = np.full((len(queries), k), -1, np.int64)
        dists = np.full((len(queries), k), -1, np.int32)
        for row, (found, found_d) in enumerate(self._search(queries, int(k))):
            ids[row, : len(found)], dists[row, : len(found)] = found, found_d
        return ids, dists

    def range_search(self, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, the items within Hamming distance `radius` (inclusive) by (distance, id); at most
        MAX_TOPK of them (Milvus's top-k limit), the nearest."""
        queries = self._check_codes(queries)
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or not 0 <= radius <= self.bits:
            raise ValueError(f"radius must be an integer in [0, {self.bits}], got {radius!r}")
        return [(found[d <= radius], d[d <= radius]) for found, d in self._search(queries, MAX_TOPK)]

    def contains(self, item_id: int) -> bool:
        return bool(self._rows([item_id], ["id"]))

    def codes_of(self, ids) -> np.ndarray:
        rows = self._ordered_rows(ids, ["code"])
        codes = np.frombuffer(b"".join(_code_bytes(r["code"]) for r in rows), np.uint8)
        return codes.reshape(len(rows), self.nbytes)

    def labels_of(self, ids) -> np.ndarray:
        rows = self._ordered_rows(ids, ["labels"])
        out = np.zeros((len(rows), len(self.class_names)), np.uint8)
        for i, row in enumerate(rows):
            out[i, [int(j) for j in row["labels"].split(",") if j]] = 1
        return out

    def sources_of(self, ids) -> list[str]:
        return [row["source"] for row in self._ordered_rows(ids, ["source"])]

    def thumbnail_of(self, item_id: int) -> np.ndarray | None:
        return _decode_thumbnail(self._ordered_rows([item_id], ["thumbnail"])[0]["thumbnail"])

    def next_id(self) -> int:
        """One more than the largest stored id (0 when empty). Two processes adding at the same moment
        without ids can draw the same one: give ids, or add through one process, where that matters."""
        while True:  # a query is at most MAX_TOPK rows in no set order: raise the bound until none is above
            rows = self._rows_where(f"id > {self._largest_id}", ["id"], MAX_TOPK)
            if not rows:
                return self._largest_id + 1
            self._largest_id = max(int(r["id"]) for r in rows)

    # ------------------------------------------------------------ writing

    def add(self, codes, ids, labels=None, sources=None, thumbnails=None,
            progress: Callable[[int], None] | None = None) -> None:
        """Insert items in batches (`progress(rows)` after each); ValueError for ids that
        repeat or are taken, wrong code widths or fields too long. Not atomic across batches."""
        codes = self._check_codes(codes)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(codes)
        labels = np.zeros((n, len(self.class_names)), np.uint8) if labels is None else np.asarray(labels)
        labels = as_multi_hot(labels, n_classes=len(self.class_names)) if labels.ndim == 1 else labels
        sources = [""] * n if sources is None else [str(s) for s in sources]
        thumbnails = [None] * n if thumbnails is None else list(thumbnails)
        for name, count in (("ids", len(ids)), ("label rows", len(labels)), ("sources", len(sources)),
                            ("thumbnails", len(thumbnails))):
            if count != n:
                raise ValueError(f"{n} codes but {count} {name}")
        if len(np.unique(ids)) != n or (ids < 0).any():
            raise ValueError("ids must be unique and >= 0")
        if len(labels) and labels.shape[1] != len(self.class_names):
            raise ValueError(f"labels have {labels.shape[1]} classes, the collection has {len(self.class_names)}")
        batch = INSERT_BATCH if any(t is not None for t in thumbnails) else INSERT_BATCH_BARE
        for start in range(0, n, batch):
            part = slice(start, min(n, start + batch))
            taken = self._rows_where(f"id in {ids[part].tolist()}", ["id"], batch)
            if taken:  # Milvus would store a second row under the same primary key
                raise ValueError(f"ids already in {self.target.collection}: {sorted(int(r['id']) for r in taken)[:5]}")
            rows = [_row(int(i), c, lab, s, t) for i, c, lab, s, t in
                    zip(ids[part], codes[part], labels[part], sources[part], thumbnails[part])]
            self._call(self.client.insert, self.target.collection, rows)
            if progress is not None:
                progress(len(rows))

    def remove(self, ids) -> int:
        """Delete items; KeyError naming unknown ids (then nothing is deleted)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        self._ordered_rows(ids, ["id"])  # KeyError for unknown ids
        self._call(self.client.delete, self.target.collection, filter=f"id in {ids.tolist()}")
        return len(ids)

    def rebuild_index(self, index_type: str, nlist: int = 0) -> None:
        """Replace the vector index (BIN_FLAT, or BIN_IVF_FLAT with `nlist` lists); the collection is
        released meanwhile (searches fail) and Milvus builds the new index in the background (`indexed_rows`)."""
        name = self.target.collection
        self._call(self.client.release_collection, name)
        self._call(self.client.drop_index, name, "code")
        self._call(self.client.create_index, name, _index_params(self.client, index_type, nlist))
        self._call(self.client.load_collection, name)
        self.index_type, self.nprobe = index_type, default_nprobe(nlist if index_type == "BIN_IVF_FLAT" else 0)

    def indexed_rows(self) -> int:
        """Rows that Milvus has put in the vector index so far (the rest it searches by brute force)."""
        return int(self._call(self.client.describe_index, self.target.collection, "code").get("indexed_rows", 0))

    def flush(self) -> None:
        """Seal what was inserted into segments (written to storage and indexed)."""
        self._call(self.client.flush, self.target.collection)

    # ---------------------------------------------------------- internals

    def _search(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        params = {"metric_type": "HAMMING", "params": {"nprobe": self.nprobe} if self.nprobe else {}}
        answers = self._call(self.client.search, self.target.collection, data=[q.tobytes() for q in queries],
                             anns_field="code", limit=k, search_params=params,
                             consistency_level=self.target.consistency)
        out = []
        for hits in answers:
            found = np.array([hit["id"] for hit in hits], np.int64)
            dists = np.array([hit["distance"] for hit in hits], np.float64).round().astype(np.int32)
            order = np.lexsort((found, dists))  # by distance, ties by id
            out.append((found[order], dists[order]))
        return out

    def _rows_where(self, expression: str, fields: list[str], limit: int) -> list[dict]:
        return self._call(self.client.query, self.target.collection, filter=expression, output_fields=fields,
                          limit=limit, consistency_level=self.target.consistency)

    def _rows(self, ids, fields: list[str]) -> list[dict]:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows: list[dict] = []
        for start in range(0, len(ids), MAX_TOPK):
            part = ids[start : start + MAX_TOPK].tolist()
            rows += self._rows_where(f"id in {part}", ["id", *fields], len(part))
        return rows

    def _ordered_rows(self, ids, fields: list[str]) -> list[dict]:
        """The rows of `ids` in that order; KeyError naming unknown ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        by_id = {int(r["id"]): r for r in self._rows(np.unique(ids), fields)}
        missing = [int(i) for i in ids if int(i) not in by_id]
        if missing:
            raise KeyError(f"unknown ids: {missing[:5]}")
        return [by_id[int(i)] for i in ids]

    def _check_codes(self, codes) -> np.ndarray:
        codes = np.ascontiguousarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.nbytes:
            raise ValueError(f"packed codes of {self.bits} bits are uint8 rows of {self.nbytes} bytes, "
                             f"got {codes.dtype} {codes.shape}")
        return codes

    def _call(self, method, *args, **kwargs):
        """A pymilvus call; its errors become MilvusUnavailable (an OSError: the server answers 503)."""
        from pymilvus.exceptions import MilvusException

        try:
            return method(*args, **kwargs)
        except MilvusException as error:
            raise MilvusUnavailable(f"Milvus at {self.target.address} ({self.target.collection}): {error}") from error


def default_nprobe(nlist: int) -> int:
    return max(1, nlist // 16) if nlist else 0


def _index_params(client, index_type: str, nlist: int):
    params = client.prepare_index_params()
    params.add_index(field_name="code", index_name="code", index_type=index_type, metric_type="HAMMING",
                     params={"nlist": nlist} if index_type == "BIN_IVF_FLAT" else {})
    return params


def _read_facts(client, target: MilvusTarget) -> dict:
    description = client.describe_collection(target.collection).get("description", "")
    try:
        facts = json.loads(description)
    except json.JSONDecodeError:
        facts = {}
    if not isinstance(facts, dict) or facts.get("format") != FORMAT:
        raise ValueError(f"collection {target.collection!r} at {target.address} was not written by vdsh "
                         "(its description is not vdsh's); export an index to it with vdsh index export")
    if int(facts.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"collection {target.collection!r} has vdsh format {facts['format_version']}; "
                         f"this vdsh reads up to {FORMAT_VERSION}")
    return facts


def _row(item_id: int, code: np.ndarray, labels: np.ndarray, source: str, thumbnail) -> dict:
    if len(source) > SOURCE_MAX:
        raise ValueError(f"item {item_id}: source is {len(source)} characters, Milvus stores at most {SOURCE_MAX}")
    return {"id": item_id, "code": code.tobytes(), "labels": ",".join(map(str, np.flatnonzero(labels))),
            "source": source, "thumbnail": _encode_thumbnail(thumbnail)}


def _code_bytes(value) -> bytes:
    """pymilvus returns a binary vector as bytes, or as a one-element list of bytes."""
    return value[0] if isinstance(value, list) else bytes(value)


def _encode_thumbnail(thumbnail) -> str:
    if thumbnail is None:
        return ""
    thumbnail = np.asarray(thumbnail, dtype=np.uint8)
    thumbnail = thumbnail[..., None] if thumbnail.ndim == 2 else thumbnail
    text = ",".join(map(str, thumbnail.shape)) + ":" + base64.b64encode(thumbnail.tobytes()).decode()
    if len(text) > THUMBNAIL_MAX:
        raise ValueError(f"a thumbnail of shape {thumbnail.shape} is too large for Milvus (vdsh.data.transforms.thumbnail)")
    return text


def _decode_thumbnail(text: str) -> np.ndarray | None:
    if not text:
        return None
    shape, data = text.split(":", 1)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape([int(s) for s in shape.split(",")])


def export_items(items, uri: str, replace: bool = False, index_type: str = "auto",
                 progress: Callable[[int], None] | None = None) -> MilvusItems:
    """Copy an `ItemIndex` (codes, ids, labels, sources, thumbnails, model id, classes) into a new
    collection, in its insertion order, then flush; the collection answers as the index does (ties aside)."""
    target = MilvusItems.create(uri, items.bits, items.model_id, items.class_names, len(items), replace, index_type)
    ids = items.index.ids
    for start in range(0, len(ids), INSERT_BATCH):
        part = ids[start : start + INSERT_BATCH]
        target.add(items.codes_of(part), part, labels=items.labels_of(part), sources=items.sources_of(part),
                   thumbnails=[items.thumbnail_of(int(i)) for i in part])
        if progress is not None:
            progress(len(part))
    target.flush()
    return target
