"""`vdsh train --trainer X` for the methods of issue 6, and `vdsh bench methods` on a small subset."""

import json

import pytest
from typer.testing import CliRunner

from vdsh.app.cli import app
from vdsh.training.encoders.model import load_model


def test_every_method_has_a_trainer_behind_the_command():
    from vdsh.training.encoders.sigmoid_mlp import SigmoidEncoder
    from vdsh.training.run import RunConfig, build_encoder
    from vdsh.training.trainers.altmin import AltMinTrainer
    from vdsh.training.trainers.base import Trainer
    from vdsh.training.trainers.features_replay import FeaturesReplayTrainer
    from vdsh.training.trainers.registry import CNN_METHODS, MLP_METHODS
    from vdsh.training.trainers.semantic_hashing import SemanticHashingTrainer
    from vdsh.training.trainers.taylor_admm import TaylorAdmmTrainer

    expected = {"altmin": AltMinTrainer, "taylor": TaylorAdmmTrainer, "replay": FeaturesReplayTrainer, "semantic": SemanticHashingTrainer}
    for name, cls in expected.items():
        method = MLP_METHODS[name]
        trainer = method.trainer(method.options({"seed": 1}))
        assert isinstance(trainer, cls) and trainer.options.seed == 1
    for method in [*MLP_METHODS.values(), *CNN_METHODS.values()]:
        options = method.options({})  # what the progress bar counts: the iterations field, or the hybrid's steps
        assert issubclass(method.trainer, Trainer) and (hasattr(options, "steps") or hasattr(options, method.iterations))
    config = RunConfig("mnist-sample", "semantic", 16, depth=3, width=32)
    assert isinstance(build_encoder(config, MLP_METHODS["semantic"], None, (784,), 10), SigmoidEncoder)


# The ReLU-network trainers share one code path in the command; semantic hashing builds another encoder.
@pytest.mark.slow
@pytest.mark.parametrize("trainer, options", [("altmin", {}), ("semantic", {"rbm_epochs": 1})])
def test_train_command_runs_a_method_and_saves_a_loadable_model(trainer, options, tmp_path):
    result = CliRunner().invoke(app, ["train", "--trainer", trainer, "--protocol", "mnist-sample", "--bits", "8",
                                      "--depth", "2", "--width", "16", "--sweeps", "1", "--out", str(tmp_path),
                                      "--options", json.dumps(options)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert 0 < metrics["map_all"] <= 1
    model = load_model(tmp_path / "model.safetensors")
    assert model.bits == 8 and model.info["trainer"] == trainer
    assert json.loads((tmp_path / "history.json").read_text())[-1]["time"] > 0


def test_train_command_names_the_known_trainers():
    result = CliRunner().invoke(app, ["train", "--trainer", "nope", "--protocol", "mnist-sample"])
    assert result.exit_code != 0 and "altmin" in result.output


@pytest.mark.slow
def test_bench_methods_writes_a_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "methods", "--protocols", "mnist-sample", "--bits", "8",
                                      "--methods", "lsh,altmin", "--depth", "2", "--width", "16", "--sweeps", "1",
                                      "--train-limit", "300", "--out", "bm"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Methods: mnist-sample" in text and "| lsh | 8 |" in text and "| altmin | 8 |" in text
    assert (tmp_path / "bm" / "mnist-sample-8-pr.png").is_file()
    assert (tmp_path / "bm" / "mnist-sample-8-map-vs-time.png").is_file()
    results = json.loads((tmp_path / "bm" / "mnist-sample-results.json").read_text())
    assert {r["method"] for r in results} == {"lsh", "altmin"} and all(r["train_s"] > 0 for r in results)


def test_augmentation_applies_to_the_trainers_that_take_it_shifts_on_pixels_noise_on_gist():
    from types import SimpleNamespace

    from vdsh.training.encoders.model import InputSpec
    from vdsh.training.run import RunConfig, input_augmentation
    from vdsh.training.trainers.registry import MLP_METHODS

    def inputs(protocol: str, spec: InputSpec):
        return SimpleNamespace(spec=spec, split=SimpleNamespace(spec=SimpleNamespace(dataset=protocol.split("-")[0])))

    def mlp_augmentation(protocol: str, spec: InputSpec, trainer: str, augment: bool | None):
        return input_augmentation(RunConfig(protocol, trainer, augment=augment), MLP_METHODS[trainer], inputs(protocol, spec))

    pixels, gist = InputSpec(1, 28, "pixels", [0.1307], [0.3081]), InputSpec(3, 32, "gist")
    shifts = mlp_augmentation("mnist-5k", pixels, "proxprop", None)
    assert shifts.config() == {"crop_padding": 2, "flip": False} and (shifts.channels, shifts.size) == (1, 28)
    assert mlp_augmentation("mnist-5k", pixels, "backprop", True) is not None
    assert mlp_augmentation("mnist-5k", pixels, "proxprop", False) is None
    assert mlp_augmentation("mnist-5k", pixels, "admm", None) is None, "ADMM takes augmentation only when asked"
    assert mlp_augmentation("mnist-5k", pixels, "admm", True) is not None
    assert mlp_augmentation("cifar10-5k", gist, "backprop", None).config() == {"feature_noise": 0.5}
    assert mlp_augmentation("mnist-5k", pixels, "altmin", None) is None  # where it does not apply, auto means none
    with pytest.raises(ValueError, match="trainer"):
        mlp_augmentation("cifar10-5k", gist, "altmin", True)
