"""The training pipeline as a library: `RunConfig` -> `run` -> `RunResult`, and the inputs it prepares."""

import warnings

import numpy as np
import pytest
import torch

from vdsh.app.runs import save_run
from vdsh.data.datasets import dataset_info
from vdsh.training.encoders.model import load_model
from vdsh.training.protocol_inputs import protocol_inputs, validation_slice
from vdsh.training.run import RunConfig, run


def test_a_config_fills_the_defaults_of_its_network():
    mlp = RunConfig("mnist-sample")
    assert (mlp.trainer, mlp.encoder, mlp.depth, mlp.width) == ("admm", "mlp", 8, 1024)
    cnn = RunConfig("mnist-sample", "cnn-local")
    assert (cnn.encoder, cnn.depth, cnn.width) == ("small_cnn", 4, None) and cnn.on_images
    assert RunConfig("mnist-sample", encoder="dwsep").trainer == "backprop"


@pytest.mark.parametrize("kwargs, message", [
    ({"trainer": "nope"}, "trainer must be one of"),
    ({"trainer": "admm", "encoder": "resnet9"}, "a CNN encoder trains with"),
    ({"trainer": "hybrid", "encoder": "lsh"}, "a CNN encoder trains with"),
    ({"trainer": "cnn-local", "classifier_baseline": True}, "classifier baseline trains by back-prop"),
])
def test_a_config_refuses_what_cannot_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig("mnist-sample", **kwargs)


def test_dataset_facts_choose_the_input():
    assert dataset_info("cifar10").features == "gist" and dataset_info("mnist").features == "pixels"
    inputs = protocol_inputs("mnist-sample")
    assert (inputs.spec.features, inputs.spec.mean, inputs.spec.std) == ("pixels", [0.1307], [0.3081])
    images = protocol_inputs("mnist-sample", images=True)
    assert images.spec.features == "image" and images.spec.mean != [0.1307]  # CNNs: the training images' own statistics
    assert images.prepare(np.arange(3)).shape == (3, 1, 28, 28) and inputs.prepare(np.arange(3)).shape == (3, 784)
    with pytest.raises(ValueError, match="not to CNNs"):
        protocol_inputs("mnist-sample", features="gist", images=True)


def test_the_validation_slice_holds_no_query_and_no_training_image():
    from dataclasses import replace

    inputs = protocol_inputs("mnist-sample")
    positions = replace(inputs, prepare=lambda idx: torch.as_tensor(np.asarray(idx))[:, None])  # input = pool position
    validation = validation_slice(positions, seed=0, queries=50, database=200)
    picked = torch.cat([validation.query, validation.database]).flatten().numpy()
    assert len(picked) == len(set(picked)) == 250
    assert not np.isin(picked, inputs.split.query).any() and not np.isin(picked, inputs.split.train).any()
    labels = np.asarray(inputs.images.labels)
    assert np.array_equal(validation.query_labels.numpy(), labels[picked[:50]])


def test_a_run_trains_scores_saves_and_reloads(tmp_path):
    result = run(RunConfig("mnist-sample", "sdh", bits=16, options={"anchors": 300}, show_progress=False))
    metrics = result.summary["metrics"]
    assert metrics["map_all"] > 0.3, "SDH on MNIST pixels is far above chance (0.10)"
    assert result.query_codes.shape == (len(result.inputs.split.query), 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-step fit has no history: its pictures must not warn about it
        save_run(tmp_path, result)
    model = load_model(tmp_path / "model.safetensors")
    assert model.info["trainer"] == "sdh" and model.info["metrics"] == metrics
    queries = np.asarray(result.inputs.images.images[result.inputs.split.query[:20]])
    assert torch.equal(model.encode(queries).float(), result.query_codes[:20].float())
    written = {p.name for p in tmp_path.iterdir()}
    assert written >= {"model.safetensors", "history.json", "protocol.json", "split.npz", "history.png", "codes.png"}
    assert "admm_convergence.png" not in written


@pytest.mark.slow  # two torchrun processes
@pytest.mark.parametrize("trainer, options", [("replay", {"modules": 2}), ("admm", {"blocks": 1})])
def test_torchrun_trains_the_model_of_one_process(trainer, options, tmp_path):
    """`vdsh train` under torchrun (every rank given the whole set for replay, its shard for ADMM) saves the weights
    that one process computes with the same work split (replay: 2 modules; ADMM: 2 data blocks)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["train", "--protocol", "mnist-sample", "--trainer", trainer, "--depth", "4", "--width", "32", "--bits", "16",
            "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VDSH_QUIET": "1"}
    def vdsh(*command: str) -> None:
        done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    # --standalone: a free port for the rendezvous, so that runs one after another never collide
    vdsh("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vdsh", *args,
         "--options", json.dumps(options), "--out", str(tmp_path / "two"))
    single = {**options, "blocks": 2} if trainer == "admm" else options
    vdsh("-m", "vdsh", *args, "--options", json.dumps(single), "--out", str(tmp_path / "one"))
    two, one = (load_file(tmp_path / run / "model.safetensors") for run in ("two", "one"))
    assert two.keys() == one.keys()
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-5), key
