"""A small real model and index for the server tests: ridge-regression hashing on the embedded MNIST sample.

The model is a LinearEncoder fitted in closed form: pixels -> each class's target code (a fixed random
±1 code per class), so images of one digit land near one code. Trained on the sample's training part,
indexed on (part of) its database part, queried with its query part: no image is both indexed and queried.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vdsh.app.bench.http import png_bytes, start_server  # noqa: F401  (re-exported to the tests)
from vdsh.data.protocols import load_protocol
from vdsh.training.encoders.linear import LinearEncoder
from vdsh.training.encoders.model import HashingModel, InputSpec, save_model

BITS = 32
MEAN, STD = 0.1307, 0.3081


@dataclass
class ServingSetup:
    model_path: Path
    index_dir: Path
    query_images: np.ndarray  # uint8 (N, 1, 28, 28), not in the index
    query_classes: np.ndarray  # (N,) digit of each query image
    class_names: list[str]


def train_ridge_hashing_model(images: np.ndarray, classes: np.ndarray, bits: int = BITS, seed: int = 0,
                              ridge: float = 10.0) -> HashingModel:
    """Closed-form least squares from normalised pixels to per-class random ±1 target codes."""
    rng = np.random.default_rng(seed)
    class_codes = rng.choice([-1.0, 1.0], size=(int(classes.max()) + 1, bits))
    x = (images.reshape(len(images), -1).astype(np.float64) / 255 - MEAN) / STD
    x = np.hstack([x, np.ones((len(x), 1))])  # bias column
    targets = class_codes[classes]
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)
    encoder = LinearEncoder(x.shape[1] - 1, bits)
    with torch.no_grad():
        encoder.projection.weight.copy_(torch.from_numpy(weights[:-1].T))
        encoder.projection.bias.copy_(torch.from_numpy(weights[-1]))
    return HashingModel(encoder, InputSpec(channels=1, size=28, mean=[MEAN], std=[STD]))


def make_serving_setup(root: Path, index_items: int = 1500, train_items: int = 3000, kind: str = "flat") -> ServingSetup:
    from vdsh.app.items import build_index

    pool, split = load_protocol("mnist-sample")
    train = pool.subset(split.train[:train_items])
    model = train_ridge_hashing_model(train.images, train.targets)
    model_path = root / "model.safetensors"
    save_model(model_path, model, {"trainer": "ridge (test fixture)"})
    index_dir = root / "index"
    build_index(model_path, pool.subset(split.database[:index_items]), kind, index_dir, batch_size=512)
    queries = pool.subset(split.query[:50])
    return ServingSetup(model_path, index_dir, queries.images, queries.targets, pool.class_names)


def encoded_bytes(image: np.ndarray, fmt: str) -> bytes:
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@functools.cache
def shared_setup() -> ServingSetup:
    """One model + index per test session, shared by the read-only tests of every module."""
    root = Path(tempfile.mkdtemp(prefix="vdsh-serving-"))
    atexit.register(shutil.rmtree, root, True)
    return make_serving_setup(root, index_items=1000)


@functools.cache
def shared_server() -> str:
    """One read-only uvicorn process on the shared index per session (starting one costs seconds)."""
    setup = shared_setup()
    process, url = start_server(setup.index_dir, setup.model_path)
    atexit.register(stop_server, process)
    return url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
