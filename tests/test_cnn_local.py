"""Block-wise ADMM for CNNs and the CNN-trunk + ADMM-MLP hybrid: local steps stay local, both learn, the hybrid saves as one model."""

import numpy as np
import pytest
import torch

from vdsh.training.validation import Validation
from vdsh.training.encoders.cnn import CNN_KINDS
from vdsh.training.trainers.cnn_local import (
    BatchState, CnnLocalOptions, CnnLocalTrainer, auxiliary_update, block_outputs, frozen_running_stats,
)
from vdsh.training.encoders.cnn_mlp import CnnMlpEncoder
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.encoders.registry import ENCODERS
from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model
from vdsh.training.protocol_inputs import image_spec, prepare_images
from vdsh.training.run import RunConfig

CHANCE_MAP = 0.10  # ten balanced classes


def small_batch(kind: str = "small_cnn", n: int = 32, bits: int = 16):
    torch.manual_seed(0)
    encoder = ENCODERS[kind](1, 28, bits, width=4).train()
    x = torch.randn(n, 1, 28, 28)
    y = torch.nn.functional.one_hot(torch.arange(n) % 4, 4).float()
    return encoder, x, y


def parameters_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


@pytest.mark.parametrize("kind", CNN_KINDS)
def test_blocks_are_a_view_of_the_encoder(kind):
    encoder, x, _ = small_batch(kind)
    blocks = encoder.eval().blocks()
    assert len(blocks) == {"small_cnn": 4, "resnet9": 5, "dwsep": 6}[kind]
    assert torch.equal(blocks(x), encoder(x))
    assert {id(p) for p in blocks.parameters()} == {id(p) for p in encoder.parameters()}  # shared, not copied
    assert blocks[-1] is encoder.head


@pytest.mark.slow
def test_a_blocks_local_step_moves_only_that_block():
    encoder, x, y = small_batch()
    trainer = CnnLocalTrainer(CnnLocalOptions())
    blocks = encoder.blocks()
    optimizers = [torch.optim.AdamW(b.parameters(), lr=1e-2) for b in blocks]
    forward = block_outputs(blocks, x)
    for m in range(len(blocks) - 1):  # the conv blocks (the head's step is closed form)
        encoder.zero_grad(set_to_none=True)
        before = [parameters_of(b) for b in blocks]
        target = forward[m] + 0.1 * torch.randn_like(forward[m])
        trainer.weight_step(blocks[m], optimizers[m], (x if m == 0 else forward[m - 1]), target)
        assert not unchanged(blocks[m], before[m]), f"block {m} must move towards its target"
        for k, block in enumerate(blocks):
            if k != m:
                assert unchanged(block, before[k]), f"block {m}'s local step changed block {k}"
                assert all(p.grad is None for p in block.parameters()), f"block {m}'s step left a gradient in block {k}"


def test_an_auxiliary_update_touches_no_parameter_and_no_running_statistic():
    encoder, x, _ = small_batch()
    blocks = encoder.blocks()
    forward = block_outputs(blocks, x)
    params = parameters_of(encoder)
    stats = [b.detach().clone() for b in encoder.buffers()]
    with frozen_running_stats(blocks):
        z = auxiliary_update(forward[0], forward[0], blocks[1], forward[1] + 1.0, steps=2, step_size=1.0)
    assert not torch.equal(z, forward[0])
    assert unchanged(encoder, params) and all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stats[:2], list(encoder.buffers())[:2]))  # first BN: mean, var


@pytest.mark.slow
def test_the_code_pull_reaches_every_block_as_the_backprop_direction():
    """From forward-initialised auxiliaries one unit auxiliary step leaves z_m − f_m = the back-propagated error of
    ½||f(x) − B||² (scaled by μ/(β+μ)), so each block's local problem points where back-prop would."""
    encoder, x, y = small_batch(n=64)
    trainer = CnnLocalTrainer(CnnLocalOptions(aux_steps=1, aux_step_size=1.0))
    blocks = encoder.blocks()
    forward = block_outputs(blocks, x)
    codes = trainer.code_step(forward[-1], y)
    with frozen_running_stats(blocks):
        (0.5 * (blocks(x) - codes).pow(2).sum()).backward()
    backprop = [torch.cat([p.grad.flatten() for p in b.parameters()]) for b in blocks]
    encoder.zero_grad(set_to_none=True)
    state = BatchState(x, [z.clone() for z in forward], [torch.zeros_like(z) for z in forward])
    trainer.update_auxiliaries(blocks, state, y, codes)
    for m, block in enumerate(blocks):
        with frozen_running_stats(blocks):
            local = 0.5 * (block(x if m == 0 else forward[m - 1]) - state.z[m]).pow(2).sum()
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(local, list(block.parameters()))])
        assert torch.nn.functional.cosine_similarity(grad, backprop[m], dim=0) > 0.999, m
        assert grad.norm() / backprop[m].norm() == pytest.approx(0.5, rel=1e-3)  # μ/(β+μ) at μ = β = 1


