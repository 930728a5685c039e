"""The pieces of `vdsh bench serve`: its requests are what the server expects, its ab reports are read right."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from serving_fixtures import png_bytes, shared_setup
from vdsh.app.bench.serve import _parse_ab, bomb_png, upload_call, worst_case_png
from vdsh.app.server.decoding import ImageLimits, read_header
from vdsh.app.server.app import create_app

AB_REPORT = """
Complete requests:      1200
Failed requests:        37
   (Connect: 0, Receive: 0, Length: 35, Exceptions: 2)
Non-2xx responses:      10
Time taken for tests:   8.000 seconds
Requests per second:    150.00 [#/sec] (mean)
Percentage of the requests served within a certain time (ms)
  50%     12
  66%     14
  99%     45
 100%    120 (longest request)
"""


def test_an_ab_report_is_read_with_length_differences_not_counted_as_errors():
    result = _parse_ab(AB_REPORT, 8.0)
    assert (result.requests, result.req_per_s, result.p50_ms, result.p99_ms, result.max_ms) == (1200, 150.0, 12, 45, 120)
    assert result.statuses == {"2xx": 1190, "non-2xx": 10, "errors": 2}


def test_the_benchmark_uploads_are_what_they_claim():
    setup = shared_setup()
    limits = ImageLimits(4 * 1024 * 1024, 1, 28)
    worst = read_header(worst_case_png(limits.max_pixels), limits)
    assert worst.mode == "RGBA" and worst.pixels == limits.max_pixels
    call = upload_call("/search", png_bytes(setup.query_images[0]), {"k": "3"})
    with TestClient(create_app(setup.index_dir, setup.model_path)) as client:
        answer = client.post(call.path, content=call.body, headers=call.headers)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3
        bomb = upload_call("/search", bomb_png())
        assert client.post(bomb.path, content=bomb.body, headers=bomb.headers).status_code == 400


def test_bench_http_serves_the_protocols_query_photos_and_writes_its_section(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    setup = shared_setup()
    monkeypatch.chdir(tmp_path)
    args = ["bench", "http", "--model", str(setup.model_path), "--index", str(setup.index_dir), "--queries", "5",
            "--concurrency", "1,2", "--requests", "12", "--seconds", "10", "--memory-limit-mb", "2048"]
    refused = CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # one line: no wrapped message
    assert refused.exit_code == 2 and "names no protocol" in refused.output
    result = CliRunner().invoke(app, args + ["--protocol", "mnist-sample"])
    assert result.exit_code == 0, result.output
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## HTTP image queries: mnist-sample, pixels" in section and "5 query images of `mnist-sample`" in section
    assert "to `vdsh serve --memory-limit-mb 2048` on" in section
    memory = re.search(r"memory: ([\d,]+) MiB once .* loaded, ([\d,]+) MiB at its peak", section)
    loaded, peak = (float(g.replace(",", "")) for g in memory.groups())
    assert 100 < loaded <= peak < 2048  # a torch process with a model, under the limit it was given
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [int(r[0]) for r in rows] == [1, 2]
    for concurrency, p50, p99, rate, errors, server_p50 in rows:
        assert int(errors) == 0 and 0 < float(p50) <= float(p99) and float(rate) > 0 and float(server_p50) > 0
