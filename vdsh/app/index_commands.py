"""`vdsh index build`, `vdsh query` and `vdsh serve`: the offline and serving ends of an index."""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import typer

if TYPE_CHECKING:  # torch, faiss and the model load only when a command runs, so `vdsh --help` stays quick
    from vdsh.data.imageset import ImageSet
    from vdsh.index.store import ItemIndex
    from vdsh.training.model import HashingModel

KINDS_HELP = "flat | distinct | auto | hash | multihash | ivf"
index_app = typer.Typer(no_args_is_help=True, help="Build Hamming indexes of a dataset's codes.")
PARTS = ("train", "query", "database")


def load_items(dataset: str | None, split: str, protocol: str | None, part: str, data_root: str | None,
               seed: int = 0) -> ImageSet:
    """The images to index: a dataset split, or one part (train/query/database) of a protocol."""
    from vdsh.data import load
    from vdsh.data.protocols import load_protocol

    if protocol:
        if part not in PARTS:
            raise typer.BadParameter(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
        pool, split_ = load_protocol(protocol, data_root, seed)
        return pool.subset(getattr(split_, part))
    if not dataset:
        raise typer.BadParameter("give --dataset NAME (with --split) or --protocol NAME (with --part)")
    return load(dataset, data_root, split)


def encode_in_batches(model: HashingModel, images: np.ndarray, batch_size: int, label: str = "encoding") -> np.ndarray:
    """uint8 (N, C, H, W) -> packed codes (N, nbytes), with a progress bar."""
    from rich.progress import Progress

    from vdsh.index.codes import pack_codes

    packed = []
    with Progress(transient=not os.isatty(2)) as progress:
        task = progress.add_task(label, total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            packed.append(pack_codes(model.encode(batch, batch_size=batch_size)))
            progress.advance(task, len(batch))
    return np.concatenate(packed) if packed else np.empty((0, (model.bits + 7) // 8), np.uint8)


def codes_from_cached_features(model: HashingModel, items: ImageSet) -> np.ndarray:
    """Packed codes of a model on vector features (GIST, a backbone) from the feature cache: the features that
    training computed are not computed again (the same codes as `model.encode`, which computes them)."""
    import torch

    from vdsh.index.codes import pack_codes, sign_codes
    from vdsh.training.features import cached_feature_vectors

    spec = model.input_spec
    features = cached_feature_vectors(spec.features, np.asarray(items.images), items.name, spec.resolution)
    with torch.no_grad():
        outputs = [model.encoder(spec.standardise(features[i : i + 4096].to(model.device))) for i in range(0, len(features), 4096)]
    return pack_codes(sign_codes(torch.cat(outputs)).cpu()) if outputs else np.empty((0, (model.bits + 7) // 8), np.uint8)


def build_index(model_path: Path, items: ImageSet, kind: str, out: Path | None, batch_size: int = 1024,
                device: str | None = None) -> ItemIndex:
    """Encode every image, add codes + labels + sources + 64x64 thumbnails, save atomically to `out`."""
    import torch

    from vdsh.app.catalog import item_thumbnail
    from vdsh.index.hamming_index import HammingIndex
    from vdsh.index.store import ItemIndex
    from vdsh.training.model import load_model, model_id

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device=device)
    spec = model.input_spec
    if items.images.shape[1:] != (spec.channels, spec.size, spec.size):
        raise ValueError(f"{items.name} images are {items.images.shape[1:]}, the model takes "
                         f"({spec.channels}, {spec.size}, {spec.size})")
    if spec.features in ("pixels", "image"):
        codes = encode_in_batches(model, items.images, batch_size, f"encoding {len(items)} images on {device}")
    else:
        codes = codes_from_cached_features(model, items)
    index = ItemIndex(HammingIndex(model.bits, kind), model_id(model_path), items.class_names)
    index.add(
        codes,
        np.arange(len(items), dtype=np.int64),
        labels=items.labels,
        sources=[items.source(i) for i in range(len(items))],
        thumbnails=[item_thumbnail(image) for image in items.images],
    )
    if out is not None:
        index.save(out)
    return index


@index_app.command("build")
def build_command(
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="trained model (.safetensors)"),
    out: Path = typer.Option(..., "--out", help="index directory to create or update (atomic)"),
    dataset: str = typer.Option(None, "--dataset", help="mnist, cifar10, nuswide, mnist-sample, folder:<path>"),
    split: str = typer.Option("all", "--split", help="all | train | test (with --dataset)"),
    protocol: str = typer.Option(None, "--protocol", help="index one part of a protocol instead, e.g. mnist-sample"),
    part: str = typer.Option("database", "--part", help="train | query | database (with --protocol)"),
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
    items = load_items(dataset, split, protocol, part, data_root, seed)
    if limit is not None:
        items = items.subset(np.arange(min(limit, len(items))))
    index = build_index(model, items, kind, out, batch_size)
    typer.echo(f"indexed {len(index)} items ({index.bits} bits, {kind}) from {items.name} into {out}")


def query_command(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files (JPEG, PNG, WebP...)"),
    index: list[Path] = typer.Option(..., "--index", exists=True, file_okay=False,
                                     help="index directory; repeat it to search several shards as one"),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="the model the index was built with"),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="neighbours per image"),
    int8: bool = typer.Option(False, "--int8", help="quantise the model's pretrained backbone to int8 (CPU)"),
) -> None:
    """Print the k nearest indexed items of each image: id, Hamming distance, labels, source."""
    from vdsh.data.transforms import ImageDecodeError, load_image
    from vdsh.index.codes import pack_codes
    from vdsh.index.shards import ShardedItems
    from vdsh.index.store import load_index
    from vdsh.training.model import load_model, model_id

    hashing_model = load_model(model, int8=int8)
    expected = {"model_id": model_id(model), "bits": hashing_model.bits}
    items = load_index(index[0], **expected) if len(index) == 1 else ShardedItems.load(index, **expected)
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
    index: list[Path] = typer.Option(..., "--index", exists=True, file_okay=False,
                                     help="index directory; repeat it to serve several shards as one (read-only)"),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="the model the index was built with"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: str = typer.Option(None, "--api-key", envvar="VDSH_API_KEY", help="key for write endpoints (X-API-Key)"),
    workers: int = typer.Option(1, "--workers", min=1, help="processes; more than one serves read-only"),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.001),
    threads: int = typer.Option(1, "--threads", min=1, help="torch/FAISS threads per worker (1 suits single queries)"),
    int8: bool = typer.Option(False, "--int8", help="quantise the model's pretrained backbone to int8 for CPU serving"),
) -> None:
    """Serve the index over HTTP: POST /search, /items, /health, /stats, /metrics, and a web page at /."""
    import uvicorn

    # every worker process loads the index; a write in one would be lost to the others, so writes are off
    os.environ.update(
        VDSH_SERVE_INDEX=os.pathsep.join(map(str, index)), VDSH_SERVE_MODEL=str(model),
        VDSH_SERVE_MAX_UPLOAD_BYTES=str(int(max_upload_mb * 1024 * 1024)),
        VDSH_SERVE_READ_ONLY="1" if workers > 1 else "0", VDSH_SERVE_THREADS=str(threads),
        VDSH_SERVE_INT8="1" if int8 else "0",
    )
    if api_key:
        os.environ["VDSH_API_KEY"] = api_key
    uvicorn.run("vdsh.app.server:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info")
