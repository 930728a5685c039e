"""A trained hashing model: input preparation + encoder, saved as one self-describing file.

The file is `.safetensors`: the weights, plus JSON in its metadata that names the encoder kind, its
config and the input preparation, so `load_model` rebuilds the model with no code of the trainer
that made it. That is all the index builder and the server need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vdsh.files import atomic_path, file_sha256
from vdsh.index.codes import sign_codes
from vdsh.training.encoders.registry import encoder_from_config

CALIBRATION_KEY = "input.calibration"  # uint8 training images stored with a backbone model, for int8 quantisation
BACKBONE_PREFIX = "backbone."  # the fine-tuned part of a backbone, stored under its names in the network


@dataclass
class InputSpec:
    """How uint8 images (N, C, H, W) become encoder input.

    features: 'pixels' (flattened, normalised vector), 'image' (normalised (N, C, H, W)) or a vector
    feature kind of `vdsh.training.features` ('gist', 'efficientnet-lite0', ...). mean/std: per channel
    for images; for vector features one value or one per dimension (raw GIST values are ~0.05 ± 0.04,
    far too small for MSRA-initialised layers). resolution: the side a backbone sees the image at;
    weights_sha256: the checksum of the backbone weights the model was trained on; tuned_stages: how many of
    the backbone's last stages were fine-tuned (`vdsh.training.features.finetune`; their weights are in the file).
    """

    channels: int
    size: int
    features: str = "pixels"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    resolution: int | None = None
    weights_sha256: str | None = None
    tuned_stages: int = 0

    def __post_init__(self) -> None:
        if self.features not in ("pixels", "image"):
            from vdsh.training.features import resolution_for

            resolution_for(self.features, self.resolution)  # a clear error for an unknown kind or resolution

    @property
    def backbone(self) -> bool:
        """Whether the features come from a pretrained network (which the model file references, not holds)."""
        from vdsh.training.features import feature_kind

        return self.features not in ("pixels", "image") and feature_kind(self.features).backbone

    def prepare(self, images: torch.Tensor | np.ndarray, backbone: nn.Module | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float encoder input on the images' device (CPU for backbone features).

        backbone: the network computing backbone features (default: the shared pretrained one).
        """
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(
                f"model expects images of shape (N, {self.channels}, {self.size}, {self.size}), got {tuple(images.shape)}"
            )
        if self.features not in ("pixels", "image"):
            from vdsh.training.features import feature_vectors

            features = feature_vectors(self.features, images, self.resolution, backbone)
            return self.standardise(features.to(images.device))
        x = images.float().div_(255)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.flatten(1) if self.features == "pixels" else x

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """(features − mean) / std for vector features; mean and std hold one value or one per dimension."""
        mean = torch.tensor(self.mean, device=features.device, dtype=features.dtype)
        std = torch.tensor(self.std, device=features.device, dtype=features.dtype)
        return (features - mean) / std


