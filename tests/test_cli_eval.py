"""`vdsh eval` on code files written by an outside encoder."""

import json

import pytest
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


def test_eval_with_a_model_scores_its_own_protocol(tmp_path):
    """--model encodes the protocol the model records and gives the same mAP as scoring its codes directly."""
    from vdsh.index.metrics import mean_average_precision
    from vdsh.training.encoders.linear import LinearEncoder
    from vdsh.training.encoders.model import HashingModel, InputSpec, save_model

    torch.manual_seed(0)
    model = HashingModel(LinearEncoder(784, 16), InputSpec(channels=1, size=28, mean=[0.13], std=[0.31]))
    save_model(tmp_path / "m.safetensors", model, {"protocol": "mnist-sample"})
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pool, split = load_protocol("mnist-sample")
    expected = mean_average_precision(model.encode(pool.images[split.query]), pool.labels[split.query],
                                      model.encode(pool.images[split.database]), pool.labels[split.database])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_query"] == 1000 and metrics["n_database"] == 9000 and metrics["bits"] == 16
    assert metrics["metrics"]["mAP@all"] == pytest.approx(expected, abs=1e-6)


def test_train_a_baseline_then_eval_its_model(tmp_path):
    """`vdsh train --trainer itq` saves a model whose codes `vdsh eval --model` scores far above chance (0.10)."""
    out = tmp_path / "itq"
    trained = CliRunner().invoke(app, ["train", "--protocol", "mnist-sample", "--trainer", "itq", "--bits", "32", "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(app, ["eval", "--model", str(out / "model.safetensors"), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    map_all = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["mAP@all"]
    assert map_all > 0.3  # ITQ on pixels of the sample: ~0.45; LSH ~0.27, chance 0.10
