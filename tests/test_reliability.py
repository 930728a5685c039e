"""A real `vdsh serve` on 127.0.0.1 under hostile and mixed load, bounded in requests and time:
decompression-bomb PNGs in parallel with code queries, half-open connections, and a soak of mixed
reads and writes whose every acknowledged change must be on disk afterwards. (Kill -9 during writes:
tests/test_server.py.) Speed under this load is measured by `vdsh bench serve`, not asserted here."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
from PIL import Image

from serving_fixtures import png_bytes, shared_setup, start_server, stop_server
from vdsh.index.store import load_index

KEY = "soak-key"
HEADER_TIMEOUT_S = 1.0
pytestmark = pytest.mark.slow


def bomb_png(side: int = 6300) -> bytes:
    """A 1-bit PNG of side x side pixels: about 5 KB for 40 M pixels."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    setup = shared_setup()
    index_dir = tmp_path_factory.mktemp("reliability") / "index"
    shutil.copytree(setup.index_dir, index_dir)
    process, url = start_server(index_dir, setup.model_path, api_key=KEY,
                                options=["--header-timeout-s", str(HEADER_TIMEOUT_S)])
    yield setup, url, index_dir
    stop_server(process)


def run_threads(targets: list) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a load thread did not finish in time"


def test_bomb_pngs_in_parallel_with_code_queries_are_refused_and_the_queries_answered(server):
    setup, url, _ = server
    bomb = bomb_png()
    code = httpx.get(url + "/items/0", timeout=10).json()["code"]
    statuses: dict[str, Counter] = {"bomb": Counter(), "code": Counter(), "health": Counter()}
    details: set[str] = set()
    lock = threading.Lock()

    def send_bombs() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(15):
                response = http.post("/search", files={"image": ("b.png", bomb, "image/png")})
                with lock:
                    statuses["bomb"][response.status_code] += 1
                    details.add(response.json()["detail"])

    def query_codes() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(100):
                response = http.post("/search", json={"code": code, "k": 5})
                with lock:
                    statuses["code"][response.status_code] += 1
                    if response.status_code == 200:
                        assert response.json()["results"][0]["distance"] == 0

    def check_health() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(50):
                statuses["health"][http.get("/health").status_code] += 1

    run_threads([send_bombs, send_bombs, query_codes, query_codes, check_health])
    assert statuses == {"bomb": Counter({400: 30}), "code": Counter({200: 200}), "health": Counter({200: 50})}
    assert len(details) == 1 and "decompression-bomb guard" in details.pop()


def test_half_open_connections_are_closed_after_the_header_timeout(server):
    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    connections = []
    for i in range(20):
        connection = socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10)
        if i % 2:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finished
        connections.append(connection)
    started = time.monotonic()
    try:
        for connection in connections:
            assert connection.recv(1024) == b""  # closed by the server, no answer
    finally:
        for connection in connections:
            connection.close()
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 10
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_soak_of_mixed_reads_and_writes_loses_nothing(server):
    setup, url, index_dir = server
    headers = {"X-API-Key": KEY}
    uploads = [png_bytes(image) for image in setup.query_images[:10]]
    added: list[int] = []
    deleted: list[int] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
            for step in range(25):
                if time.monotonic() > deadline:
                    return
                data = uploads[int(rng.integers(len(uploads)))]
                response = http.post("/items", files={"image": ("s.png", data, "image/png")}, data={"labels": "3"})
                with lock:
                    statuses[("add", response.status_code)] += 1
                    if response.status_code == 201:
                        added.append(response.json()["id"])
                if step % 3 == 2:
                    with lock:
                        victim = added[int(rng.integers(len(added)))] if added else None
                    if victim is not None and victim not in deleted:
                        response = http.delete(f"/items/{victim}")
                        with lock:
                            statuses[("delete", response.status_code)] += 1
                            if response.status_code == 200:
                                deleted.append(victim)

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(60):
                if time.monotonic() > deadline:
                    return
                if rng.random() < 0.5:
                    response = http.post("/search", files={"image": ("q.png", uploads[0], "image/png")}, data={"k": "20"})
                else:
                    response = http.get(f"/items/{int(rng.integers(1000))}")
                with lock:
                    statuses[("read", response.status_code)] += 1

    run_threads([lambda: writer(1), lambda: writer(2), lambda: reader(3), lambda: reader(4)])
    assert not [key for key in statuses if key[1] >= 500], statuses
    assert {key for key in statuses if key[0] == "read"} == {("read", 200)}, statuses
    assert statuses[("add", 201)] == len(added) > 0 and len(set(added)) == len(added)  # no id given twice
    on_disk = load_index(index_dir)
    kept = set(added) - set(deleted)
    assert all(on_disk.index.contains(i) for i in kept)
    assert not any(on_disk.index.contains(i) for i in deleted)
    assert len(on_disk) == httpx.get(url + "/stats", timeout=10).json()["items"]
    assert on_disk.next_id() > max(added)
