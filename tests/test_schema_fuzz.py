"""The OpenAPI schema tells the truth: Schemathesis (every check, every phase, stateful included)
against a real `vdsh serve` on 127.0.0.1, with a fixed seed and a bounded number of examples."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving_fixtures import shared_setup, start_server, stop_server

pytest.importorskip("schemathesis", reason="pip install -e '.[dev]'")
CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "fuzz-key"


def run_schemathesis(url: str, out: Path, max_examples: int = 60, seed: int = 1) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run",
               f"{url}/openapi.json", "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
               "--seed", str(seed), "--max-examples", str(max_examples), "--workers", "1",
               "--header", f"X-API-Key: {KEY}", "--no-color"]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=out)


@pytest.mark.slow
def test_schemathesis_finds_no_failure(tmp_path):
    setup = shared_setup()
    index_dir = tmp_path / "index"
    shutil.copytree(setup.index_dir, index_dir)  # the stateful phase adds and deletes items
    process, url = start_server(index_dir, setup.model_path, api_key=KEY)
    try:
        result = run_schemathesis(url, tmp_path)
    finally:
        stop_server(process)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert counts and int(counts[1]) > 300 and counts[1] == counts[2], report  # every case passed, and many ran
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in result.stdout, report
