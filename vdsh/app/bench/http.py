"""HTTP end-to-end latency and throughput of a real `vdsh serve` process, under a bounded concurrent load.

`bench_http(index_dir, model_path, images)` starts uvicorn on 127.0.0.1 (a free port), warms it up,
then runs `concurrency` client threads that POST /search with the given images until `requests` are
sent or `duration_s` passes, whichever comes first: the load stops by itself. Latency is measured per
request by the client (send to full response), so it includes HTTP, multipart parsing, decoding,
encoding, search and JSON; the server's own timings are summarised beside it, and so is its resident
memory (Linux /proc): once the model and index are loaded, and its peak under the load.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes, the upload the benchmark sends."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(index_dir: Path | list[Path], model_path: Path, workers: int = 1, timeout_s: float = 60,
                 api_key: str | None = None, options: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:
    """`vdsh serve` (of one index directory, or of several as shards) in a child process on a free
    loopback port, with more `vdsh serve` options if given; returns once /health answers."""
    import httpx

    port = free_port()
    shards = [index_dir] if isinstance(index_dir, (str, Path)) else index_dir
    command = [sys.executable, "-c", "from vdsh.app.cli import main; main()", "serve",
               *[arg for d in shards for arg in ("--index", str(d))],
               "--model", str(model_path), "--port", str(port), "--workers", str(workers)]
    command += ["--api-key", api_key] if api_key else []
    command += list(options)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vdsh serve exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"vdsh serve did not answer /health within {timeout_s} s")


class ResidentMemory:
    """Samples a process's resident memory every `every_s` seconds in a thread; `peak` in bytes."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        """Resident bytes now; 0 where Linux /proc does not say."""
        try:
            lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        except OSError:
            return 0
        return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def __enter__(self) -> "ResidentMemory":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def run_load(url: str, uploads: list[bytes], k: int, concurrency: int, requests: int, duration_s: float) -> dict:
    """Closed-loop load: `concurrency` threads, each sending its next request as soon as the last returns."""
    import httpx

    latencies: list[float] = []
    server_totals: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    sent = 0
    deadline = time.monotonic() + duration_s

    def next_ticket() -> int | None:
        nonlocal sent
        with lock:
            if sent >= requests or time.monotonic() >= deadline:
                return None
            sent += 1
            return sent

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while (ticket := next_ticket()) is not None:
                data = uploads[ticket % len(uploads)]
                started = time.perf_counter()
                try:
                    response = http.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": str(k)})
                    elapsed = time.perf_counter() - started
                except httpx.HTTPError as error:
                    with lock:
                        errors.append(repr(error))
                    continue
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        server_totals.append(response.json()["timings"]["total_ms"])
                    else:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 3),
        "req_per_s": round(len(latencies) / wall, 1) if wall else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "mean_ms": round(float(ms.mean()), 2) if len(ms) else None,
        "server_total_p50_ms": round(float(np.median(server_totals)), 2) if server_totals else None,
    }


def bench_http(
    index_dir: str | Path,
    model_path: str | Path,
    images: np.ndarray,
    k: int = 10,
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests: int = 500,
    duration_s: float = 20.0,
    warmup: int = 20,
    workers: int = 1,
    options: Sequence[str] = (),
) -> dict:
    """Latency (p50/p99 per request) and sustained req/s of image queries over HTTP at each concurrency.

    images: uint8 (N, C, H, W) query images, sent as PNG uploads in turn. Each level stops after
    `requests` requests or `duration_s` seconds; options: more `vdsh serve` options. Returns a dict with one row per concurrency level.
    """
    import platform

    uploads = [png_bytes(image) for image in images]
    process, url = start_server(Path(index_dir), Path(model_path), workers=workers, options=options)
    try:
        import httpx

        stats = httpx.get(url + "/stats", timeout=10).json()
        memory = ResidentMemory(process.pid, every_s=0.1)  # seldom: the client shares the CPU with the server
        loaded = memory.now()
        with memory:
            run_load(url, uploads, k, concurrency=1, requests=warmup, duration_s=duration_s)
            baseline = health_latency(url, min(requests, 200))
            rows = [run_load(url, uploads, k, c, requests, duration_s) for c in concurrency]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    return {
        "what": "POST /search with a PNG upload over HTTP to vdsh serve on 127.0.0.1 (client-measured)",
        "items": stats["items"],
        "bits": stats["bits"],
        "index_kind": stats["index_kind"],
        "k": k,
        "workers": workers,
        "image_bytes_mean": int(np.mean([len(u) for u in uploads])),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "health_p50_ms": baseline[0],
        "health_p99_ms": baseline[1],
        "loaded_mib": loaded / 2**20 if loaded else None,  # resident once loaded, and its peak under the load
        "peak_mib": max(loaded, memory.peak) / 2**20 if loaded else None,
        "rows": rows,
    }


def health_latency(url: str, requests: int) -> tuple[float, float]:
    """p50/p99 ms of GET /health, one at a time: the floor HTTP itself costs on this machine right now."""
    import httpx

    times = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(requests):
            started = time.perf_counter()
            http.get("/health")
            times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return round(float(np.percentile(ms, 50)), 2), round(float(np.percentile(ms, 99)), 2)
