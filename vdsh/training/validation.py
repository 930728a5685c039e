"""What every trainer scores while it trains: forward-pass codes and their mAP on a small retrieval problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdsh.index.metrics import mean_average_precision
from vdsh.index.codes import sign_codes


@dataclass
class Validation:
    """A small held-out retrieval problem scored after sweeps or epochs: features and multi-hot labels."""

    query: torch.Tensor
    query_labels: torch.Tensor
    database: torch.Tensor
    database_labels: torch.Tensor


def forward_codes(encoder: torch.nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """±1 float codes of a plain forward pass, in batches, on the encoder's device."""
    tensor = next(iter([*encoder.parameters(), *encoder.buffers()]), torch.empty(0))  # shallow hashers hold buffers only
    device, dtype = tensor.device, tensor.dtype
    was_training = encoder.training
    encoder.eval()
    try:
        outs = [encoder(features[i : i + batch_size].to(device, dtype)) for i in range(0, len(features), batch_size)]
    finally:
        encoder.train(was_training)
    return sign_codes(torch.cat(outs), torch.float32)


@torch.no_grad()
def evaluate_encoder(encoder: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, validation: Validation | None, eval_size: int, seed: int) -> dict:
    """Train mAP (eval_size training queries vs the training set) and validation mAP, forward-pass codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = forward_codes(encoder, x)
    pick = torch.randperm(len(x), generator=generator)[: min(eval_size, len(x))].to(codes.device)
    out = {"train_map": mean_average_precision(codes[pick], y[pick], codes, y)}
    if validation is not None:
        q = forward_codes(encoder, validation.query)
        db = forward_codes(encoder, validation.database)
        out["val_map"] = mean_average_precision(q, validation.query_labels, db, validation.database_labels)
    return out
