"""The service's own state: health, index statistics, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vdsh.app.server.catalog import Catalog
from vdsh.app.server.dependencies import Settings, get_catalog, get_settings
from vdsh.app.server.schemas import Health, Stats

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health)
async def health(catalog: Catalog = Depends(get_catalog)) -> Health:
    return Health(items=len(catalog))


@router.get("/stats", response_model=Stats)
async def stats(request: Request, catalog: Catalog = Depends(get_catalog), settings: Settings = Depends(get_settings)) -> Stats:
    """The index, the model and the server's limits."""
    return Stats(
        items=len(catalog),
        bits=catalog.bits,
        index_kind=catalog.kind,
        model_id=catalog.model_id,
        class_names=catalog.class_names,
        read_only=settings.read_only or settings.api_key is None,
        max_upload_bytes=settings.max_upload_bytes,
        max_image_pixels=catalog.limits.max_pixels,
        decode_budget_bytes=request.app.state.budget.limit_bytes,
        decode_workers=settings.decode_workers,
        request_timeout_s=settings.request_timeout_s,
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text format: request counts and latency histograms per route, index size."""
    request.app.state.metrics.items.set(len(request.app.state.catalog))
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