def test_frozen_running_stats_keep_batchnorm_averages_and_restore_momentum():
    bn = torch.nn.BatchNorm2d(3).train()
    with frozen_running_stats(bn):
        bn(torch.randn(8, 3, 4, 4) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.momentum == 0.1
    bn(torch.randn(8, 3, 4, 4) + 5)
    assert bn.running_mean.min() > 0.3


def test_cnn_local_rejects_bad_input():
    encoder, x, y = small_batch()
    trainer = CnnLocalTrainer(CnnLocalOptions(epochs=1))
    with pytest.raises(ValueError, match="CNN encoder"):
        trainer.fit(DeepMLP(784, 3, 8, 16), x.flatten(1), y)
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        trainer.fit(encoder, torch.randn(4, 3, 28, 28), y[:4])
    with pytest.raises(ValueError, match="one row per image"):
        trainer.fit(encoder, x, y[:5])
    with pytest.raises(ValueError, match="fit_inputs"):
        CnnLocalOptions(fit_inputs="both")
    with pytest.raises(ValueError, match="a CNN encoder trains with"):
        RunConfig("mnist-sample", "cnn-local", encoder="mlp")


def sample_slice(n_train: int):
    """The embedded MNIST sample: n_train training images (fixed draw), a held-out validation slice, query and database."""
    from vdsh.data.protocols import load_protocol

    pool, split = load_protocol("mnist-sample")
    train = np.sort(np.random.default_rng(0).permutation(split.train)[:n_train])
    held_out = np.random.default_rng(1).permutation(np.setdiff1d(split.database, split.train))
    vq, vdb = np.sort(held_out[:300]), np.sort(held_out[300:1500])
    spec = image_spec(pool.images[train])
    prepared = lambda idx: prepare_images(spec, pool.images[idx])  # noqa: E731
    labels = torch.as_tensor(pool.labels).float()
    validation = Validation(prepared(vq), labels[vq], prepared(vdb), labels[vdb])
    return pool, split, spec, (prepared(train), labels[train]), validation


def query_map(model: HashingModel, pool, split) -> float:
    from vdsh.index.metrics import mean_average_precision

    q, db = model.encode(pool.images[split.query]), model.encode(pool.images[split.database])
    return mean_average_precision(q, pool.labels[split.query], db, pool.labels[split.database])


@pytest.mark.slow
def test_cnn_local_learns_on_the_embedded_sample(one_thread):
    from vdsh.training.augment import default_augmentation

    pool, split, spec, (x, y), validation = sample_slice(2000)
    torch.manual_seed(0)
    trainer = CnnLocalTrainer(CnnLocalOptions(epochs=3), augment=default_augmentation("mnist-sample"))
    encoder, history = trainer.fit(ENCODERS["small_cnn"](1, 28, 48, width=8), x, y, validation)
    model = HashingModel(encoder.cpu().eval(), spec)
    assert len(history) == 3 and all("val_map" in r and not r.get("diverged") for r in history)
    assert history[-1]["val_map"] > history[0]["val_map"]
    # Chance 0.10; measured 0.89 on the 1,000 queries vs the 9,000-image database (validation 0.61, 0.82, 0.89 by epoch).
    assert query_map(model, pool, split) > 0.7


@pytest.mark.slow
def test_hybrid_learns_and_saves_as_one_model_with_identical_codes(tmp_path, one_thread):
    from vdsh.training.augment import default_augmentation
    from vdsh.training.trainers.hybrid import HybridTrainer, hybrid_options

    pool, split, spec, (x, y), validation = sample_slice(2000)
    options = hybrid_options({"epochs": 4, "mlp_depth": 4, "bits": 48, "mlp_width": 128, "trunk": {"batch_size": 128},
                              "head": {"sweeps": 4}})
    torch.manual_seed(0)
    trainer = HybridTrainer(options, augment=default_augmentation("mnist-sample"))
    encoder, history = trainer.fit(ENCODERS["small_cnn"](1, 28, 10, width=8), x, y, validation)
    model = HashingModel(encoder, spec)
    assert [r["stage"] for r in history] == ["trunk"] * 4 + ["head"] * 4
    assert all(a["time"] <= b["time"] for a, b in zip(history, history[1:]))
    assert isinstance(model.encoder, CnnMlpEncoder) and model.bits == 48
    # Chance 0.10; measured 0.93 (the trunk alone, coded as the classifier baseline: train mAP 0.40).
    assert query_map(model, pool, split) > 0.7
    save_model(tmp_path / "hybrid.safetensors", model, {"protocol": "mnist-sample", "trainer": "hybrid"})
    again = load_model(tmp_path / "hybrid.safetensors")
    assert again.encoder.config() == model.encoder.config()
    images = pool.images[split.query[:200]]
    assert torch.equal(again.encode(images), model.encode(images))


def test_cnn_mlp_encoder_round_trips_untrained_and_checks_its_parts(tmp_path):
    torch.manual_seed(0)
    trunk = ENCODERS["dwsep"](3, 32, 10, width=4)
    encoder = CnnMlpEncoder(trunk, DeepMLP(trunk.feature_dim, 3, 16, 24))
    model = HashingModel(encoder, InputSpec(3, 32, "image", [0.5] * 3, [0.25] * 3))
    model.train()(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))  # move BN running stats off (0, 1)
    save_model(tmp_path / "m.safetensors", model)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(load_model(tmp_path / "m.safetensors").encode(images), model.encode(images))
    assert not any(k.startswith("trunk.head") for k in encoder.state_dict())  # the trunk's own output layer is dropped
    with pytest.raises(ValueError, match="takes 7 features"):
        CnnMlpEncoder(ENCODERS["dwsep"](3, 32, 10, width=4), DeepMLP(7, 3, 16, 24))