class HashingModel(nn.Module):
    """Images in, real-valued outputs of `bits` units out; codes are their signs.

    With backbone features the backbone is a submodule (it moves with `.to(device)`) but only its fine-tuned
    stages, if any, are saved: the file names it and its weights' checksum, and keeps `calibration`, a small set
    of uint8 training images, so that `quantize_backbone` can make an int8 copy wherever the model is loaded.
    """

    def __init__(self, encoder: nn.Module, input_spec: InputSpec, calibration: torch.Tensor | None = None,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_spec = input_spec
        self.calibration = calibration
        self.backbone = backbone
        self.int8 = False
        self.folded = False

    def fold_backbone(self, script: bool = True) -> None:
        """Replace the (CPU) backbone by an inference-only copy with batch norm folded into its convolutions
        (`vdsh.training.features.inference`): same codes up to float rounding, faster; for serving. script: run
        it as frozen TorchScript, whose weights are constants that `.to(device)` would not move: CPU only."""
        if self.backbone is None:
            raise ValueError("only a model on backbone features has a backbone to fold")
        from vdsh.training.features.inference import folded

        self.backbone = folded(self.backbone, self.input_spec.resolution)
        self.folded = True
        if script:
            self._script_backbone()

    def _script_backbone(self) -> None:
        """Run the inference-only backbone as frozen TorchScript (`inference.scripted`): same outputs, less overhead."""
        from vdsh.training.features.inference import scripted

        self.backbone.net = scripted(self.backbone.net, self.input_spec.resolution)

    def quantize_backbone(self) -> None:
        """Replace the backbone by its int8 post-training quantisation (CPU), calibrated on `calibration`."""
        if self.backbone is None or self.calibration is None:
            raise ValueError("int8 quantisation needs a model on backbone features saved with calibration images")
        from vdsh.training.features.quantize import quantize_int8

        self.backbone = quantize_int8(self.backbone, self.calibration, self.input_spec.resolution)
        self.int8 = True
        self._script_backbone()

    @property
    def device(self) -> torch.device:
        """Where the encoder lives; baseline encoders hold only buffers, so those count too."""
        tensor = next(self.parameters(), None)
        tensor = tensor if tensor is not None else next(self.buffers(), torch.empty(0))
        return tensor.device

    @property
    def bits(self) -> int:
        return int(self.encoder.config()["bits"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.input_spec.prepare(images, self.backbone))

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> int8 codes (N, bits) in {-1,+1}, on the CPU, in batches."""
        was_training = self.training
        # Switching modes walks every module (a backbone has hundreds), and so does finding one in training mode:
        # only the encoder's are looked at, the backbone stays in eval mode (`EfficientNetLite0Features.train`).
        switch = self.training or any(module.training for module in self.encoder.modules())
        if switch:
            self.eval()
        device = self.device
        try:
            chunks = [
                sign_codes(self(torch.tensor(np.asarray(images[i : i + batch_size]), device=device))).cpu()
                for i in range(0, len(images), batch_size)
            ]
        finally:
            if switch:
                self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.bits, dtype=torch.int8)


def save_model(path: str | Path, model: HashingModel, info: dict | None = None) -> None:
    """Write weights and the config that rebuilds the model, atomically (temp file, fsync, rename).

    info: free JSON-able facts kept with the model (dataset, protocol, trainer, seed, metrics...).
    """
    meta = {
        "encoder": {"kind": model.encoder.kind, "config": model.encoder.config()},
        "input": asdict(model.input_spec),
        "info": info or {},
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.encoder.state_dict().items()}
    tensors.update({BACKBONE_PREFIX + k: v for k, v in tuned_backbone_tensors(model).items()})
    if model.calibration is not None:
        tensors[CALIBRATION_KEY] = torch.as_tensor(model.calibration, dtype=torch.uint8).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vdsh": json.dumps(meta)})


def tuned_backbone_tensors(model: HashingModel) -> dict[str, torch.Tensor]:
    """The fine-tuned stages' tensors of a model's backbone (none where the backbone is frozen)."""
    stages = model.input_spec.tuned_stages
    if not stages:
        return {}
    if model.backbone is None or model.int8 or model.folded:
        raise ValueError("a model with fine-tuned backbone stages is saved with its trainable float backbone, "
                         "not an int8 or folded one")
    from vdsh.training.features.efficientnet import tail_module_names

    prefixes = tuple(name + "." for name in tail_module_names(stages))
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.backbone.net.state_dict().items()
            if k.startswith(prefixes)}


def read_model_metadata(path: str | Path) -> dict:
    """The JSON config stored in a model file, with a clear error when it is not a vdsh model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable .safetensors model ({exc})") from exc
    if "vdsh" not in meta:
        raise ValueError(f"{path} is a safetensors file but not a vdsh model (no 'vdsh' metadata)")
    return json.loads(meta["vdsh"])


def load_model(path: str | Path, device: str | torch.device = "cpu", int8: bool = False,
               fold: bool = False) -> HashingModel:
    """Rebuild a model from its file: the encoder from the registry by the kind the file names.

    A model on backbone features gets its backbone from the installed weights package (checked against
    the checksum the model records); int8: quantise that backbone for CPU serving (which folds batch norm
    too); fold: fold batch norm into the float backbone's convolutions, for serving. Both make the backbone
    inference-only (on the CPU, frozen TorchScript); neither applies to pixel or GIST models.
    """
    meta = read_model_metadata(path)
    try:
        encoder = encoder_from_config(meta["encoder"]["kind"], meta["encoder"]["config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    if int8 and torch.device(device).type != "cpu":
        raise ValueError(f"an int8 backbone runs on the CPU only, not on {device}")
    calibration = tensors.pop(CALIBRATION_KEY, None)
    tuned = {k.removeprefix(BACKBONE_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(BACKBONE_PREFIX)}
    encoder.load_state_dict(tensors)
    spec = InputSpec(**meta["input"])
    try:
        backbone = attach_backbone(spec, device, tuned)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    model = HashingModel(encoder, spec, calibration, backbone)
    if int8:
        model.quantize_backbone()
    elif fold and model.backbone is not None:
        model.fold_backbone(script=torch.device(device).type == "cpu")
    model.info = meta["info"]
    return model.to(device).eval()


def attach_backbone(spec: InputSpec, device: str | torch.device = "cpu",
                    tuned: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
    """The backbone a spec names (None for pixels and GIST): the shared CPU instance, or a copy for another
    device or with the `tuned` tensors of its fine-tuned stages (which must be exactly those stages' tensors)."""
    if not spec.backbone:
        if tuned:
            raise ValueError(f"the file holds backbone weights, but {spec.features!r} features have no backbone")
        return None
    import copy

    from vdsh.training.features import FEATURES, load_backbone

    expected = FEATURES[spec.features].weights_sha256
    if spec.weights_sha256 not in (None, expected):
        raise ValueError(f"the model was trained on {spec.features} weights with sha256 {spec.weights_sha256}, "
                         f"this vdsh loads {expected}: retrain it, or use the vdsh version it was trained with")
    backbone = load_backbone(spec.features)
    if not spec.tuned_stages and not tuned:
        return backbone if torch.device(device).type == "cpu" else copy.deepcopy(backbone)
    backbone = copy.deepcopy(backbone)
    load_tuned_stages(backbone.net, spec.tuned_stages, tuned or {})
    return backbone


def load_tuned_stages(net: nn.Module, stages: int, tuned: dict[str, torch.Tensor]) -> None:
    """Load the fine-tuned stages' tensors into `net`, refusing any missing, extra or misshapen tensor."""
    from vdsh.training.features.efficientnet import tail_module_names

    prefixes = tuple(name + "." for name in tail_module_names(stages)) if stages else ()
    expected = {k: v for k, v in net.state_dict().items() if k.startswith(prefixes)}
    if set(tuned) != set(expected):
        missing, extra = sorted(set(expected) - set(tuned)), sorted(set(tuned) - set(expected))
        raise ValueError(f"the fine-tuned backbone tensors do not match its last {stages} stage(s): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in tuned.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"backbone tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    net.load_state_dict(tuned, strict=False)


def model_id(path: str | Path) -> str:
    """A short content hash that names a model file: indexes record it to refuse a mismatched model."""
    return file_sha256(path)[:16]
