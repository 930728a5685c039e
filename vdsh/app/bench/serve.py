"""`vdsh bench serve`: the server under hostile load, measured from outside by client processes.

A real `vdsh serve` (default limits) runs on 127.0.0.1 over a copy of the given index; closed-loop
clients (separate processes with keep-alive `http.client` connections, so the client's GIL is not the
bottleneck) send requests for a fixed time. Scenarios, each against the issue's goals:

- code-only queries (JSON), unloaded, then beside two clients sending 6300 x 6300 1-bit PNGs
  (decompression bombs, ~5 KB each): throughput kept and p99, and /health p99 under that load;
- image queries (28 x 28 PNG uploads) and code queries, alone and beside one writer adding items;
- 16 parallel worst-case uploads (an RGBA PNG at the pixel limit, the most one decode may hold):
  the server's peak resident memory, the slowest answer, and the status of every answer.

The client processes share the machine's cores with the server, so every figure is a floor.
"""

from __future__ import annotations

import http.client
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vdsh.app.bench.http import ResidentMemory, png_bytes, start_server

API_KEY = "bench-key"


@dataclass(frozen=True)
class Call:
    """One request a client sends again and again."""

    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_call(path: str, body: str) -> Call:
    return Call("POST", path, body.encode(), {"Content-Type": "application/json"})


