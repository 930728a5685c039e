"""DeepMLP: shapes, init, options, and a checkpoint that rebuilds it."""

import pytest
import torch

from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model


def test_layers_are_addressable_and_kaiming_initialised():
    torch.manual_seed(0)
    mlp = DeepMLP(100, depth=5, width=400, bits=32)
    assert [l.weight.shape for l in mlp.linears] == [(400, 100)] + [(400, 400)] * 3 + [(32, 400)]
    # Kaiming fan-in for ReLU: std = sqrt(2 / fan_in).
    assert mlp.linears[2].weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.05)
    assert mlp(torch.randn(7, 100)).shape == (7, 32)


def test_plain_deep_net_keeps_activation_scale():
    torch.manual_seed(0)
    mlp = DeepMLP(256, depth=32, width=256, bits=16)
    out = mlp(torch.randn(512, 256))
    assert 0.1 < out.std().item() < 10  # neither vanished nor exploded through 32 ReLU layers


def test_options_and_bad_input():
    assert DeepMLP(10, 3, 16, 8, batchnorm=True, residual=True)(torch.randn(4, 10)).shape == (4, 8)
    with pytest.raises(ValueError):
        DeepMLP(10, 1, 16, 8)
    with pytest.raises(ValueError, match="expects"):
        DeepMLP(10, 3, 16, 8)(torch.randn(4, 11))


@pytest.mark.parametrize("options", [{}, {"batchnorm": True, "residual": True}])
def test_checkpoint_round_trip(tmp_path, options):
    torch.manual_seed(0)
    model = HashingModel(DeepMLP(784, 4, 64, 48, **options), InputSpec(1, 28, "pixels", [0.13], [0.31])).eval()
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    save_model(tmp_path / "m.safetensors", model, {"trainer": "test"})
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.encoder.config() == model.encoder.config()
    assert torch.equal(loaded.encode(images), model.encode(images))
