"""The FastAPI application: one model + one index loaded at start-up, served over HTTP.

`create_app(index_dir, model_path)` builds the app; the lifespan handler loads the model and the index
and refuses to start when they disagree (another model's index, another code length). Several index
directories are served as shards of one collection (`vdsh.index.shards`), read-only; a
`milvus://HOST:PORT/COLLECTION` index is served from Milvus, writable by every process. Routers:
`routers.search` (POST /search), `routers.items` (/items...), `routers.service` (/health, /stats,
/metrics); the web page is `static/index.html` at `/`.

Hostile load is bounded in layers, outermost first: uvicorn's connection, header and keep-alive limits
(`vdsh serve`, `vdsh.app.server.http_protocol`); the API key of write routes, checked from the headers
(`AuthBeforeBody`); the body size, with the body's bytes held from the memory budget (`BodySizeLimit`);
then each upload's decoded pixels, checked from its header, and its decode, run in the bounded worker
pool holding its worst-case bytes within a time limit (`vdsh.app.server.decoding`, `vdsh.app.server.budget`).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vdsh.app.server.budget import DecodePool, MemoryBudget, ServerBusy
from vdsh.app.server.catalog import Catalog
from vdsh.app.server.dependencies import API_KEY_HEADER, Settings, api_key_problem, require_api_key
from vdsh.app.server.routers import items, search, service
from vdsh.app.server.uploads import MULTIPART_SLACK, BodySizeLimit, UnsupportedImage, UploadTooLarge, send_json_error
from vdsh.data.transforms import ImageDecodeError
from vdsh.index.milvus_items import is_milvus_uri

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_DECODE_BUDGET = 512 * 1024 * 1024  # without a memory limit (create_app's default; `vdsh serve` sets one)
DEFAULT_MEMORY_LIMIT_MB = 1536  # `vdsh serve` (per worker process): leaves room in a 2 GB container
MEMORY_MARGIN = 64 * 1024 * 1024  # answers, the event loop, allocator slack


class MemoryLimitTooLow(RuntimeError):
    """The configured memory limit cannot hold the loaded server plus one worst-case upload."""


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

        as_received = dict(scope)  # routing rewrites the path and root path of mounted apps (/static)
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope["route"].path if "route" in scope else route_label(as_received)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


def route_label(scope: Scope) -> str:
    """The route template of a request as received (docs, the page, /static; FastAPI's own routes set
    scope["route"]), else "unmatched" (so unknown paths cannot grow the label set)."""
    app = scope.get("app")
    for candidate in getattr(getattr(app, "state", None), "flat_routes", ()):
        if candidate.matches(scope)[0] == Match.FULL:
            return getattr(candidate, "path", "unmatched") or "/"
    return "unmatched"


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route answers at this path (Starlette's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in app.state.flat_routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


class AuthBeforeBody:
    """ASGI middleware: a write route's API key is checked before a byte of its body is read, so an
    unauthorised client cannot make the server buffer (up to) a 10 MB upload first."""

    def __init__(self, app: ASGIApp, write_routes: list[APIRoute], settings: Settings) -> None:
        self.app, self.write_routes, self.settings = app, write_routes, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS") and self._is_write(scope):
            key = dict(scope["headers"]).get(API_KEY_HEADER.lower().encode())
            problem = api_key_problem(self.settings, key.decode("latin-1") if key is not None else None)
            if problem is not None:
                await send_json_error(send, *problem)
                return
        await self.app(scope, receive, send)

    def _is_write(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] == Match.FULL for route in self.write_routes)


def create_app(
    index_dir: str | Path | Sequence[str | Path],
    model_path: str | Path,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    read_only: bool = False,
    int8: bool = False,
    **limits,
) -> FastAPI:
    """The app for one index directory (or several shards, read-only) and one model file; nothing is
    loaded until start-up. `limits`: the other `Settings` fields (pixels, memory, workers, timeouts)."""
    shards = not isinstance(index_dir, (str, Path)) and len(index_dir) > 1
    settings = Settings(api_key=api_key, max_upload_bytes=max_upload_bytes, read_only=read_only or shards, **limits)
    budget = MemoryBudget(DEFAULT_DECODE_BUDGET, settings.budget_wait_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        catalog = Catalog.open(index_dir, model_path, settings.max_image_pixels, int8)  # ModelIndexMismatch stops start-up
        release_freed_memory()  # loading (int8 calibration above all) leaves freed heap that still counts as resident
        budget.limit_bytes = decode_budget(settings, catalog.limits.worst_case_bytes(), resident_bytes())
        app.state.pool = DecodePool(settings.decode_workers, budget, settings.request_timeout_s)
        app.state.catalog = catalog
        app.state.metrics.items.set(len(catalog))
        app.openapi_schema = None  # the schema's examples come from the served index
        yield
        app.state.catalog = None
        app.state.pool.shutdown()

    app = FastAPI(
        title="vdsh",
        summary="Image retrieval by learned binary codes: Hamming-ranked neighbours of an image or a code.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.budget = budget
    app.state.metrics = Metrics()
    routers = (search.router, items.router, service.router)
    for router in routers:
        app.include_router(router)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", _index_page, include_in_schema=False)
    app.add_api_route("/favicon.ico", _favicon, include_in_schema=False)
    app.openapi = lambda: openapi_for_index(app)
    # every route, flat (the app's own list nests the included routers): for the metrics' route
    # labels, the Allow header and the write routes' key check
    app.state.flat_routes = [r for r in app.routes if isinstance(r, (Route, Mount))] + [r for router in routers for r in router.routes]
    write_routes = [r for r in app.state.flat_routes if isinstance(r, APIRoute)
                    and any(d.dependency is require_api_key for d in r.dependencies)]
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes + MULTIPART_SLACK, budget=budget)
    app.add_middleware(AuthBeforeBody, write_routes=write_routes, settings=settings)
    app.add_middleware(RecordMetrics, metrics=app.state.metrics)
    return app


def decode_budget(settings: Settings, worst_case_decode: int, resident: int) -> int:
    """Bytes that decodes (and buffered request bodies) may hold at once: the server's memory limit
    less what it holds after loading the model and index, less a margin; without a limit,
    DEFAULT_DECODE_BUDGET. MemoryLimitTooLow when not even one worst-case upload fits."""
    if settings.memory_limit_bytes is None:
        return DEFAULT_DECODE_BUDGET
    available = settings.memory_limit_bytes - resident - MEMORY_MARGIN
    needed = worst_case_decode + 2 * (settings.max_upload_bytes + MULTIPART_SLACK)
    if available < needed:
        raise MemoryLimitTooLow(
            f"the memory limit of {settings.memory_limit_bytes / 2**20:,.0f} MiB leaves {available / 2**20:,.0f} MiB "
            f"for uploads once the model and index are loaded ({resident / 2**20:,.0f} MiB) with a "
            f"{MEMORY_MARGIN / 2**20:,.0f} MiB margin, and one worst-case upload needs {needed / 2**20:,.0f} MiB: "
            "raise --memory-limit-mb, or lower --max-image-pixels or --max-upload-mb")
    return available


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; nothing elsewhere), so that the
    resident size the decode budget starts from is what the server holds, not what loading once used."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where that is not available)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def openapi_for_index(app: FastAPI) -> dict:
    """FastAPI's schema, with the code example replaced by a real code of the served index (its length)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        catalog = getattr(app.state, "catalog", None)
        if catalog is not None:
            search.document_examples(schema, catalog)
            items.document_labels(schema, catalog.class_names)
        app.openapi_schema = schema
    return app.openapi_schema


def _index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.png", media_type="image/png", headers={"Cache-Control": "max-age=86400"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadTooLarge)
    async def too_large(_: Request, error: UploadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    @app.exception_handler(UnsupportedImage)
    async def unsupported(_: Request, error: UnsupportedImage) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=415)

    @app.exception_handler(ImageDecodeError)
    async def undecodable(_: Request, error: ImageDecodeError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(ServerBusy)
    async def busy(_: Request, error: ServerBusy) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 405:
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                                headers={"Allow": ", ".join(allowed_methods(app, request.scope))})
        return await http_exception_handler(request, error)


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
        max_image_pixels=int(env.get("VDSH_SERVE_MAX_IMAGE_PIXELS") or 0) or None,
        memory_limit_bytes=int(env.get("VDSH_SERVE_MEMORY_LIMIT_MB", DEFAULT_MEMORY_LIMIT_MB)) * 1024 * 1024,
        decode_workers=int(env.get("VDSH_SERVE_DECODE_WORKERS", "2")),
        request_timeout_s=float(env.get("VDSH_SERVE_REQUEST_TIMEOUT", "10")),
        int8=env.get("VDSH_SERVE_INT8", "0") == "1",
    )
