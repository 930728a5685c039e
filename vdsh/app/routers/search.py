"""POST /search: an uploaded image or a code in, Hamming-ranked neighbours out."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from vdsh.app.catalog import Catalog
from vdsh.app.dependencies import Settings, get_catalog, get_settings
from vdsh.app.schemas import DEFAULT_K, MAX_K, Neighbour, SearchByCode, SearchParams, SearchResponse, Timings
from vdsh.app.uploads import check_image_upload, code_hex, parse_code
from vdsh.data.transforms import ImageDecodeError

router = APIRouter(tags=["search"])
RADIUS_LIMIT = MAX_K  # a radius query lists at most this many items (and says how many matched)
# uploads up to this size decode in about a millisecond: they are answered on the event loop; larger
# ones (slow to decode), and every image for a model with a pretrained backbone (tens of ms of CPU), go to the
# thread pool so they never stall other requests
INLINE_UPLOAD_BYTES = 64 * 1024

_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"},
        "code": {"type": "string", "description": "instead of an image: hex or 0/1 bits"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
        "radius": {"type": "integer", "minimum": 0},
    },
}
_ERRORS = {
    400: {"description": "corrupt, truncated or oversized-in-pixels image"},
    413: {"description": "upload over the size limit"},
    415: {"description": "not JPEG/PNG/WebP, or a body that is neither multipart nor JSON"},
    422: {"description": "bad k, radius or code"},
}


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=_ERRORS,
    summary="Nearest items to an image or a code",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        "application/json": {"schema": SearchByCode.model_json_schema()},
    }}},
)
async def search(
    request: Request, catalog: Catalog = Depends(get_catalog), settings: Settings = Depends(get_settings)
) -> SearchResponse:
    """Multipart with `image` (or `code`) plus `k` or `radius`; or JSON `{"code": ..., "k": ...}`."""
    started = time.perf_counter()
    image_bytes, image_type, code_text, params = await _read_query(request)
    if image_bytes is not None:
        check_image_upload(image_type, image_bytes, settings.max_upload_bytes)
    if image_bytes is None or (len(image_bytes) <= INLINE_UPLOAD_BYTES and not catalog.model.input_spec.backbone):
        # ~1-2 ms of work: a thread hop costs as much again on a busy 2-core machine, so answer inline
        return _answer(catalog, image_bytes, code_text, params, started)
    return await run_in_threadpool(_answer, catalog, image_bytes, code_text, params, started)


async def _read_query(request: Request) -> tuple[bytes | None, str | None, str | None, SearchParams]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            query = SearchByCode.model_validate_json(await request.body())
        except ValidationError as error:
            raise HTTPException(422, _explain(error)) from None
        return None, None, query.code, SearchParams(k=query.k, radius=query.radius)
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise HTTPException(415, f"send multipart/form-data (an image or a code) or application/json, not {content_type or 'no content type'!r}")
    async with request.form(max_files=1, max_fields=8) as form:  # closes the spooled upload afterwards
        fields = {**request.query_params, **{k: v for k, v in form.items() if isinstance(v, str)}}
        try:
            params = SearchParams(k=fields.get("k") or None, radius=fields.get("radius") or None)
        except ValidationError as error:
            raise HTTPException(422, _explain(error)) from None
        image = form.get("image")
        code = fields.get("code")
        if isinstance(image, UploadFile) and code:
            raise HTTPException(422, "send either an image or a code, not both")
        if isinstance(image, UploadFile):
            return await image.read(), image.content_type, None, params
        if code:
            return None, None, code, params
    raise HTTPException(422, "nothing to search with: send an `image` file or a `code` field")


def _answer(catalog: Catalog, image: bytes | None, code_text: str | None, params: SearchParams, started: float) -> SearchResponse:
    t0 = time.perf_counter()
    if image is not None:
        try:
            pixels = catalog.decode(image)
        except ImageDecodeError as error:
            raise HTTPException(400, str(error)) from None
        t1 = time.perf_counter()
        packed = catalog.encode(pixels)
        t2 = time.perf_counter()
    else:
        try:
            packed = parse_code(code_text or "", catalog.bits)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        t1 = t2 = time.perf_counter()  # no model runs for a code query
    total_within = None
    if params.radius is not None:
        if params.radius > catalog.bits:
            raise HTTPException(422, f"radius must be at most the code length, {catalog.bits}")
        found, total_within = catalog.within(packed, params.radius, RADIUS_LIMIT)
        k = None
    else:
        k = params.k or DEFAULT_K
        found = catalog.knn(packed, k)
    t3 = time.perf_counter()
    return SearchResponse(
        query_code=code_hex(packed),
        bits=catalog.bits,
        k=k,
        radius=params.radius,
        total_within_radius=total_within,
        results=[Neighbour(**vars(n), thumbnail_url=f"/items/{n.id}/thumbnail") for n in found],
        timings=Timings(
            decode_ms=_ms(t0 - started + (t1 - t0)),
            encode_ms=_ms(t2 - t1),
            search_ms=_ms(t3 - t2),
            total_ms=_ms(t3 - started),
        ),
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _explain(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
