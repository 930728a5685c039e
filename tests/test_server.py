"""The HTTP API, specified by what a client sees: right answers, 4xx for bad input, writes that survive."""

from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving_fixtures import (BITS, encoded_bytes, png_bytes, shared_server, shared_setup, start_server, stop_server,
                              train_ridge_hashing_model)
from vdsh.app.server.catalog import ModelIndexMismatch, ReadOnlyCatalog
from vdsh.app.server.app import create_app
from vdsh.index.store import load_index, save_index
from vdsh.training.encoders.model import save_model

KEY = "test-key"
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def setup():
    return shared_setup()


@pytest.fixture(scope="module")
def client(setup):
    """A read-mostly client on the shared index (tests that write use `writable`)."""
    with TestClient(create_app(setup.index_dir, setup.model_path, api_key=KEY, max_upload_bytes=LIMIT)) as c:
        yield c


@pytest.fixture
def writable(setup, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(setup.index_dir, index_dir)
    with TestClient(create_app(index_dir, setup.model_path, api_key=KEY, max_upload_bytes=LIMIT)) as c:
        c.index_dir = index_dir
        yield c


def upload(image: np.ndarray, name: str = "q.png", content_type: str = "image/png") -> dict:
    return {"image": (name, png_bytes(image), content_type)}


# ------------------------------------------------------------------ search


def test_image_query_returns_its_own_class_at_the_top(client, setup):
    top_classes = []
    for image in setup.query_images:
        response = client.post("/search", files=upload(image), data={"k": "5"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["results"]) == 5 and body["k"] == 5 and body["bits"] == BITS
        distances = [r["distance"] for r in body["results"]]
        assert distances == sorted(distances)
        top_classes.append(body["results"][0]["labels"])
    hits = [setup.class_names[c] in labels for c, labels in zip(setup.query_classes, top_classes)]
    assert np.mean(hits) >= 0.8, f"top-1 class right for only {np.mean(hits):.0%} of queries"


def test_search_answer_carries_metadata_and_timings(client, setup):
    body = client.post("/search", files=upload(setup.query_images[0])).json()
    assert body["k"] == 10 and len(body["results"]) == 10
    first = body["results"][0]
    assert first["source"].startswith("mnist-sample:") and first["thumbnail_url"] == f"/items/{first['id']}/thumbnail"
    timings = body["timings"]
    assert set(timings) == {"decode_ms", "encode_ms", "search_ms", "total_ms"}
    assert all(v >= 0 for v in timings.values()) and timings["total_ms"] >= timings["search_ms"]
    assert len(body["query_code"]) == BITS // 4


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("PNG", "image/png")])
def test_jpeg_webp_and_colour_uploads_are_accepted(client, setup, fmt, content_type):
    big = np.repeat(np.repeat(setup.query_images[1], 5, axis=1), 5, axis=2)  # 140x140, any size is resized
    data = encoded_bytes(big, fmt)
    response = client.post("/search", files={"image": ("q", data, content_type)})
    assert response.status_code == 200, response.text


