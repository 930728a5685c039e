"""Items: add (encode + persist), delete, read metadata and thumbnails."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Request, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from vdsh.app.server.budget import DecodePool
from vdsh.app.server.catalog import Catalog, ItemRecord
from vdsh.app.server.decoding import decode_bytes, read_header
from vdsh.app.server.dependencies import Settings, get_catalog, get_pool, get_settings, require_api_key
from vdsh.app.server.schemas import Deleted, ErrorBody, Item
from vdsh.app.server.uploads import check_image_upload, code_hex

router = APIRouter(prefix="/items", tags=["items"])
LABEL_SPACE = " \t\r\n"
# 2**53 - 1: the largest integer a JSON number (a float in most clients) holds exactly
MAX_ID = 2**53 - 1
ItemId = Path(..., ge=0, le=MAX_ID, description="the item's id")
_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown id"}}
_WRITE_ERRORS = {
    400: {"model": ErrorBody, "description": "corrupt or truncated image, or an image over the pixel limit"},
    401: {"model": ErrorBody, "description": "missing API key"},
    403: {"model": ErrorBody, "description": "wrong API key, or writes disabled"},
    409: {"model": ErrorBody, "description": "id already taken, or below the next id (ids are never reused)"},
    413: {"model": ErrorBody, "description": "upload over the size limit"},
    415: {"model": ErrorBody, "description": "not a JPEG, PNG or WebP image"},
    422: {"model": ErrorBody, "description": "unknown label names or bad fields"},
    503: {"model": ErrorBody, "description": "over the memory budget or time limit (Retry-After), or the index "
                                             "could not be saved (nothing changed)"},
}
MAX_LABELS_CHARS = 10_000


def _item(record: ItemRecord) -> Item:
    return Item(
        id=record.id,
        labels=record.labels,
        source=record.source,
        code=code_hex(record.code),
        thumbnail_url=f"/items/{record.id}/thumbnail" if record.has_thumbnail else None,
    )


@router.post("", status_code=201, response_model=Item, responses=_WRITE_ERRORS, dependencies=[Depends(require_api_key)])
async def add_item(
    image: UploadFile = File(..., description="JPEG, PNG or WebP"),
    labels: str = Form("", max_length=MAX_LABELS_CHARS,
                       description="comma-separated class names of the index, e.g. 'cat' or 'sky,water'"),
    source: str = Form("", max_length=2048, description="where the image came from; default: upload:<file name>"),
    new_id: int = Form(None, alias="id", ge=0, le=MAX_ID,
                       description="the new item's id, at least the index's next id; default: the next id"),
    catalog: Catalog = Depends(get_catalog),
    settings: Settings = Depends(get_settings),
    pool: DecodePool = Depends(get_pool),
) -> Item:
    """Encode the image, add it to the index and persist the index before answering. Ids are never
    reused: a new item gets the index's next id, above every id it has ever held."""
    data = await image.read()
    check_image_upload(image.content_type, data, settings.max_upload_bytes)
    names = label_names(labels)
    try:
        catalog.labels_from_names(names)
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    header = read_header(data, catalog.limits)  # microseconds: nothing is decoded yet
    pixels = await pool.run(decode_bytes(header.pixels, header.mode, catalog.limits.channels), lambda: catalog.decode(data))
    try:
        record = await run_in_threadpool(catalog.add, pixels, names, source or f"upload:{image.filename or ''}", new_id)
    except FileExistsError as error:
        raise HTTPException(409, str(error)) from None
    except OSError as error:  # e.g. a read-only index mount: the catalog has reloaded the saved state
        raise HTTPException(503, f"could not save the index, nothing was added: {error}") from None
    return _item(record)


def label_names(labels: str) -> list[str]:
    """'cat, dog,' -> ['cat', 'dog'] (`label_pattern` is the same rule for given class names)."""
    return [n.strip(LABEL_SPACE) for n in labels.split(",") if n.strip(LABEL_SPACE)]


def label_pattern(class_names: list[str]) -> str:
    """The `labels` field `label_names` reads into known class names, as a regular expression."""
    name = "(?:" + "|".join(re.escape(n) for n in sorted(class_names, key=len, reverse=True)) + ")?"
    space = "[ \\t\\r\\n]*"
    return f"^{space}{name}{space}(?:,{space}{name}{space})*$"


@router.delete("/{item_id}", response_model=Deleted, responses={**_NOT_FOUND, **_WRITE_ERRORS},
               dependencies=[Depends(require_api_key)])
async def delete_item(item_id: int = ItemId, catalog: Catalog = Depends(get_catalog)) -> Deleted:
    """Remove the item and persist the index before answering."""
    try:
        await run_in_threadpool(catalog.remove, item_id)
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id}") from None
    except OSError as error:
        raise HTTPException(503, f"could not save the index, nothing was deleted: {error}") from None
    return Deleted(id=item_id, items=len(catalog))


@router.get("/{item_id}", response_model=Item, responses=_NOT_FOUND)
async def get_item(item_id: int = ItemId, catalog: Catalog = Depends(get_catalog)) -> Item:
    try:
        return _item(catalog.item(item_id))
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id}") from None


@router.get("/{item_id}/thumbnail", response_class=Response, responses={
    200: {"content": {"image/png": {}}, "description": "the item's thumbnail, PNG"},
    304: {"description": "the thumbnail the client holds (If-None-Match) is still this item's"}, **_NOT_FOUND})
async def get_thumbnail(request: Request, item_id: int = ItemId, catalog: Catalog = Depends(get_catalog)) -> Response:
    """The thumbnail, with an ETag of its pixels: caches revalidate it (no-cache), so a thumbnail is
    never shown for another item, even one restored under an old id."""
    try:
        pixels = catalog.thumbnail(item_id)
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id}") from None
    if pixels is None:
        raise HTTPException(404, f"item {item_id} has no thumbnail")
    etag = '"' + hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).hexdigest() + '"'
    headers = {"Cache-Control": "no-cache", "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(_png(pixels), media_type="image/png", headers=headers)


def _png(pixels: np.ndarray) -> bytes:
    pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def document_labels(schema: dict, class_names: list[str]) -> None:
    """Constrain the OpenAPI `labels` field of POST /items to the served index's class names."""
    body = schema["paths"]["/items"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    body["properties"]["labels"]["pattern"] = label_pattern(class_names)
