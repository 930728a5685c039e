"""CNN encoders, GPU-side augmentation, the classifier baseline, and a CPU-sized CNN training that must learn."""

import pytest
import torch

from vdsh.training.augment import Augmentation, FeatureNoise, FlatImageAugmentation, random_crop, random_flip
from vdsh.training.encoders.class_scores import ClassScoreCode
from vdsh.training.encoders.cnn import CNN_KINDS
from vdsh.training.encoders.registry import ENCODERS
from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model


def small_encoder(kind: str, channels: int, size: int, bits: int):
    return ENCODERS[kind](channels, size, bits, width=8)


@pytest.mark.parametrize("kind", CNN_KINDS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_encoder_maps_images_to_bits_units(kind, channels, size):
    encoder = small_encoder(kind, channels, size, bits=24).eval()
    out = encoder(torch.randn(5, channels, size, size))
    assert out.shape == (5, 24) and out.dtype == torch.float32
    assert encoder.features(torch.randn(2, channels, size, size)).shape == (2, encoder.feature_dim)


@pytest.mark.parametrize("kind", CNN_KINDS)
def test_encoder_rejects_wrong_image_shape(kind):
    encoder = small_encoder(kind, 3, 32, bits=16)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        encoder(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("kind", CNN_KINDS)
def test_channels_last_gives_the_same_outputs(kind):
    encoder = small_encoder(kind, 3, 32, bits=16).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = encoder(x)
    encoder = encoder.to(memory_format=torch.channels_last)
    assert torch.allclose(encoder(x.to(memory_format=torch.channels_last)), expected, atol=1e-4)


def test_msra_init_keeps_conv_weight_scale():
    encoder = ENCODERS["small_cnn"](3, 32, 16, width=32)
    conv = encoder.trunk[2][0]  # second stage's conv: 32 -> 64 channels, fan-out 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


@pytest.mark.parametrize("kind", CNN_KINDS)
def test_saved_model_reloads_with_identical_codes(kind, tmp_path):
    torch.manual_seed(0)
    encoder = small_encoder(kind, 1, 28, bits=32)
    model = HashingModel(encoder, InputSpec(1, 28, "image", [0.13], [0.31]))
    model.train()(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8))  # move BN running stats off (0, 1)
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    save_model(tmp_path / "m.safetensors", model, {"kind": kind})
    reloaded = load_model(tmp_path / "m.safetensors")
    assert type(reloaded.encoder) is type(encoder) and reloaded.encoder.config() == encoder.config()
    assert torch.equal(reloaded.encode(images), model.encode(images))


def test_class_score_code_round_trips_and_projects_centred_scores(tmp_path):
    torch.manual_seed(0)
    classifier = small_encoder("small_cnn", 1, 28, bits=10)
    model = HashingModel(ClassScoreCode(classifier, bits=48, seed=3), InputSpec(1, 28, "image", [0.13], [0.31]))
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    codes = model.encode(images)
    assert codes.shape == (12, 48)
    scores = classifier.eval()(model.input_spec.prepare(images))
    # A constant added to all scores (which softmax ignores) leaves the code unchanged.
    shifted = (scores + 5.0 - (scores + 5.0).mean(1, keepdim=True)) @ model.encoder.projection
    assert torch.equal(torch.where(shifted >= 0, 1, -1).to(torch.int8), codes)
    save_model(tmp_path / "baseline.safetensors", model)
    assert torch.equal(load_model(tmp_path / "baseline.safetensors").encode(images), codes)


def test_random_crop_is_a_shifted_window_of_the_reflect_padded_image():
    images = torch.randn(64, 3, 10, 10)
    cropped = random_crop(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    shifts = []
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[i, :, dy:dy + 10, dx:dx + 10], cropped[i])]
        assert len(matches) == 1, "each crop must be exactly one window of its own padded image"
        shifts.append(matches[0])
    assert len(set(shifts)) > 5, "crops must be at random offsets, not one fixed shift"


