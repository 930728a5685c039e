"""A saved model rebuilds to the same codes; bad files fail clearly."""

import pytest
import torch

from vdsh.data import load
from vdsh.training.encoders.linear import LinearEncoder
from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, model_id, save_model


def small_model() -> HashingModel:
    torch.manual_seed(0)
    return HashingModel(LinearEncoder(784, 24), InputSpec(channels=1, size=28, mean=[0.13], std=[0.31]))


def test_saved_model_gives_identical_codes(tmp_path):
    images = load("mnist-sample").images[:100]
    model = small_model()
    save_model(tmp_path / "m.safetensors", model, {"trainer": "test"})
    again = load_model(tmp_path / "m.safetensors")
    assert again.bits == 24 and again.info == {"trainer": "test"}
    codes = model.encode(images)
    assert codes.shape == (100, 24) and set(codes.unique().tolist()) == {-1, 1}
    assert torch.equal(codes, again.encode(images, batch_size=7))


def test_model_id_changes_with_weights(tmp_path):
    model = small_model()
    save_model(tmp_path / "a.safetensors", model)
    with torch.no_grad():
        model.encoder.projection.weight[0, 0] += 1
    save_model(tmp_path / "b.safetensors", model)
    assert model_id(tmp_path / "a.safetensors") != model_id(tmp_path / "b.safetensors")


def test_bad_model_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_model(tmp_path / "junk.safetensors")


def test_wrong_image_shape_is_refused():
    with pytest.raises(ValueError, match="expects images of shape"):
        small_model().encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_gist_inputs_are_standardised_per_dimension_and_the_statistics_survive_saving(tmp_path):
    from vdsh.data.gist import gist_features

    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    raw = gist_features(images)
    mean, std = raw.mean(0), raw.std(0) + 1e-3
    spec = InputSpec(3, 32, "gist", mean.tolist(), std.tolist())
    assert torch.allclose(spec.prepare(images), (raw - mean) / std, atol=1e-5)
    model = HashingModel(LinearEncoder(raw.shape[1], 16), spec)
    save_model(tmp_path / "m.safetensors", model, {})
    assert torch.equal(load_model(tmp_path / "m.safetensors").encode(images), model.encode(images))


def test_encode_runs_batch_norm_in_eval_mode_even_when_only_the_encoder_is_training():
    from vdsh.training.encoders.mlp import DeepMLP

    torch.manual_seed(0)
    model = HashingModel(DeepMLP(4, depth=3, width=8, bits=6, batchnorm=True), InputSpec(channels=1, size=2, features="pixels"))
    model.train()(torch.randint(0, 256, (16, 1, 2, 2), dtype=torch.uint8))  # move BN running stats off (0, 1)
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8)
    model.eval()
    expected = model.encode(images)
    model.encoder.train()  # the top module says eval, its encoder trains: encode must still use running statistics
    assert torch.equal(model.encode(images[:1]), expected[:1])
    assert torch.equal(model.encode(images), expected)
    model.train()
    assert torch.equal(model.encode(images), expected) and model.training and model.encoder.training
