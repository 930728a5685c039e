"""The small real retrieval problem the method tests learn on: the embedded MNIST sample, cut down.

Pixels are standardised with the training set's mean and one global std (how `InputSpec` prepares
them); the LSH floor is measured on the same slices so "learns" means "beats random hyperplanes".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from vdsh.data import load_protocol
from vdsh.index.codes import sign_codes
from vdsh.index.metrics import mean_average_precision
from vdsh.training.validation import Validation
from vdsh.training.trainers.shallow import fit_lsh
from vdsh.training.encoders.model import HashingModel, InputSpec

CHANCE_MAP = 0.10  # ten balanced classes


@dataclass
class SampleProblem:
    train_x: torch.Tensor
    train_y: torch.Tensor
    validation: Validation
    input_spec: InputSpec
    train_images: object


@lru_cache(maxsize=2)
def sample_problem(n_train: int = 1000, n_query: int = 300, n_database: int = 2000) -> SampleProblem:
    pool, split = load_protocol("mnist-sample")
    pixels = torch.from_numpy(pool.images.reshape(len(pool.images), -1)).float() / 255
    mean, std = float(pixels[split.train].mean()), float(pixels[split.train].std())
    x, y = (pixels - mean) / std, torch.from_numpy(pool.labels).float()
    gen = torch.Generator().manual_seed(0)
    pick = lambda idx, n: torch.as_tensor(idx)[torch.randperm(len(idx), generator=gen)[:n]]  # noqa: E731
    tr, q, db = pick(split.train, n_train), pick(split.query, n_query), pick(split.database, n_database)
    return SampleProblem(x[tr], y[tr], Validation(x[q], y[q], x[db], y[db]),
                         InputSpec(channels=1, size=28, mean=[mean], std=[std]), pool.images[tr.numpy()])


def lsh_map(problem: SampleProblem, bits: int) -> float:
    """mAP@all of LSH fitted on the same training slice, scored on the same validation slices."""
    encoder = fit_lsh(problem.train_x, None, bits, seed=0)
    v = problem.validation
    with torch.no_grad():
        return mean_average_precision(sign_codes(encoder(v.query)), v.query_labels,
                                      sign_codes(encoder(v.database)), v.database_labels)


def assert_round_trip(encoder: torch.nn.Module, problem: SampleProblem, tmp_path) -> None:
    """A trained encoder saves and loads (by its registered kind) to a model giving identical codes."""
    from vdsh.training.encoders.model import load_model, save_model

    model = HashingModel(encoder.cpu(), problem.input_spec)
    save_model(tmp_path / "m.safetensors", model, {"trainer": "test"})
    again = load_model(tmp_path / "m.safetensors")
    images = problem.train_images[:64]
    assert torch.equal(model.encode(images), again.encode(images))