def test_code_queries_hex_bits_json_and_form_agree(client):
    item = client.get("/items/7").json()
    bits = "".join(f"{b:08b}" for b in bytes.fromhex(item["code"]))[:BITS]
    answers = [
        client.post("/search", json={"code": item["code"], "k": 3}),
        client.post("/search", json={"code": "0x" + item["code"], "k": 3}),
        client.post("/search", json={"code": bits, "k": 3}),
        client.post("/search", data={"code": bits, "k": "3"}),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["results"] == answers[0].json()["results"]
    results = answers[0].json()["results"]
    assert results[0]["distance"] == 0 and 7 in [r["id"] for r in results if r["distance"] == 0]
    assert answers[0].json()["timings"]["encode_ms"] == 0


def test_radius_query_returns_everything_within_the_radius(client):
    code = client.get("/items/3").json()["code"]
    body = client.post("/search", json={"code": code, "radius": 2}).json()
    assert body["radius"] == 2 and body["k"] is None
    assert body["results"] and all(r["distance"] <= 2 for r in body["results"])
    assert body["total_within_radius"] == len(body["results"])
    wider = client.post("/search", json={"code": code, "radius": 6}).json()
    assert wider["total_within_radius"] >= body["total_within_radius"]


def test_radius_with_k_lists_the_k_nearest_within_the_radius(client):
    code = client.get("/items/3").json()["code"]
    everything = client.post("/search", json={"code": code, "radius": 6}).json()
    capped = client.post("/search", json={"code": code, "radius": 6, "k": 3}).json()
    assert everything["total_within_radius"] > 3
    assert capped["k"] == 3 and capped["total_within_radius"] == everything["total_within_radius"]
    assert capped["results"] == everything["results"][:3]


# --------------------------------------------------------------- bad input


def truncated_png(image: np.ndarray) -> bytes:
    data = png_bytes(np.tile(image, (1, 4, 4)))
    return data[: len(data) // 2]


def decompression_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, format="PNG")  # 64 Mpixels in ~60 KB
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name,data,content_type,status,message",
    [
        ("corrupt", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "image/png", 400, "upload: "),
        ("truncated", None, "image/png", 400, "truncated"),
        ("bomb", None, "image/png", 400, "over this server's limit of 4,194,304 decoded pixels (decompression-bomb guard)"),
        ("text", b"hello, not an image", "text/plain", 415, "unsupported content type"),
        ("gif", b"GIF89a" + b"\0" * 40, "image/gif", 415, "unsupported content type"),
        ("lying", b"GIF89a" + b"\0" * 40, "image/png", 415, "not a JPEG, PNG or WebP"),
        ("empty", b"", "image/png", 415, "empty"),
    ],
)
def test_bad_images_get_a_clear_4xx(client, setup, name, data, content_type, status, message):
    if name == "truncated":
        data = truncated_png(setup.query_images[0])
    if name == "bomb":
        data = decompression_bomb()
    response = client.post("/search", files={"image": (name, data, content_type)})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_oversized_uploads_are_refused_by_length_and_by_stream(client):
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(LIMIT + 100 * 1024)
    response = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams
        for _ in range(64):
            yield b"x" * 8192

    response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_an_image_just_over_the_file_limit_is_refused(client):
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (LIMIT + 1)  # body fits the multipart slack, the file does not
    response = client.post("/search", files={"image": ("big.png", data, "image/png")})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body,message",
    [
        ({"code": "abcd", "k": 3}, "expected a 32-bit code"),
        ({"code": "0" * 31, "k": 3}, "expected a 32-bit code"),
        ({"code": "zz" * 4}, "neither hex nor"),
        ({"code": "00" * 4, "k": 0}, "greater than or equal to 1"),
        ({"code": "00" * 4, "k": 1001}, "less than or equal to 1000"),
        ({"code": "00" * 4, "k": True}, "must be a JSON integer"),
        ({"code": "00" * 4, "k": "3"}, "must be a JSON integer"),
        ({"code": "00" * 4, "radius": 2.5}, "must be a JSON integer"),
        ({"code": "00" * 4, "radius": 33}, "at most the code length"),
        ({"code": "00" * 4, "colour": "red"}, "Extra inputs"),
    ],
)
def test_bad_codes_and_parameters_get_422(client, body, message):
    response = client.post("/search", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_bad_form_queries_get_4xx(client, setup):
    assert client.post("/search", files=upload(setup.query_images[0]), data={"k": "0"}).status_code == 422
    assert client.post("/search", files=upload(setup.query_images[0]), data={"k": "ten"}).status_code == 422
    assert client.post("/search", data={"k": "3"}).status_code == 422
    assert client.post("/search", content=b"k=3", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_unknown_ids_get_404(client):
    assert client.get("/items/999999").status_code == 404
    assert client.get("/items/999999/thumbnail").status_code == 404
    assert client.delete("/items/999999", headers={"X-API-Key": KEY}).status_code == 404
    assert client.get("/items/-1").status_code == 422
    assert client.get("/items/abc").status_code == 422


# ------------------------------------------------------------------ items


def test_item_metadata_and_thumbnail(client):
    item = client.get("/items/0").json()
    assert item["id"] == 0 and item["source"].startswith("mnist-sample:") and len(item["labels"]) == 1
    response = client.get(item["thumbnail_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (28, 28)  # MNIST's own size


def test_writes_need_the_api_key(writable, setup):
    files = upload(setup.query_images[0])
    assert writable.post("/items", files=files).status_code == 401
    assert writable.post("/items", files=files, headers={"X-API-Key": "wrong"}).status_code == 403
    assert writable.delete("/items/0", headers={"X-API-Key": "wrong"}).status_code == 403
    assert writable.get("/items/0").status_code == 200  # reads are open


def test_server_without_a_key_refuses_writes(setup):
    with TestClient(create_app(setup.index_dir, setup.model_path)) as c:
        response = c.post("/items", files=upload(setup.query_images[0]), headers={"X-API-Key": "anything"})
        assert response.status_code == 403 and "writes are disabled" in response.json()["detail"]


def test_added_item_is_searchable_and_on_disk(writable, setup):
    image, digit = setup.query_images[2], setup.class_names[setup.query_classes[2]]
    before = writable.get("/stats").json()["items"]
    response = writable.post("/items", files=upload(image, "mine.png"), data={"labels": digit},
                             headers={"X-API-Key": KEY})
    assert response.status_code == 201, response.text
    item = response.json()
    assert item["labels"] == [digit] and item["source"] == "upload:mine.png"
    assert writable.get("/stats").json()["items"] == before + 1
    found = writable.post("/search", files=upload(image), data={"k": "1000"}).json()["results"]
    assert any(r["id"] == item["id"] and r["distance"] == 0 for r in found)
    on_disk = load_index(writable.index_dir)
    assert on_disk.index.contains(item["id"]) and on_disk.sources_of([item["id"]]) == ["upload:mine.png"]

    assert writable.delete(f"/items/{item['id']}", headers={"X-API-Key": KEY}).status_code == 200
    assert writable.get(f"/items/{item['id']}").status_code == 404
    assert not load_index(writable.index_dir).index.contains(item["id"])


def test_bad_writes_change_nothing(writable, setup):
    headers = {"X-API-Key": KEY}
    before = len(load_index(writable.index_dir))
    bad = [
        writable.post("/items", files=upload(setup.query_images[0]), data={"labels": "giraffe"}, headers=headers),
        writable.post("/items", files=upload(setup.query_images[0]), data={"id": "0"}, headers=headers),
        writable.post("/items", files={"image": ("t", truncated_png(setup.query_images[0]), "image/png")}, headers=headers),
        writable.post("/items", files={"image": ("t", b"text", "text/plain")}, headers=headers),
        writable.post("/items", data={"labels": "1"}, headers=headers),
    ]
    assert [r.status_code for r in bad] == [422, 409, 400, 415, 422]
    assert "unknown labels" in bad[0].json()["detail"] and "already exists" in bad[1].json()["detail"]
    assert len(load_index(writable.index_dir)) == before == writable.get("/stats").json()["items"]


def test_reads_go_on_during_writes(writable, setup):
    errors: list[str] = []

    def search_loop():
        for image in setup.query_images[:15]:
            response = writable.post("/search", files=upload(image), data={"k": "20"})
            if response.status_code != 200:
                errors.append(response.text)

    readers = [threading.Thread(target=search_loop) for _ in range(2)]
    for t in readers:
        t.start()
    for image in setup.query_images[:4]:
        assert writable.post("/items", files=upload(image), headers={"X-API-Key": KEY}).status_code == 201
    for t in readers:
        t.join()
    assert not errors
    assert len(load_index(writable.index_dir)) == writable.get("/stats").json()["items"]


# ---------------------------------------------------------- start-up checks


def test_a_different_model_is_refused_at_start_up(setup, tmp_path):
    other = train_ridge_hashing_model(setup.query_images, setup.query_classes, seed=1)
    save_model(tmp_path / "other.safetensors", other)
    with pytest.raises(ModelIndexMismatch, match="was built with model"):
        with TestClient(create_app(setup.index_dir, tmp_path / "other.safetensors")):
            pass


def test_a_different_code_length_is_refused_at_start_up(setup, tmp_path):
    from vdsh.index.store import load_index as load

    items = load(setup.index_dir)
    items.model_id = ""  # an index without a model id is still checked for its code length
    save_index(tmp_path / "index", items)
    other = train_ridge_hashing_model(setup.query_images, setup.query_classes, bits=16)
    save_model(tmp_path / "m16.safetensors", other)
    with pytest.raises(ModelIndexMismatch, match="32-bit codes but the model makes 16-bit"):
        with TestClient(create_app(tmp_path / "index", tmp_path / "m16.safetensors")):
            pass


# ----------------------------------------------------------------- service


def test_health_stats_metrics_and_openapi(client, setup):
    assert client.get("/health").json() == {"status": "ok", "items": 1000}
    stats = client.get("/stats").json()
    assert stats["items"] == 1000 and stats["bits"] == BITS and stats["index_kind"] == "flat"
    assert len(stats["model_id"]) == 16 and stats["class_names"] == setup.class_names
    client.post("/search", json={"code": "00" * 4})
    metrics = client.get("/metrics").text
    assert 'vdsh_http_requests_total{method="POST",route="/search",status="200"}' in metrics
    assert "vdsh_http_request_duration_seconds_bucket" in metrics and "vdsh_index_items 1000.0" in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/thumbnail", "/health", "/stats", "/metrics"} <= set(paths)
    assert "application/json" in paths["/search"]["post"]["requestBody"]["content"]


# ------------------------------------------------------- a real uvicorn process


@pytest.mark.slow
def test_real_uvicorn_process_answers_queries(setup):
    import httpx

    url = shared_server()
    hits = []
    for image, digit in zip(setup.query_images[:10], setup.query_classes[:10]):
        response = httpx.post(url + "/search", files=upload(image), data={"k": "3"}, timeout=10)
        assert response.status_code == 200
        hits.append(setup.class_names[digit] in response.json()["results"][0]["labels"])
    assert np.mean(hits) >= 0.7
    assert httpx.get(url + "/").text.count("<html") == 1


@pytest.mark.slow
def test_killed_mid_write_the_index_loads_with_items_whole_or_absent(setup, tmp_path):
    """SIGKILL the server during a burst of POST /items; every acknowledged item survives, nothing is torn."""
    import httpx

    index_dir = tmp_path / "index"
    shutil.copytree(setup.index_dir, index_dir)
    process, url = start_server(index_dir, setup.model_path, api_key=KEY)
    acknowledged: list[int] = []
    attempted = 0

    def write_burst():
        nonlocal attempted
        with httpx.Client(timeout=30) as http:
            for i in range(200):
                attempted += 1
                try:
                    r = http.post(url + "/items", files=upload(setup.query_images[i % 50]), data={"labels": "1"},
                                  headers={"X-API-Key": KEY})
                except httpx.TransportError:
                    return
                assert r.status_code == 201, r.text
                acknowledged.append(r.json()["id"])

    writer = threading.Thread(target=write_burst)
    writer.start()
    while len(acknowledged) < 3 and writer.is_alive():
        time.sleep(0.01)
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    stop_server(process)
    writer.join(30)
    assert len(acknowledged) >= 3 and attempted > len(acknowledged), "the kill must land during the burst"

    items = load_index(index_dir)
    new_ids = [i for i in items.index.ids.tolist() if i >= 1000]
    assert set(acknowledged) <= set(new_ids) and len(new_ids) <= len(acknowledged) + 1
    for item_id in new_ids:  # every item present is whole: code, labels, source, thumbnail
        assert items.labels_of([item_id])[0].tolist() == [0, 1] + [0] * 8
        assert items.sources_of([item_id]) == ["upload:q.png"] and items.thumbnail_of(item_id).shape == (28, 28, 1)
    assert len(items.index.codes) == len(items.labels) == len(items.sources) == len(items)


def test_a_failed_save_answers_503_and_serves_the_saved_state(writable, setup, monkeypatch):
    from vdsh.app.server import catalog

    before = writable.get("/stats").json()["items"]

    def disk_full(directory, items, added=(), removed=()):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog, "save_changes", disk_full)
    response = writable.post("/items", files=upload(setup.query_images[0]), headers={"X-API-Key": KEY})
    assert response.status_code == 503 and "nothing was added" in response.json()["detail"]
    assert writable.delete("/items/5", headers={"X-API-Key": KEY}).status_code == 503
    assert writable.get("/stats").json()["items"] == before and writable.get("/items/5").status_code == 200


# --------------------------------------------------------------------- CLI


def test_cli_index_build_then_query(setup, tmp_path):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-index"
    result = runner.invoke(app, ["index", "build", "--model", str(setup.model_path), "--protocol", "mnist-sample",
                                 "--part", "database", "--limit", "300", "--kind", "distinct", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "indexed 300 items (32 bits, distinct)" in result.output
    items = load_index(out)
    assert len(items) == 300 and items.index.kind == "distinct" and items.thumbnail_of(0).shape == (28, 28, 1)

    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(setup.query_images[0]))
    result = runner.invoke(app, ["query", "--index", str(out), "--model", str(setup.model_path), str(image), "-k", "4"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "id=" in line]
    assert len(lines) == 4 and all("labels=" in line and "mnist-sample:" in line for line in lines)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    result = runner.invoke(app, ["query", "--index", str(out), "--model", str(setup.model_path), str(broken)])
    assert result.exit_code == 2 and "broken.png" in result.output


def test_cli_index_build_refuses_bad_arguments(setup, tmp_path):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    runner = CliRunner()
    base = ["index", "build", "--model", str(setup.model_path), "--out", str(tmp_path / "x")]
    result = runner.invoke(app, base + ["--dataset", "mnist-sample", "--kind", "btree"])
    assert result.exit_code != 0 and "--kind must be one of" in result.output
    result = runner.invoke(app, base)
    assert result.exit_code != 0 and "give --dataset" in result.output


@pytest.mark.slow
def test_http_load_generator_is_bounded_and_counts_every_request(setup):
    from vdsh.app.bench.http import health_latency, run_load

    url = shared_server()
    uploads = [png_bytes(image) for image in setup.query_images[:5]]
    row = run_load(url, uploads, k=10, concurrency=3, requests=24, duration_s=60)
    assert row["requests"] == 24 and row["errors"] == 0 and row["req_per_s"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    started = time.monotonic()
    row = run_load(url, uploads, k=10, concurrency=2, requests=10**9, duration_s=1.0)  # the time limit stops it
    assert time.monotonic() - started < 15 and row["errors"] == 0 and row["requests"] > 0
    assert len(health_latency(url, 5)) == 2


# ------------------------------------------------------------------ shards


def split_into_shards(index_dir, root, cut: int = 400) -> list:
    """The shared index cut into two shard directories: items [0, cut) and [cut, n), in order."""
    from vdsh.index.hamming_index import HammingIndex
    from vdsh.index.items import ItemIndex

    whole = load_index(index_dir)
    ids = whole.index.ids
    dirs = []
    for i, part in enumerate((ids[:cut], ids[cut:])):
        shard = ItemIndex(HammingIndex(whole.bits, whole.kind), whole.model_id, whole.class_names)
        shard.add(whole.codes_of(part), part, labels=whole.labels_of(part), sources=whole.sources_of(part),
                  thumbnails=[whole.thumbnail_of(int(j)) for j in part])
        save_index(root / f"shard{i}", shard)
        dirs.append(root / f"shard{i}")
    return dirs


def test_server_over_shards_answers_like_one_index_and_is_read_only(client, setup, tmp_path):
    dirs = split_into_shards(setup.index_dir, tmp_path)
    with TestClient(create_app(dirs, setup.model_path, api_key=KEY)) as sharded:
        for image in setup.query_images[:5]:
            want = client.post("/search", files=upload(image), data={"k": "30"}).json()["results"]
            assert sharded.post("/search", files=upload(image), data={"k": "30"}).json()["results"] == want
        code = client.get("/items/3").json()["code"]
        assert (sharded.post("/search", json={"code": code, "radius": 4}).json()["results"]
                == client.post("/search", json={"code": code, "radius": 4}).json()["results"])
        assert sharded.get("/items/700").json() == client.get("/items/700").json()
        assert sharded.get("/items/700/thumbnail").content == client.get("/items/700/thumbnail").content
        stats = sharded.get("/stats").json()
        assert stats["items"] == 1000 and stats["read_only"] and stats["index_kind"] == "flat"
        response = sharded.post("/items", files=upload(setup.query_images[0]), headers={"X-API-Key": KEY})
        assert response.status_code == 403 and "several index shards" in response.json()["detail"]
        with pytest.raises(ReadOnlyCatalog, match="read-only"):
            sharded.app.state.catalog.remove(3)


@pytest.mark.slow
def test_vdsh_serve_with_repeated_index_options_serves_the_shards_as_one(setup, tmp_path):
    import httpx

    dirs = split_into_shards(setup.index_dir, tmp_path, cut=600)
    process, url = start_server(dirs, setup.model_path, api_key=KEY)
    try:
        assert httpx.get(url + "/stats").json()["items"] == 1000
        found = httpx.post(url + "/search", files=upload(setup.query_images[0]), data={"k": "10"}).json()["results"]
        assert found == httpx.post(shared_server() + "/search", files=upload(setup.query_images[0]),
                                   data={"k": "10"}).json()["results"]
        assert httpx.delete(url + "/items/1", headers={"X-API-Key": KEY}).status_code == 403
    finally:
        stop_server(process)


def test_cli_query_searches_repeated_index_options_as_one(setup, tmp_path):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    dirs = split_into_shards(setup.index_dir, tmp_path)
    image = tmp_path / "query.png"
    image.write_bytes(png_bytes(setup.query_images[3]))
    runner = CliRunner()
    base = ["query", "--model", str(setup.model_path), str(image), "-k", "25"]
    whole = runner.invoke(app, base + ["--index", str(setup.index_dir)])
    sharded = runner.invoke(app, base + ["--index", str(dirs[0]), "--index", str(dirs[1])])
    assert whole.exit_code == 0 and sharded.exit_code == 0, sharded.output
    lines = [line for line in sharded.output.splitlines() if "id=" in line]
    assert len(lines) == 25 and lines == [line for line in whole.output.splitlines() if "id=" in line]
