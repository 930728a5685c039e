"""The FastAPI application: one model + one index loaded at start-up, served over HTTP.

`create_app(index_dir, model_path)` builds the app; the lifespan handler loads the model and the index
and refuses to start when they disagree (another model's index, another code length). Several index
directories are served as shards of one collection (`vdsh.index.shards`), read-only; a
`milvus://HOST:PORT/COLLECTION` index is served from Milvus, writable by every process. Routers:
`routers.search` (POST /search), `routers.items` (/items...), `routers.service` (/health, /stats,
/metrics); the web page is `static/index.html` at `/`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from vdsh.app.catalog import Catalog
from vdsh.app.dependencies import Settings
from vdsh.app.routers import items, search, service
from vdsh.app.uploads import MULTIPART_SLACK, BodySizeLimit, UnsupportedImage, UploadTooLarge
from vdsh.index.milvus_items import is_milvus_uri

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class Metrics:
    """Per-app Prometheus registry, so several apps in one process (tests) do not collide."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter("vdsh_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("vdsh_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.items = Gauge("vdsh_index_items", "items in the served index", registry=self.registry)


class RecordMetrics:
    """ASGI middleware: count and time every request by its route template (not its raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


def create_app(
    index_dir: str | Path | Sequence[str | Path],
    model_path: str | Path,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    read_only: bool = False,
    int8: bool = False,
) -> FastAPI:
    """The app for one index directory (or several shards, read-only) and one model file; nothing is
    loaded until start-up."""
    shards = not isinstance(index_dir, (str, Path)) and len(index_dir) > 1

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.catalog = Catalog.open(index_dir, model_path, int8)  # ModelIndexMismatch stops start-up
        app.state.metrics.items.set(len(app.state.catalog))
        yield
        app.state.catalog = None

    app = FastAPI(
        title="vdsh",
        summary="Image retrieval by learned binary codes: Hamming-ranked neighbours of an image or a code.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = Settings(api_key=api_key, max_upload_bytes=max_upload_bytes, read_only=read_only or shards)
    app.state.metrics = Metrics()
    app.include_router(search.router)
    app.include_router(items.router)
    app.include_router(service.router)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", _index_page, include_in_schema=False)
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(RecordMetrics, metrics=app.state.metrics)
    return app


def _index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadTooLarge)
    async def too_large(_: Request, error: UploadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    @app.exception_handler(UnsupportedImage)
    async def unsupported(_: Request, error: UnsupportedImage) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=415)


def _version() -> str:
    from vdsh import __version__

    return __version__


def _limit_threads(threads: int) -> None:
    """One query is too small to split across cores: extra torch/FAISS threads only add jitter and
    contend with the other requests (measured: encode p99 several ms worse with 2 threads on 2 busy cores)."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` with several workers: settings come from VDSH_SERVE_* variables."""
    env = os.environ
    _limit_threads(int(env.get("VDSH_SERVE_THREADS", "1")))
    index = env["VDSH_SERVE_INDEX"]
    return create_app(
        index if is_milvus_uri(index) else index.split(os.pathsep),  # several directories: shards
        env["VDSH_SERVE_MODEL"],
        api_key=env.get("VDSH_API_KEY") or None,
        max_upload_bytes=int(env.get("VDSH_SERVE_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)),
        read_only=env.get("VDSH_SERVE_READ_ONLY", "0") == "1",
        int8=env.get("VDSH_SERVE_INT8", "0") == "1",
    )
