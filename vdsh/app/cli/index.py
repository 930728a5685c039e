"""`vdsh index build`, `vdsh query` and `vdsh serve`: the offline and serving ends of an index."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import typer

from vdsh.app.items import build_index, load_items
from vdsh.app.cli.protocol_options import (CHANNELS, IMAGE_SIZE, PROTOCOL_HELP, QUERIES_PER_CLASS, TRAIN_PER_CLASS,
                                       model_shape, protocol_options)

DEFAULT_MEMORY_LIMIT_MB = 1536  # vdsh.app.server.app.DEFAULT_MEMORY_LIMIT_MB (not imported: `vdsh --help` stays quick)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; larger gets 400 (uvicorn's h11 limit)
KINDS_HELP = "flat | distinct | auto | hash | multihash | ivf"
index_app = typer.Typer(no_args_is_help=True, help="Build Hamming indexes of a dataset's codes.")












@index_app.command("build")
def build_command(
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="trained model (.safetensors)"),
    out: Path = typer.Option(..., "--out", help="index directory to create or update (atomic)"),
    dataset: str = typer.Option(None, "--dataset", help="a raw dataset: mnist, cifar10, nuswide, mnist-sample, folder:<path>"),
    split: str = typer.Option("all", "--split", help="all | train | test (with --dataset)"),
    protocol: str = typer.Option(None, "--protocol", help=f"index one part of a protocol instead: {PROTOCOL_HELP}"),
    part: str = typer.Option("database", "--part", help="train | query | database (with --protocol)"),
    exclude: list[str] = typer.Option([], "--exclude", help="SPLIT:PART, e.g. runs/x/split.npz:query: leave those items "
                                                            "out (repeatable)"),
    queries_per_class: int = QUERIES_PER_CLASS,
    train_per_class: str = TRAIN_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    channels: int = CHANNELS,
    kind: str = typer.Option("flat", "--kind", help=f"index kind: {KINDS_HELP}"),
    data_root: str = typer.Option(None, "--data-root", help="dataset root (default: $VDSH_DATA)"),
    seed: int = typer.Option(0, "--seed", help="protocol seed"),
    batch_size: int = typer.Option(1024, "--batch-size", min=1),
    limit: int = typer.Option(None, "--limit", min=1, help="index only the first N images (quick trials)"),
) -> None:
    """Encode a dataset with a trained model and save a Hamming index with labels, sources and thumbnails."""
    from vdsh.index.hamming_index import KINDS

    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if dataset and protocol:
        raise typer.BadParameter("give --dataset (raw images) or --protocol (one part of a split), not both")
    data = {**protocol_options(queries_per_class, train_per_class, None, None), **model_shape(model, channels, image_size)}
    try:
        pool, ids = load_items(dataset, split, protocol, part, data_root, seed, data, exclude)
    except ValueError as exc:  # which images: a usage error, shown with the command's help line
        raise typer.BadParameter(str(exc)) from None
    index = build_index(model, pool, kind, out, batch_size, ids=ids[:limit])
    typer.echo(f"indexed {len(index)} items ({index.bits} bits, {kind}) from {pool.name} into {out}")


def index_locations(index: list[str]) -> list[str]:
    """--index values: existing directories, or one milvus://HOST:PORT/COLLECTION (BadParameter otherwise)."""
    from vdsh.index.milvus_items import is_milvus_uri

    if any(is_milvus_uri(i) for i in index):
        if len(index) > 1:
            raise typer.BadParameter("a milvus:// collection is searched alone: give --index once")
        return index
    missing = [i for i in index if not Path(i).is_dir()]
    if missing:
        raise typer.BadParameter(f"not an index directory: {', '.join(missing)}")
    return index


def open_items(index: list[str], model_id: str, bits: int):
    """One index directory, several searched as shards, or a Milvus collection; checked against the model."""
    from vdsh.index.milvus_items import MilvusItems, is_milvus_uri
    from vdsh.index.shards import ShardedItems
    from vdsh.index.store import load_index

    if is_milvus_uri(index[0]):
        return MilvusItems.open(index[0], model_id=model_id, bits=bits)
    return load_index(index[0], model_id=model_id, bits=bits) if len(index) == 1 else \
        ShardedItems.load(index, model_id=model_id, bits=bits)


INDEX_HELP = "index directory (repeat it for several shards searched as one) or milvus://HOST:PORT/COLLECTION"


@index_app.command("export")
def export_command(
    index: Path = typer.Option(..., "--index", exists=True, file_okay=False, help="the index directory to copy"),
    to: str = typer.Option(..., "--to", help="milvus://HOST:PORT/COLLECTION (a new collection)"),
    replace: bool = typer.Option(False, "--replace", help="drop the collection first if it exists"),
    milvus_index: str = typer.Option("auto", "--milvus-index",
                                     help="auto (BIN_FLAT below 1M items, else BIN_IVF_FLAT) | BIN_FLAT | BIN_IVF_FLAT"),
) -> None:
    """Copy an index (codes, ids, labels, sources, thumbnails) into a Milvus collection, for `vdsh serve --index milvus://...`."""
    from rich.progress import Progress

    from vdsh.index.milvus_items import export_items, is_milvus_uri
    from vdsh.index.store import load_index

    if not is_milvus_uri(to):
        raise typer.BadParameter(f"--to must be milvus://HOST:PORT/COLLECTION, got {to!r}")
    items = load_index(index)
    with Progress(transient=not os.isatty(2)) as progress:
        task = progress.add_task(f"inserting {len(items)} items", total=len(items))
        collection = export_items(items, to, replace=replace, index_type=milvus_index,
                                  progress=lambda n: progress.advance(task, n))
    typer.echo(f"exported {len(collection)} items ({collection.bits} bits, {collection.kind}) from {index} to {to}")


