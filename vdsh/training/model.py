"""A trained hashing model: input preparation + encoder, saved as one self-describing file.

The file is `.safetensors`: the weights, plus JSON in its metadata that names the encoder kind, its
config and the input preparation, so `load_model` rebuilds the model with no code of the trainer
that made it. That is all the index builder and the server need.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vdsh.files import atomic_path
from vdsh.index.codes import sign_codes

ENCODERS: dict[str, type[nn.Module]] = {}
FEATURE_KINDS = ("pixels", "image", "gist")


def register_encoder(kind: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an encoder rebuildable from a checkpoint by its `kind`.

    The class needs `config() -> dict` (JSON-able) and `from_config(cls, config)`.
    """

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if kind in ENCODERS and ENCODERS[kind] is not cls:
            raise ValueError(f"encoder kind {kind!r} is already registered by {ENCODERS[kind].__name__}")
        cls.kind = kind
        ENCODERS[kind] = cls
        return cls

    return register


@dataclass
class InputSpec:
    """How uint8 images (N, C, H, W) become encoder input.

    features: 'pixels' (flattened, normalised vector), 'image' (normalised (N, C, H, W)) or 'gist'
    (GIST-512 descriptors of the images). mean/std: per channel for images; for GIST one value or one
    per dimension (raw GIST values are ~0.05 ± 0.04, far too small for MSRA-initialised layers).
    """

    channels: int
    size: int
    features: str = "pixels"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {self.features!r}")

    def prepare(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float encoder input on the images' device."""
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(
                f"model expects images of shape (N, {self.channels}, {self.size}, {self.size}), got {tuple(images.shape)}"
            )
        if self.features == "gist":
            from vdsh.data.gist import gist_features

            return self.standardise(gist_features(images))
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
    """Images in, real-valued outputs of `bits` units out; codes are their signs."""

    def __init__(self, encoder: nn.Module, input_spec: InputSpec) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_spec = input_spec

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
        return self.encoder(self.input_spec.prepare(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> int8 codes (N, bits) in {-1,+1}, on the CPU, in batches."""
        was_training = self.training
        self.eval()
        device = self.device
        try:
            chunks = [
                sign_codes(self(torch.tensor(np.asarray(images[i : i + batch_size]), device=device))).cpu()
                for i in range(0, len(images), batch_size)
            ]
        finally:
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vdsh": json.dumps(meta)})


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> HashingModel:
    """Rebuild a model from its file; the encoder's module must have been imported (see `vdsh.training`)."""
    import vdsh.training.encoders  # noqa: F401  (registers every encoder kind)

    meta = read_model_metadata(path)
    kind = meta["encoder"]["kind"]
    if kind not in ENCODERS:
        raise ValueError(f"{path}: unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
    encoder = ENCODERS[kind].from_config(meta["encoder"]["config"])
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    encoder.load_state_dict(tensors)
    model = HashingModel(encoder, InputSpec(**meta["input"])).to(device)
    model.info = meta["info"]
    return model.eval()


def model_id(path: str | Path) -> str:
    """A short content hash that names a model file: indexes record it to refuse a mismatched model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
