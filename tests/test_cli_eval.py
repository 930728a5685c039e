"""`vdsh eval` on code files written by an outside encoder."""

import json

import torch
from typer.testing import CliRunner

from vdsh.app.cli import app
from vdsh.data import load_protocol
from vdsh.index.codes import CodeSet, save_codes, sign_codes


def random_projection_codes(tmp_path, bits=32):
    """LSH on centred pixels of the embedded sample: a real, if crude, hashing baseline."""
    pool, split = load_protocol("mnist-sample")
    x = torch.from_numpy(pool.images.reshape(len(pool), -1)).float()
    x -= x[split.train].mean(0)
    codes = sign_codes(x @ torch.randn(x.shape[1], bits, generator=torch.Generator().manual_seed(0)))
    save_codes(tmp_path / "query.npz", CodeSet.from_codes(codes[split.query], pool.labels[split.query]))
    save_codes(tmp_path / "db.h5", CodeSet.from_codes(codes[split.database], pool.labels[split.database]))


def test_eval_prints_metrics_and_writes_json_and_plot(tmp_path):
    random_projection_codes(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--query", str(tmp_path / "query.npz"), "--database",
                                      str(tmp_path / "db.h5"), "--map-at", "1000", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "mAP@all" in result.output and "P@H<=2" in result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bits"] == 32 and metrics["n_query"] == 1000 and metrics["n_database"] == 9000
    assert 0.2 < metrics["metrics"]["mAP@all"] < 0.9  # LSH on pixels: well above chance (0.1), far from perfect
    assert len(metrics["pr_curve"]["precision"]) == 33
    assert (tmp_path / "out" / "pr_curve.png").stat().st_size > 1000


def test_eval_refuses_mismatched_code_lengths(tmp_path):
    random_projection_codes(tmp_path)
    save_codes(tmp_path / "q16.npz", CodeSet.from_codes(torch.ones(3, 16), [[1, 0]] * 3))
    result = CliRunner().invoke(app, ["eval", "--query", str(tmp_path / "q16.npz"), "--database", str(tmp_path / "db.h5")])
    assert result.exit_code != 0 and "16 bits" in result.output


def test_eval_missing_file_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--query", str(tmp_path / "nope.npz"), "--database", str(tmp_path / "nope.npz")])
    assert result.exit_code != 0
    assert "codes file not found" in str(result.exception) + result.output