def query_command(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files (JPEG, PNG, WebP...)"),
    index: list[str] = typer.Option(..., "--index", help=INDEX_HELP),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="the model the index was built with"),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="neighbours per image"),
    int8: bool = typer.Option(False, "--int8", help="quantise the model's pretrained backbone to int8 (CPU)"),
) -> None:
    """Print the k nearest indexed items of each image: id, Hamming distance, labels, source."""
    from vdsh.data.transforms import ImageDecodeError, load_image
    from vdsh.index.codes import pack_codes
    from vdsh.training.encoders.model import load_model, model_id

    index = index_locations(index)
    hashing_model = load_model(model, int8=int8, fold=True)
    items = open_items(index, model_id(model), hashing_model.bits)
    spec = hashing_model.input_spec
    for path in images:
        try:
            pixels = load_image(path, channels=spec.channels, size=spec.size)
        except ImageDecodeError as error:
            typer.echo(f"{path}: {error}", err=True)
            raise typer.Exit(2) from None
        ids, dists = items.search(pack_codes(hashing_model.encode(pixels[None].copy())), k, device="cpu")
        typer.echo(f"{path}:")
        keep = ids[0] >= 0
        for rank, (item_id, dist, labels, source) in enumerate(
            zip(ids[0][keep], dists[0][keep], items.labels_of(ids[0][keep]), items.sources_of(ids[0][keep])), 1
        ):
            names = ",".join(items.class_names[j] for j in np.flatnonzero(labels)) or "-"
            typer.echo(f"  {rank:3d}  id={item_id}  d={dist}  labels={names}  {source}")


def serve_command(
    index: list[str] = typer.Option(..., "--index", help=INDEX_HELP + "; shards are served read-only"),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="the model the index was built with"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: str = typer.Option(None, "--api-key", envvar="VDSH_API_KEY", help="key for write endpoints (X-API-Key)"),
    workers: int = typer.Option(1, "--workers", min=1,
                                help="processes; more than one serves read-only, except from Milvus"),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", min=1,
                                         help="decoded pixels an upload may have [default: from the model's input size]"),
    memory_limit_mb: int = typer.Option(DEFAULT_MEMORY_LIMIT_MB, "--memory-limit-mb", min=1,
                                        help="memory of each worker process; uploads wait, then get 503, past it"),
    decode_workers: int = typer.Option(2, "--decode-workers", min=1, help="threads decoding and encoding uploads"),
    request_timeout_s: float = typer.Option(10.0, "--request-timeout-s", min=0.01,
                                            help="the most an upload's decode + encode may take (then 503)"),
    header_timeout_s: float = typer.Option(10.0, "--header-timeout-s", min=0.01,
                                           help="a connection must send a request's headers within this"),
    keep_alive_s: int = typer.Option(5, "--keep-alive-s", min=1, help="idle keep-alive connections are closed after this"),
    limit_concurrency: int = typer.Option(256, "--limit-concurrency", min=1,
                                          help="connections and requests at once; past it uvicorn answers 503"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch/FAISS threads per worker (1 suits single queries)"),
    int8: bool = typer.Option(False, "--int8", help="quantise the model's pretrained backbone to int8 for CPU serving"),
) -> None:
    """Serve the index over HTTP: POST /search, /items, /health, /stats, /metrics, and a web page at /."""
    import uvicorn

    from vdsh.index.milvus_items import is_milvus_uri

    index = index_locations(index)
    # every worker process loads an index directory; a write in one would be lost to the others, so writes
    # are off. Milvus keeps one collection for all of them: every worker may write.
    shared = is_milvus_uri(index[0])
    os.environ.update(
        VDSH_SERVE_INDEX=index[0] if shared else os.pathsep.join(index), VDSH_SERVE_MODEL=str(model),
        VDSH_SERVE_MAX_UPLOAD_BYTES=str(int(max_upload_mb * 1024 * 1024)),
        VDSH_SERVE_READ_ONLY="1" if workers > 1 and not shared else "0", VDSH_SERVE_THREADS=str(threads),
        VDSH_SERVE_MAX_IMAGE_PIXELS=str(max_image_pixels or ""), VDSH_SERVE_MEMORY_LIMIT_MB=str(memory_limit_mb),
        VDSH_SERVE_DECODE_WORKERS=str(decode_workers), VDSH_SERVE_REQUEST_TIMEOUT=str(request_timeout_s),
        VDSH_SERVE_HEADER_TIMEOUT=str(header_timeout_s),
        VDSH_SERVE_INT8="1" if int8 else "0",
    )
    if api_key:
        os.environ["VDSH_API_KEY"] = api_key
    uvicorn.run("vdsh.app.server.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info", http="vdsh.app.server.http_protocol:HeaderTimeoutH11Protocol",
                timeout_keep_alive=keep_alive_s, limit_concurrency=limit_concurrency,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