def upload_call(path: str, image: bytes, fields: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Call:
    """A multipart/form-data POST with one PNG part named `image` and text fields."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Call("POST", path, body, {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})


def _client(url: str, calls: list[Call], duration_s: float, ready, results) -> None:
    """One closed-loop client: send the calls in turn until the time is up; report latencies and statuses."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    latencies, statuses, sent = [], Counter(), 0
    ready.wait()  # every client of every group starts at once
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        call = calls[sent % len(calls)]
        sent += 1
        started = time.perf_counter()
        try:
            connection.request(call.method, call.path, body=call.body, headers=call.headers)
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            statuses["connection error"] += 1
            connection.close()
            continue
        latencies.append(time.perf_counter() - started)
        statuses[str(response.status)] += 1
    connection.close()
    results.put((latencies, dict(statuses)))


@dataclass
class LoadResult:
    requests: int
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    statuses: dict[str, int]


def run_load(url: str, groups: dict[str, tuple[list[Call], int]], duration_s: float, client: str = "python") -> dict[str, LoadResult]:
    """Each group's `clients` send its calls for `duration_s`, all groups at once: `python` client
    processes, or one ApacheBench (`ab`, C, far lighter on a shared CPU) per group, which sends the
    group's first call only."""
    if client == "ab":
        return run_ab(url, groups, duration_s)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    queues, processes = {}, []
    ready = context.Barrier(sum(clients for _, clients in groups.values()) + 1)
    for name, (calls, clients) in groups.items():
        queues[name] = context.Queue()
        for _ in range(clients):
            process = context.Process(target=_client, args=(url, calls, duration_s, ready, queues[name]))
            process.start()
            processes.append(process)
    ready.wait(timeout=120)
    out = {}
    for name, (_, clients) in groups.items():
        parts = [queues[name].get(timeout=duration_s + 120) for _ in range(clients)]
        ms = np.array([x for latencies, _ in parts for x in latencies]) * 1000
        statuses = Counter()
        for _, counts in parts:
            statuses.update(counts)
        out[name] = LoadResult(
            requests=len(ms), req_per_s=round(len(ms) / duration_s, 1),
            p50_ms=round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            p99_ms=round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
            max_ms=round(float(ms.max()), 1) if len(ms) else None,
            statuses=dict(sorted(statuses.items())),
        )
    for process in processes:
        process.join(30)
    return out


def run_ab(url: str, groups: dict[str, tuple[list[Call], int]], duration_s: float) -> dict[str, LoadResult]:
    """One `ab -k -c clients -t duration` per group, started together; figures parsed from its report.
    `ab` counts answers whose length differs from the first as failed: only connection, receive and
    exception failures are counted as errors here."""
    workdir = Path(tempfile.mkdtemp(prefix="vdsh-ab-"))
    runs = {}
    try:
        for name, (calls, clients) in groups.items():
            call = calls[0]
            command = ["ab", "-k", "-q", "-c", str(clients), "-t", f"{duration_s:g}", "-n", "100000000", "-s", "60"]
            for header, value in call.headers.items():
                if header.lower() == "content-type":
                    command += ["-T", value]
                else:
                    command += ["-H", f"{header}: {value}"]
            if call.method == "POST":
                body = workdir / f"{name.replace(' ', '_')}.body"
                body.write_bytes(call.body)
                command += ["-p", str(body)]
            runs[name] = subprocess.Popen(command + [url + call.path],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return {name: _parse_ab(run.communicate(timeout=duration_s + 120)[0], duration_s) for name, run in runs.items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _parse_ab(report: str, duration_s: float) -> LoadResult:
    def number(pattern: str, default: float = 0.0) -> float:
        match = re.search(pattern, report)
        return float(match.group(1)) if match else default

    complete = int(number(r"Complete requests:\s+(\d+)"))
    if not complete:
        raise RuntimeError(f"ab sent nothing:\n{report[-1500:]}")
    non_2xx = int(number(r"Non-2xx responses:\s+(\d+)"))
    errors = sum(int(number(rf"{kind}: (\d+)")) for kind in ("Connect", "Receive", "Exceptions"))
    taken = number(r"Time taken for tests:\s+([\d.]+)", duration_s)
    statuses = {"2xx": max(0, complete - non_2xx), "non-2xx": non_2xx, "errors": errors}
    return LoadResult(
        requests=complete, req_per_s=round(complete / taken, 1),
        p50_ms=number(r"\n\s+50%\s+(\d+)"), p99_ms=number(r"\n\s+99%\s+(\d+)"),
        max_ms=number(r"\n\s+100%\s+(\d+)"), statuses={k: v for k, v in statuses.items() if v},
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bomb_png(side: int = 6300) -> bytes:
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def worst_case_png(max_pixels: int) -> bytes:
    """An RGBA PNG of (about) `max_pixels` pixels, a smooth gradient so that the file stays small."""
    from PIL import Image

    side = int(max_pixels ** 0.5)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :], np.full((side, side), 255, np.uint8)), -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def bench_serve(index_dir: str | Path, model_path: str | Path, query_images: np.ndarray, duration_s: float = 8.0,
                clients: int = 8, client: str = "python") -> dict:
    """Every scenario of the module docstring; returns a dict of `LoadResult`s and memory figures."""
    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="vdsh-bench-serve-"))
    try:
        shutil.copytree(index_dir, workdir / "index")  # the writer scenario adds items
        process, url = start_server(workdir / "index", Path(model_path), api_key=API_KEY)
        try:
            stats = httpx.get(url + "/stats", timeout=10).json()
            code = httpx.get(url + "/openapi.json", timeout=30).json()["paths"]["/search"]["post"]["requestBody"][
                "content"]["application/json"]["example"]["code"]
            memory = ResidentMemory(process.pid)
            rss_start = memory.now()
            code_calls = [json_call("/search", f'{{"code": "{code}", "k": 10}}')]
            image_calls = [upload_call("/search", png_bytes(image), {"k": "10"}) for image in query_images[:50]]
            bomb_calls = [upload_call("/search", bomb_png())]
            health_calls = [Call("GET", "/health")]
            add_calls = [upload_call("/items", png_bytes(image), headers={"X-API-Key": API_KEY}) for image in query_images[:20]]
            run_load(url, {"warm-up": (code_calls + image_calls, 2)}, 2.0, client)
            cpu_ms: dict[str, float] = {}

            def measured(groups: dict, names: dict[str, str]) -> dict[str, LoadResult]:
                """run_load, with the server's CPU time per answer over the whole run (load-independent)."""
                before = cpu_seconds(process.pid)
                results = run_load(url, groups, duration_s, client)
                per_answer = 1000 * (cpu_seconds(process.pid) - before) / max(1, sum(r.requests for r in results.values()))
                cpu_ms.update({names[group]: round(per_answer, 2) for group in results})
                return {names[group]: result for group, result in results.items()}

            rows = measured({"code": (code_calls, clients)}, {"code": "code queries"})
            rows |= measured({"image": (image_calls, clients)}, {"image": "image queries"})
            rows |= measured({"health": (health_calls, 1)}, {"health": "health"})
            rows |= measured({"code": (code_calls, clients), "bomb": (bomb_calls, 2), "health": (health_calls, 1)},
                             {"code": "code queries + 2 bomb clients", "bomb": "bomb uploads (6300² 1-bit PNG)",
                              "health": "health + 2 bomb clients"})
            rows |= measured({"image": (image_calls, clients), "add": (add_calls, 1)},
                             {"image": "image queries + 1 writer", "add": "writer (POST /items)"})
            rows |= measured({"code": (code_calls, clients), "add": (add_calls, 1)},
                             {"code": "code queries + 1 writer", "add": "writer beside code queries"})
            max_pixels = int(stats["max_image_pixels"])
            worst = worst_case_png(max_pixels)
            with memory:
                rows |= measured({"worst": ([upload_call("/search", worst)], 16)}, {"worst": "16 parallel worst-case uploads"})
            rss_end = memory.now()
        finally:
            process.terminate()
            process.wait(30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "items": stats["items"], "bits": stats["bits"], "index_kind": stats["index_kind"], "clients": clients,
        "duration_s": duration_s, "client": client, "rows": rows, "cpu_ms": cpu_ms, "max_pixels": max_pixels,
        "worst_case_bytes": len(worst),
        "rss_start_mb": rss_start / 2**20, "rss_peak_mb": memory.peak / 2**20, "rss_end_mb": rss_end / 2**20,
        "load_average": os.getloadavg()[0],
    }
