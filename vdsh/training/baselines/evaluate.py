"""Fit every baseline on a protocol's training set and score its codes: mAP@all and wall-clock times.

    python -m vdsh.training.baselines.evaluate --protocol mnist-5k --bits 16 32 48 64

Features are pixels scaled to [0, 1] and flattened. Prints one markdown row per (method, bits).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from vdsh.data.protocols import load_protocol
from vdsh.index.codes import sign_codes
from vdsh.index.metrics import mean_average_precision
from vdsh.training.baselines import BASELINES


def pixel_features(images) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C*H*W) in [0, 1]."""
    return torch.from_numpy(images.reshape(len(images), -1)).float() / 255


def evaluate(protocol: str, bits_list: list[int], methods: list[str], seed: int) -> list[dict]:
    """One result dict per (method, bits): mAP@all, fit seconds, encode seconds (query + database)."""
    images, split = load_protocol(protocol, seed=seed)
    pixels, labels = pixel_features(images.images), images.labels
    results = []
    for bits in bits_list:
        for name in methods:
            start = time.perf_counter()
            encoder = BASELINES[name](pixels[split.train], labels[split.train], bits=bits, seed=seed)
            fitted = time.perf_counter()
            with torch.no_grad():
                query = sign_codes(encoder(pixels[split.query]))
                database = sign_codes(encoder(pixels[split.database]))
            encoded = time.perf_counter()
            score = mean_average_precision(query, labels[split.query], database, labels[split.database])
            results.append({"method": name, "bits": bits, "map_all": score,
                            "fit_s": fitted - start, "encode_s": encoded - fitted})
            print(f"| {name} | {bits} | {score:.4f} | {fitted - start:.1f} | {encoded - fitted:.1f} |", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="mnist-sample")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 48, 64])
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"protocol {args.protocol}, seed {args.seed}, pixels/255, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, {date.today()}")
    print("| method | bits | mAP@all | fit s | encode s |\n| --- | --- | --- | --- | --- |")
    evaluate(args.protocol, args.bits, args.methods, args.seed)


if __name__ == "__main__":
    main()
