"""Items: add (encode + persist), delete, read metadata and thumbnails."""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from vdsh.app.catalog import Catalog, ItemRecord
from vdsh.app.dependencies import Settings, get_catalog, get_settings, require_api_key
from vdsh.app.schemas import Deleted, ErrorBody, Item
from vdsh.app.uploads import check_image_upload, code_hex
from vdsh.data.transforms import ImageDecodeError

router = APIRouter(prefix="/items", tags=["items"])
ItemId = Path(..., ge=0, le=2**63 - 1, description="the item's int64 id")
_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown id"}}
_WRITE_ERRORS = {
    400: {"model": ErrorBody, "description": "corrupt or truncated image"},
    401: {"model": ErrorBody, "description": "missing API key"},
    403: {"model": ErrorBody, "description": "wrong API key, or writes disabled"},
    409: {"model": ErrorBody, "description": "id already taken"},
    413: {"model": ErrorBody, "description": "upload over the size limit"},
    415: {"model": ErrorBody, "description": "not a JPEG, PNG or WebP image"},
    422: {"model": ErrorBody, "description": "unknown label names or bad fields"},
}


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
    labels: str = Form("", description="comma-separated class names, e.g. 'cat' or 'sky,water'"),
    source: str = Form("", max_length=2048, description="where the image came from; default: upload:<file name>"),
    new_id: int | None = Form(None, alias="id", ge=0, le=2**63 - 1, description="the new item's id; default: largest id + 1"),
    catalog: Catalog = Depends(get_catalog),
    settings: Settings = Depends(get_settings),
) -> Item:
    """Encode the image, add it to the index and persist the index before answering."""
    data = await image.read()
    check_image_upload(image.content_type, data, settings.max_upload_bytes)
    names = [n.strip() for n in labels.split(",") if n.strip()]
    try:
        catalog.labels_from_names(names)
    except ValueError as error:
        raise HTTPException(422, str(error)) from None
    try:
        pixels = await run_in_threadpool(catalog.decode, data)
    except ImageDecodeError as error:
        raise HTTPException(400, str(error)) from None
    try:
        record = await run_in_threadpool(catalog.add, pixels, names, source or f"upload:{image.filename or ''}", new_id)
    except FileExistsError as error:
        raise HTTPException(409, str(error)) from None
    except OSError as error:  # e.g. a read-only index mount: the catalog has reloaded the saved state
        raise HTTPException(503, f"could not save the index, nothing was added: {error}") from None
    return _item(record)


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
    200: {"content": {"image/png": {}}, "description": "the item's thumbnail, PNG"}, **_NOT_FOUND})
async def get_thumbnail(item_id: int = ItemId, catalog: Catalog = Depends(get_catalog)) -> Response:
    try:
        pixels = catalog.thumbnail(item_id)
    except KeyError:
        raise HTTPException(404, f"no item with id {item_id}") from None
    if pixels is None:
        raise HTTPException(404, f"item {item_id} has no thumbnail")
    return Response(_png(pixels), media_type="image/png", headers={"Cache-Control": "max-age=60"})


def _png(pixels: np.ndarray) -> bytes:
    pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
