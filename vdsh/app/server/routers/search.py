"""POST /search: an uploaded image or a code in, Hamming-ranked neighbours out."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from vdsh.app.server.budget import DecodePool
from vdsh.app.server.catalog import Catalog
from vdsh.app.server.decoding import decode_bytes, read_header
from vdsh.app.server.dependencies import Settings, get_catalog, get_pool, get_settings
from vdsh.app.server.schemas import (DEFAULT_K, K_HELP, MAX_CODE_CHARS, MAX_K, RADIUS_HELP, ErrorBody, Neighbour,
                              SearchByCode, SearchParams, SearchResponse, Timings)
from vdsh.app.server.uploads import check_image_upload, code_hex, code_pattern, parse_code

router = APIRouter(tags=["search"])
RADIUS_LIMIT = MAX_K  # a radius query lists at most this many items (and says how many matched)
MAX_FORM_FIELDS = 8
FORM_FIELDS = {"image", "code", "k", "radius"}

_ERRORS = {
    400: {"model": ErrorBody, "description": "corrupt or truncated image, an image over the pixel limit "
                                             f"(decompression bomb), an `image` part that is not a file, or a form "
                                             f"with more than {MAX_FORM_FIELDS} fields"},
    413: {"model": ErrorBody, "description": "upload over the size limit"},
    415: {"model": ErrorBody, "description": "not JPEG/PNG/WebP, or a body that is neither multipart nor JSON"},
    422: {"model": ErrorBody, "description": "bad k, radius or code, or neither image nor code"},
    503: {"model": ErrorBody, "description": "over the memory budget or the time limit: retry after Retry-After seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}


def multipart_schema(bits: int | None = None) -> dict:
    """The multipart form /search takes: an `image` file or a `code` (not both), with `k`, `radius` or
    both, and no other field."""
    code = {"type": "string", "minLength": 1, "maxLength": MAX_CODE_CHARS, "description": "hex or 0/1 bits"}
    radius = {"type": "integer", "minimum": 0, "description": RADIUS_HELP}
    if bits is not None:
        code["pattern"], radius["maximum"] = code_pattern(bits), bits
    k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "description": K_HELP}
    image = {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"}
    return {"oneOf": [
        {"title": "by image", "type": "object", "properties": {"image": image, "k": k, "radius": radius},
         "required": ["image"], "additionalProperties": False},
        {"title": "by code", "type": "object", "properties": {"code": code, "k": k, "radius": radius},
         "required": ["code"], "additionalProperties": False},
    ]}


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=_ERRORS,
    summary="Nearest items to an image or a code",
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": multipart_schema()},
        "application/json": {"schema": SearchByCode.model_json_schema()},
    }}},
)
async def search(
    request: Request,
    catalog: Catalog = Depends(get_catalog),
    settings: Settings = Depends(get_settings),
    pool: DecodePool = Depends(get_pool),
) -> SearchResponse:
    """Multipart with `image` (or `code`) plus `k`, `radius` or both; or JSON `{"code": ..., "k": ...}`.

    A code query is answered on the event loop (microseconds of work). An image is checked by its
    header first (pixel limit), then decoded and encoded in the bounded worker pool within the
    server's memory budget and time limit (503 with Retry-After past them)."""
    started = time.perf_counter()
    image_bytes, image_type, code_text, params = await _read_query(request)
    if image_bytes is None:
        try:
            packed = parse_code(code_text or "", catalog.bits)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        now = time.perf_counter()
        return _answer(catalog, packed, params, started, decoded=now, encoded=now)
    check_image_upload(image_type, image_bytes, settings.max_upload_bytes)
    header = read_header(image_bytes, catalog.limits)  # microseconds: nothing is decoded yet
    nbytes = decode_bytes(header.pixels, header.mode, catalog.limits.channels)
    packed, decoded, encoded = await pool.run(nbytes, lambda: _decode_and_encode(catalog, image_bytes))
    return _answer(catalog, packed, params, started, decoded, encoded)


def _decode_and_encode(catalog: Catalog, image: bytes) -> tuple[np.ndarray, float, float]:
    """In a pool thread: the packed code and when decoding and encoding ended."""
    pixels = catalog.decode(image)
    decoded = time.perf_counter()
    return catalog.encode(pixels), decoded, time.perf_counter()


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
    async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:  # closes the spooled upload afterwards
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise HTTPException(422, f"unknown form fields {unknown[:5]}: send {', '.join(sorted(FORM_FIELDS))}")
        fields = {**request.query_params, **{k: v for k, v in form.items() if isinstance(v, str)}}
        try:
            params = SearchParams(k=fields.get("k"), radius=fields.get("radius"))
        except ValidationError as error:
            raise HTTPException(422, _explain(error)) from None
        image = form.get("image")
        if isinstance(image, str):  # a part without a filename: its bytes were decoded as text
            raise HTTPException(400, "the `image` part must be a file: give it a filename in its Content-Disposition")
        code = fields.get("code")
        if isinstance(image, UploadFile) and code:
            raise HTTPException(422, "send either an image or a code, not both")
        if isinstance(image, UploadFile):
            return await image.read(), image.content_type, None, params
        if code:
            return None, None, code, params
    raise HTTPException(422, "nothing to search with: send an `image` file or a `code` field")


def _answer(catalog: Catalog, packed: np.ndarray, params: SearchParams, started: float, decoded: float,
            encoded: float) -> SearchResponse:
    total_within, k = None, params.k
    if params.radius is not None:  # with k: the k nearest of those within the radius
        if params.radius > catalog.bits:
            raise HTTPException(422, f"radius must be at most the code length, {catalog.bits}")
        found, total_within = catalog.within(packed, params.radius, k or RADIUS_LIMIT)
    else:
        k = k or DEFAULT_K
        found = catalog.knn(packed, k)
    searched = time.perf_counter()
    return SearchResponse(
        query_code=code_hex(packed),
        bits=catalog.bits,
        k=k,
        radius=params.radius,
        total_within_radius=total_within,
        close_match=bool(found) and found[0]["distance"] <= catalog.far_distance,
        far_distance=catalog.far_distance,
        results=[Neighbour(**n, thumbnail_url=f"/items/{n['id']}/thumbnail") for n in found],
        timings=Timings(
            decode_ms=_ms(decoded - started),
            encode_ms=_ms(encoded - decoded),
            search_ms=_ms(searched - encoded),
            total_ms=_ms(searched - started),
        ),
    )


def document_examples(schema: dict, catalog: Catalog) -> None:
    """Fill the OpenAPI schema's code examples and patterns for the served index: a real code of one of
    its items (so the example in /docs finds something), the code pattern and radius maximum of its length."""
    example = code_hex(catalog.example_code())
    content = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    content["multipart/form-data"]["schema"] = multipart_schema(catalog.bits)
    by_code = content["application/json"]["schema"]
    by_code["properties"]["code"].update(examples=[example], pattern=code_pattern(catalog.bits))
    for branch in by_code["properties"]["radius"].get("anyOf", [by_code["properties"]["radius"]]):
        if branch.get("type") == "integer":
            branch["maximum"] = catalog.bits
    content["application/json"]["example"] = {"code": example, "k": DEFAULT_K}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _explain(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
