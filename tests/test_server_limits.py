"""What the server does with costly or hostile requests: decode budgets, the memory budget, auth before
the body, ids never reused, and a schema, headers and page that tell the truth."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving_fixtures import png_bytes, shared_server, shared_setup
from vdsh.app.server.budget import MemoryBudget, ServerBusy
from vdsh.app.server.catalog import Catalog
from vdsh.app.server.decoding import ImageLimits, decode_for_model, default_max_pixels, read_header
from vdsh.app.server.app import MemoryLimitTooLow, create_app, release_freed_memory, resident_bytes
from vdsh.data.transforms import ImageDecodeError, load_image
from vdsh.index.store import load_index, save_index

KEY = "limits-key"
BOMB_MESSAGE = "decoded pixels (decompression-bomb guard)"


def image_bytes(mode: str, size: tuple[int, int], fmt: str = "PNG", colour=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup():
    return shared_setup()


@pytest.fixture
def writable(setup, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(setup.index_dir, index_dir)
    with TestClient(create_app(index_dir, setup.model_path, api_key=KEY, budget_wait_s=0.2)) as client:
        client.index_dir = index_dir
        yield client


# ------------------------------------------------------------ decode budget


def test_pixel_limit_follows_the_model_input_within_a_floor_and_a_ceiling():
    assert default_max_pixels(28) == 4 * 1024 * 1024  # 64 x 28 = 1792 a side, under the floor
    assert default_max_pixels(48) == (64 * 48) ** 2
    assert default_max_pixels(224) == 16 * 1024 * 1024


@pytest.mark.parametrize("side", [6300, 8000, 20000])  # under, over and far over Pillow's own bomb limits
def test_every_decompression_bomb_gets_the_same_message_from_the_header_alone(writable, monkeypatch, side):
    def never(*_):
        raise AssertionError("a bomb must be refused before decoding")

    monkeypatch.setattr(Catalog, "decode", never)
    data = image_bytes("1", (side, side))
    assert len(data) < 64 * 1024  # tiny uploads, huge images
    for response in (writable.post("/search", files={"image": ("b.png", data, "image/png")}),
                     writable.post("/items", files={"image": ("b.png", data, "image/png")}, headers={"X-API-Key": KEY})):
        assert response.status_code == 400 and BOMB_MESSAGE in response.json()["detail"], response.text
        assert response.json()["detail"].startswith("upload: the image has ")


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_within_the_limit(writable, setup):
    limits = ImageLimits(default_max_pixels(28), 1, 28)
    photo = image_bytes("RGB", (4000, 3000), "JPEG", (200, 30, 30))  # 12 M pixels, over the 4 M limit
    header = read_header(photo, limits)
    assert (header.width, header.height) == (500, 375)  # DCT scaling to 1/8 still covers 28 x 28
    assert decode_for_model(photo, limits).shape == (1, 28, 28)
    response = writable.post("/search", files={"image": ("p.jpg", photo, "image/jpeg")})
    assert response.status_code == 200, response.text
    png = image_bytes("RGB", (4000, 3000))  # PNG has no reduced decode: refused
    assert writable.post("/search", files={"image": ("p.png", png, "image/png")}).status_code == 400


def test_budgeted_decoding_matches_the_plain_decoder_on_ordinary_images(setup):
    limits = ImageLimits(default_max_pixels(28), 1, 28)
    for image in setup.query_images[:5]:
        data = png_bytes(image)
        assert np.array_equal(decode_for_model(data, limits), load_image(data, channels=1, size=28))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_for_model(png_bytes(setup.query_images[0])[:60], limits)


# ------------------------------------------------------------ memory budget


def test_memory_budget_waits_then_refuses_and_never_goes_over():
    async def scenario() -> None:
        budget = MemoryBudget(100, wait_s=0.2)
        await budget.reserve(60)
        with pytest.raises(ServerBusy):
            await budget.reserve(50)  # waits 0.2 s, nothing is released
        waiting = asyncio.create_task(budget.reserve(50))
        await asyncio.sleep(0.05)
        budget.release(60)  # frees room while it waits
        await waiting
        assert budget.reserved == 50 and budget.peak <= 100
        with pytest.raises(ServerBusy):
            await budget.reserve(101)  # can never fit

    asyncio.run(scenario())


def test_uploads_over_the_memory_budget_get_503_with_retry_after(writable, setup):
    budget = writable.app.state.budget
    budget.reserved = budget.limit_bytes - 1000  # as if other decodes held nearly all of it
    try:
        response = writable.post("/search", files={"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")})
        assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
        assert "memory budget" in response.json()["detail"]
        assert writable.post("/search", json={"code": "00" * 4}).status_code == 200  # tiny bodies still fit
    finally:
        budget.reserved -= budget.limit_bytes - 1000
    assert writable.post("/search", files={"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")}).status_code == 200
    assert budget.reserved == 0


def test_a_decode_over_the_time_limit_gets_503_and_keeps_its_memory_until_it_ends(setup, monkeypatch):
    real_decode = Catalog.decode

    def slow_decode(self, data):
        time.sleep(0.6)
        return real_decode(self, data)

    monkeypatch.setattr(Catalog, "decode", slow_decode)
    with TestClient(create_app(setup.index_dir, setup.model_path, request_timeout_s=0.1)) as client:
        response = client.post("/search", files={"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")})
        assert response.status_code == 503 and "took more than 0.1 s" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
        budget = client.app.state.budget
        deadline = time.monotonic() + 5
        while budget.reserved and time.monotonic() < deadline:
            time.sleep(0.05)
            client.get("/health")  # the release runs on the event loop
        assert budget.reserved == 0


def test_a_memory_limit_below_the_loaded_server_refuses_to_start(setup):
    with pytest.raises(MemoryLimitTooLow, match="raise --memory-limit-mb"):
        with TestClient(create_app(setup.index_dir, setup.model_path, memory_limit_bytes=64 * 1024 * 1024)):
            pass


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from Linux /proc")
def test_freed_heap_pinned_by_live_objects_is_handed_back_to_the_os():
    """Loading leaves freed heap pinned by live neighbours (resident until trimmed); the budget must not count it."""
    freed, pinned = [], []
    for _ in range(1000):  # small malloc'd objects between the freed ones keep the heap from shrinking by itself
        freed.append(os.urandom(100_000))
        pinned.append(os.urandom(1000))
    del freed
    before = resident_bytes()
    release_freed_memory()
    assert before - resident_bytes() > 50 * 2**20


# ---------------------------------------------------------- auth before body


@pytest.mark.slow
def test_writes_without_a_key_are_refused_before_the_body_is_read(setup):
    """A 5 MB body is announced but never sent: the answer must come from the headers alone."""
    host, port = shared_server().removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: 5000000\r\n\r\n")
        answer = b""
        while chunk := connection.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403") and b"writes are disabled" in answer


def test_a_wrong_key_is_refused_before_the_body_and_reads_stay_open(writable, setup):
    files = {"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")}
    assert writable.post("/items", files=files, headers={"X-API-Key": "wrong"}).status_code == 403
    assert writable.post("/items", files=files).status_code == 401
    assert writable.post("/search", files=files).status_code == 200


# ------------------------------------------------------------ ids and caches


def test_ids_are_never_reused_across_deletes_and_restarts(writable, setup):
    headers = {"X-API-Key": KEY}
    files = {"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")}
    first = writable.post("/items", files=files, headers=headers).json()["id"]
    assert writable.delete(f"/items/{first}", headers=headers).status_code == 200
    second = writable.post("/items", files=files, headers=headers).json()["id"]
    assert second == first + 1
    refused = writable.post("/items", files=files, data={"id": str(first)}, headers=headers)
    assert refused.status_code == 409 and "never reused" in refused.json()["detail"]
    assert writable.delete(f"/items/{second}", headers=headers).status_code == 200
    reloaded = load_index(writable.index_dir)  # replays the deltas
    assert reloaded.next_id() == second + 1
    save_index(writable.index_dir, reloaded)  # a full save keeps the counter too
    assert load_index(writable.index_dir).next_id() == second + 1


def test_thumbnails_carry_an_etag_of_their_pixels(writable, setup):
    headers = {"X-API-Key": KEY}
    response = writable.get("/items/0/thumbnail")
    etag = response.headers["etag"]
    assert response.headers["cache-control"] == "no-cache"
    assert writable.get("/items/0/thumbnail", headers={"If-None-Match": etag}).status_code == 304
    white = np.full((1, 28, 28), 255, np.uint8)
    added = writable.post("/items", files={"image": ("w.png", png_bytes(white), "image/png")}, headers=headers).json()
    assert writable.get(f"/items/{added['id']}/thumbnail").headers["etag"] != etag


# ------------------------------------------------------------- schema truth


def test_openapi_examples_are_codes_of_the_served_index(writable):
    schema = writable.get("/openapi.json").json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]
    example = body["schema"]["properties"]["code"]["examples"][0]
    assert len(example) == 8  # 32 bits
    answer = writable.post("/search", json=body["example"])
    assert answer.status_code == 200 and answer.json()["results"][0]["distance"] == 0


def test_allow_lists_every_method_of_the_path(writable):
    response = writable.options("/items/0")
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET"
    assert writable.put("/search").headers["allow"] == "POST"


def test_form_fields_are_checked_like_the_schema_says(writable, setup):
    data = png_bytes(setup.query_images[0])
    unknown = writable.post("/search", files={"image": ("q.png", data, "image/png")}, data={"colour": "red"})
    assert unknown.status_code == 422 and "unknown form fields ['colour']" in unknown.json()["detail"]
    not_a_file = writable.post("/search", files={"image": (None, data)})
    assert not_a_file.status_code == 400 and "must be a file" in not_a_file.json()["detail"]
    untyped = writable.post("/search", files={"image": ("q.png", data, "")})
    assert untyped.status_code == 200  # a part without a content type is judged by its bytes


# ------------------------------------------------------------- page, metrics


def test_answers_say_when_nothing_is_close(writable, setup):
    near = writable.post("/search", files={"image": ("q.png", png_bytes(setup.query_images[0]), "image/png")}).json()
    assert near["close_match"] and near["results"][0]["distance"] <= near["far_distance"]
    white = np.full((1, 28, 28), 255, np.uint8)  # nothing like a digit
    far = writable.post("/search", files={"image": ("w.png", png_bytes(white), "image/png")}).json()
    assert not far["close_match"] and far["results"][0]["distance"] > far["far_distance"] == near["far_distance"]


def test_favicon_and_metrics_label_every_route(writable):
    favicon = writable.get("/favicon.ico")
    assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/png"
    writable.get("/docs")
    writable.get("/static/app.js")
    writable.get("/no/such/page")
    metrics = writable.get("/metrics").text
    for route in ("/docs", "/static", "/favicon.ico"):
        assert f'route="{route}",status="200"' in metrics
    assert 'route="unmatched",status="404"' in metrics