def test_fold_standardisation_is_exact():
    from vdsh.training.trainers.hybrid import fold_standardisation

    torch.manual_seed(0)
    mlp = DeepMLP(6, 3, 8, 4)
    f = torch.rand(20, 6) * 3
    mean, std = f.mean(0), f.std(0)
    expected = mlp((f - mean) / std)
    fold_standardisation(mlp, mean, std)
    assert torch.allclose(mlp(f), expected, atol=1e-5)


CLI_RUNS = {
    "cnn-local": ["--width", "4", "--epochs", "1"],
    "hybrid": ["--width", "4", "--epochs", "1", "--depth", "3", "--options", '{"mlp_width": 32, "head": {"sweeps": 2}}'],
}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", CLI_RUNS)
def test_train_command_saves_a_model_that_eval_and_index_build_use_unchanged(trainer, tmp_path, one_thread):
    import json

    from typer.testing import CliRunner

    from vdsh.app.cli import app

    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train", "--trainer", trainer, "--bits", "16", "--out", str(run), *CLI_RUNS[trainer]])
    assert trained.exit_code == 0, trained.output
    model = load_model(run / "model.safetensors")
    assert model.encoder.kind == {"cnn-local": "small_cnn", "hybrid": "cnn_mlp"}[trainer] and model.bits == 16
    assert model.info["trainer"] == trainer and model.info["metrics"]["val_map"] is not None
    evaluated = CliRunner().invoke(app, ["eval", "--model", str(run / "model.safetensors"), "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    map_all = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["mAP@all"]
    assert map_all == pytest.approx(model.info["metrics"]["map_all"], abs=1e-6)
    assert map_all > CHANCE_MAP  # one epoch of a width-4 net: above chance, nothing more claimed
    indexed = CliRunner().invoke(app, ["index", "build", "--model", str(run / "model.safetensors"), "--protocol",
                                       "mnist-sample", "--limit", "200", "--out", str(tmp_path / "index")])
    assert indexed.exit_code == 0, indexed.output
    assert "indexed 200 items (16 bits" in indexed.output


@pytest.mark.parametrize("args, message", [
    (["--encoder", "small_cnn", "--trainer", "admm"], "a CNN encoder trains with"),
    (["--encoder", "mlp", "--trainer", "hybrid"], "a CNN encoder trains with"),
    (["--trainer", "cnn-local", "--classifier-baseline"], "classifier baseline trains by back-prop"),
])
def test_train_command_refuses_trainer_and_encoder_that_do_not_fit(args, message):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    result = CliRunner().invoke(app, ["train", "--bits", "8", "--epochs", "1", *args])
    assert result.exit_code != 0 and message in result.output


@pytest.mark.slow
def test_bench_cnn_train_writes_one_row_per_trainer(tmp_path, monkeypatch, one_thread):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "cnn-train", "--protocol", "mnist-sample", "--bits", "8", "--width", "4",
                                      "--epochs", "1", "--rows", "classifier,hybrid",
                                      "--options", '{"hybrid": {"mlp_width": 16, "head": {"sweeps": 1}}}'])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## CNN trainers: mnist-sample, 8 bits, small_cnn" in text
    assert "| classifier baseline |" in text and "| hybrid: back-prop trunk + ProxProp MLP head |" in text
    assert "| back-prop CNN |" not in text and "| CNN block-wise" not in text
    assert "validation slice of database images outside the training set." in text


def test_validation_slices_avoid_training_images_unless_the_protocol_trains_on_its_whole_database():
    from types import SimpleNamespace

    from vdsh.training.protocol_inputs import validation_pool, validation_source

    held_out = SimpleNamespace(train=np.arange(0, 50), database=np.arange(0, 100))
    assert np.array_equal(validation_pool(held_out), np.arange(50, 100))
    assert validation_source(held_out) == "database images outside the training set"
    whole = SimpleNamespace(train=np.arange(0, 100), database=np.arange(0, 100))  # mnist-69k: training set = database
    assert np.array_equal(validation_pool(whole), np.arange(0, 100))
    assert validation_source(whole).startswith("training images")
