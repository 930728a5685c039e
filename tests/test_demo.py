"""`vdsh demo`, the README's first command: train, evaluate, index and query on the embedded sample, offline."""

import json

import pytest
from typer.testing import CliRunner

from vdsh.app.cli import app


@pytest.mark.slow  # a whole pipeline run (a small network, three sweeps)
def test_demo_runs_the_whole_pipeline_offline(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--depth", "3", "--width", "64", "--bits", "16",
                                      "--iterations", "3"])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "history.json", "split.npz", "metrics.json", "pr_curve.png", "codes.png",
                 "index", "query_0.png"):
        assert (out / name).exists(), name
    assert 0.18 < json.loads((out / "metrics.json").read_text())["metrics"]["mAP@all"] <= 1  # chance: 0.10
    assert result.output.count("top 5 labels") == 3 and "Serve it: vdsh serve" in result.output
