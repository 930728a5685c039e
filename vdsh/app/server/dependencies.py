"""Cross-cutting pieces the routers depend on: the loaded catalog, the settings, the API key check.

They are `async def` on purpose: FastAPI runs plain `def` dependencies in its thread pool, a thread hop
per request that costs more than these look-ups do.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from vdsh.app.server.budget import DecodePool
from vdsh.app.server.catalog import Catalog

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="required by write endpoints")


@dataclass(frozen=True)
class Settings:
    """What `vdsh serve` options set; the README's server section lists them with their defaults."""

    api_key: str | None
    max_upload_bytes: int
    read_only: bool = False
    max_image_pixels: int | None = None  # decoded pixels an upload may have; None: from the model's input size
    memory_limit_bytes: int | None = None  # the whole server's; None: a fixed decode budget (DEFAULT_DECODE_BUDGET)
    decode_workers: int = 2  # threads that decode and encode uploads
    request_timeout_s: float = 10.0  # the most an upload's decode + encode may take, queueing included
    budget_wait_s: float = 2.0  # how long a request waits for memory before its 503


def api_key_problem(settings: Settings, key: str | None) -> tuple[int, str] | None:
    """Why a write with this key is refused, as (status, message), or None when it may go ahead."""
    if settings.read_only:
        return 403, "this server is read-only (several workers, or several index shards); writes are disabled"
    if settings.api_key is None:
        return 403, "writes are disabled: start the server with an API key (vdsh serve --api-key ...)"
    if key is None:
        return 401, f"missing API key: send it in the {API_KEY_HEADER} header"
    if not secrets.compare_digest(key.encode(), settings.api_key.encode()):
        return 403, "wrong API key"
    return None


async def get_catalog(request: Request) -> Catalog:
    catalog = getattr(request.app.state, "catalog", None)
    if catalog is None:  # only between start-up failure and shutdown
        raise HTTPException(503, "the index is not loaded")
    return catalog


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def require_api_key(key: str | None = Security(api_key_header), settings: Settings = Depends(get_settings)) -> None:
    """Writes need the configured key; with no key configured, or in read-only mode, writes are off.
    (`vdsh.app.server.app.AuthBeforeBody` applies the same check before the body is read.)"""
    problem = api_key_problem(settings, key)
    if problem is not None:
        raise HTTPException(*problem)


async def get_pool(request: Request) -> DecodePool:
    return request.app.state.pool
