"""Fine-tuning the backbone's last stage: trunk + tail is the whole network, tuning learns and touches only the
tail, and a fine-tuned model file carries its tuned stage to `load_model`, the index builder and photo queries."""

import numpy as np
import pytest
import torch

from test_features import pretrained, random_images
from vdsh.training.features import efficientnet
from vdsh.training.features.finetune import FinetuneOptions, finetune_tail, tail_features
from vdsh.training.protocol_inputs import protocol_inputs


def test_tail_module_names_cover_the_last_stages_and_bad_options_are_refused_before_any_work():
    from vdsh.training.run import RunConfig

    assert efficientnet.tail_module_names(1) == ["blocks.6", "conv_head", "bn2"]
    assert efficientnet.tail_module_names(2)[:2] == ["blocks.5", "blocks.6"]
    for stages in (0, efficientnet.STAGES + 1):
        with pytest.raises(ValueError, match="between 1 and 7"):
            efficientnet.tail_module_names(stages)
    with pytest.raises(ValueError, match="between 1 and 7"):
        RunConfig(trainer="sdh", features="efficientnet-lite0", finetune_stages=8)
    with pytest.raises(ValueError, match="epochs >= 1"):
        RunConfig(trainer="sdh", features="efficientnet-lite0", finetune_stages=1, finetune_epochs=0)
    with pytest.raises(ValueError, match="fine-tuning needs a pretrained backbone's features, not 'pixels'"):
        protocol_inputs("mnist-sample", features="pixels", finetune=FinetuneOptions())


@pytest.mark.slow
@pretrained
def test_trunk_maps_through_the_tail_give_the_backbone_features():
    backbone, images = efficientnet.pretrained_backbone(), random_images(8)
    maps = efficientnet.trunk_maps(backbone, images, 96, 1)
    assert maps.dtype == np.float16 and maps.shape == (8, 192, 3, 3)
    whole = efficientnet.backbone_features(backbone, images, 96)
    split = tail_features(backbone, maps, 1)
    assert torch.nn.functional.cosine_similarity(whole, split).min() > 0.999  # float16 maps cost almost nothing


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
@pretrained
def test_finetuning_learns_real_labels_and_changes_only_a_copy_of_the_tail(data_root):
    from vdsh.data import load

    cifar = load("cifar10", data_root, split="all")
    images, labels = np.asarray(cifar.images[:400]), torch.as_tensor(np.asarray(cifar.labels[:400])).float()
    shared = efficientnet.pretrained_backbone()
    before = states(shared.net)
    maps = efficientnet.trunk_maps(shared, images, 64, 1)
    tuned, history = finetune_tail(shared, maps, labels, FinetuneOptions(epochs=4, batch_size=32))

    assert all(torch.equal(v, before[k]) for k, v in shared.net.state_dict().items())  # the shared instance is untouched
    after = tuned.net.state_dict()
    tail = tuple(name + "." for name in efficientnet.tail_module_names(1))
    changed = {k for k, v in after.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert changed and all(k.startswith(tail) for k in changed)  # only the tail learned
    assert not tuned.training and not any(m.training for m in tuned.modules())
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"] + 0.2, history


@pytest.mark.slow
@pretrained
def test_a_finetuned_model_round_trips_and_encodes_images_with_its_tuned_stage(tmp_path):
    from safetensors.torch import load_file, save_file

    from vdsh.training.encoders.linear import LinearEncoder
    from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model

    images = random_images(24)
    labels = torch.eye(4)[torch.arange(24) % 4]
    shared = efficientnet.pretrained_backbone()
    maps = efficientnet.trunk_maps(shared, images, 64, 1)
    tuned, _ = finetune_tail(shared, maps, labels, FinetuneOptions(epochs=1, batch_size=8, lr=1e-2))
    features = tail_features(tuned, maps, 1)
    spec = InputSpec(3, 32, "efficientnet-lite0", features.mean(0).tolist(), (features.std(0) + 1e-3).tolist(), 64,
                     efficientnet.WEIGHTS_SHA256, tuned_stages=1)
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_model(path, HashingModel(LinearEncoder(1280, 16), spec, torch.as_tensor(images[:8]), tuned), {})

    model = load_model(path)
    assert model.backbone is not shared and model.input_spec.tuned_stages == 1
    assert all(torch.equal(v, tuned.net.state_dict()[k]) for k, v in model.backbone.net.state_dict().items())
    from_images = efficientnet.backbone_features(model.backbone, images, 64)
    assert torch.nn.functional.cosine_similarity(from_images, features).min() > 0.999
    assert not torch.allclose(from_images, efficientnet.backbone_features(shared, images, 64), atol=1e-3)
    assert load_model(path, int8=True).encode(images).shape == (24, 16)
    folded = load_model(path, fold=True)
    assert torch.allclose(efficientnet.backbone_features(folded.backbone, images, 64), from_images, atol=1e-4)
    with pytest.raises(ValueError, match="trainable float backbone"):
        save_model(tmp_path / "again.safetensors", folded, {})

    tensors = load_file(path)
    del tensors["backbone.conv_head.weight"]
    save_file(tensors, tmp_path / "broken.safetensors", metadata={"vdsh": __import__("safetensors").safe_open(
        str(path), "pt").metadata()["vdsh"]})
    with pytest.raises(ValueError, match="broken.safetensors: the fine-tuned backbone tensors .*conv_head.weight"):
        load_model(tmp_path / "broken.safetensors")


@pytest.mark.slow
@pretrained
def test_vdsh_train_finetunes_then_hashes_and_the_index_uses_the_tuned_features(tmp_path):
    """The CLI end to end on the embedded MNIST sample at 32 px (1 x 1 trunk maps: seconds)."""
    from typer.testing import CliRunner

    from vdsh.app.cli import app
    from vdsh.app.items import build_index
    from vdsh.data.protocols import load_protocol
    from vdsh.index.codes import pack_codes
    from vdsh.training.encoders.model import load_model

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--protocol", "mnist-sample", "--trainer", "sdh", "--bits", "16",
                                      "--features", "efficientnet-lite0", "--resolution", "32", "--finetune-stages", "1",
                                      "--finetune-epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(out / "model.safetensors")
    assert model.input_spec.tuned_stages == 1 and model.info["finetune"]["epochs"] == 2
    assert model.info["metrics"]["map_all"] > 0.5  # chance is 0.1
    pool, split = load_protocol("mnist-sample", None, 0)
    ids = split.query[:20]
    index = build_index(out / "model.safetensors", pool, "flat", None, device="cpu", ids=ids)
    from_images = pack_codes(model.encode(np.asarray(pool.images[ids])))
    agree = (np.unpackbits(index.codes_of(ids), axis=1) == np.unpackbits(from_images, axis=1)).mean()
    assert agree > 0.97  # cached trunk maps (float16) vs the whole network on the images