def test_random_flip_mirrors_about_half_the_images_and_leaves_the_rest():
    images = torch.randn(200, 1, 6, 6)
    flipped = random_flip(images, generator=torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, x.flip(-1)) for f, x in zip(flipped, images)]
    kept = [torch.equal(f, x) for f, x in zip(flipped, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 60 < sum(mirrored) < 140


def test_augmentation_keeps_shapes_and_keeps_each_image_with_its_label():
    # Image i is constant i: any crop or flip of it is still all i, so a mixed-up batch would show.
    images = torch.arange(32, dtype=torch.float).view(32, 1, 1, 1).expand(32, 3, 32, 32).contiguous()
    out = Augmentation(crop_padding=4, flip=True)(images)
    assert out.shape == images.shape
    assert torch.equal(out, images)
    textured = torch.randn(32, 3, 32, 32)
    assert not torch.equal(Augmentation(crop_padding=4, flip=True)(textured), textured)


def test_flat_image_augmentation_shifts_each_row_as_its_image():
    rows = torch.randn(16, 3 * 8 * 8)
    generator = torch.Generator().manual_seed(0)
    out = FlatImageAugmentation(Augmentation(crop_padding=2, flip=False), channels=3, size=8)(rows, generator)
    expected = Augmentation(crop_padding=2, flip=False)(rows.view(16, 3, 8, 8), torch.Generator().manual_seed(0))
    assert out.shape == rows.shape and torch.equal(out, expected.reshape(16, -1))


def test_feature_noise_adds_fresh_gaussian_noise_of_its_scale_and_keeps_the_input():
    rows = torch.randn(2000, 64)
    kept = rows.clone()
    noisy = FeatureNoise(std=0.5)(rows, torch.Generator().manual_seed(0))
    assert torch.equal(rows, kept) and noisy.shape == rows.shape and noisy.dtype == rows.dtype
    added = noisy - rows
    assert abs(float(added.mean())) < 0.01 and abs(float(added.std()) - 0.5) < 0.01
    assert torch.equal(noisy, FeatureNoise(std=0.5)(rows, torch.Generator().manual_seed(0)))
    assert not torch.equal(noisy, FeatureNoise(std=0.5)(rows, torch.Generator().manual_seed(1)))
    assert FeatureNoise(std=0.5).config() == {"feature_noise": 0.5}


def test_augmentation_rejects_padding_as_large_as_the_image():
    with pytest.raises(ValueError, match="padding"):
        random_crop(torch.randn(2, 1, 4, 4), padding=4)


@pytest.mark.slow
@pytest.mark.parametrize("classifier_baseline", [False, True])
def test_small_cnn_learns_on_the_embedded_sample(classifier_baseline, one_thread):
    from vdsh.data.protocols import load_protocol
    from vdsh.index.metrics import mean_average_precision
    from vdsh.training.run import RunConfig, run

    result = run(RunConfig("mnist-sample", "backprop", 48, encoder="small_cnn", width=8, iterations=4,
                           options={"batch_size": 128}, classifier_baseline=classifier_baseline, show_progress=False))
    history, model = result.history, result.model
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    assert result.summary["augmentation"] == {"crop_padding": 2, "flip": False}  # the digits' recipe, by default
    pool, split = load_protocol("mnist-sample")
    query, database = model.encode(pool.images[split.query]), model.encode(pool.images[split.database])
    assert query.shape == (1000, 48)
    # Chance is 0.10: the encoder must have learned the classes (BENCHMARKS.md, "CNN trainers", has the figures).
    map_all = mean_average_precision(query, pool.labels[split.query], database, pool.labels[split.database])
    assert map_all > 0.5 and map_all == pytest.approx(result.summary["metrics"]["map_all"])


@pytest.mark.slow
def test_train_command_trains_a_cnn_and_saves_a_reloadable_model(tmp_path, one_thread):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--encoder", "dwsep", "--width", "4", "--epochs", "1", "--bits", "16",
                                      "--out", str(out), "--options", '{"batch_size": 256}'])
    assert result.exit_code == 0, result.output
    model = load_model(out / "model.safetensors")
    assert model.encoder.kind == "dwsep" and model.bits == 16
    assert model.info["metrics"]["map_all"] > 0.1  # one epoch of a tiny net: above chance, nothing more claimed

