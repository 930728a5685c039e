"""Exact batched Hamming k-NN on a GPU, with the CPU's answers: same ids, distances and tie order.

Two backends, tried in order: FAISS's ``GpuIndexBinaryFlat`` (faiss-gpu installed and a GPU seen),
then torch on CUDA (codes unpacked to ±1, one matmul per block). Ties are settled by row (insertion
order) like `HammingIndex` on the CPU. Without either, `gpu_backend()` is None and search stays on the CPU.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np

from vdsh.index.codes import code_bytes, unpack_codes
from vdsh.index.distinct_codes import sort_by_distance_then_row

# FAISS GPU k-selection handles at most this many neighbours per query
FAISS_GPU_MAX_K = 2048
# elements of one (queries x database block) distance matrix: 64M int64 keys = 512 MiB
BLOCK_ELEMENTS = 1 << 26


@functools.lru_cache(maxsize=1)
def gpu_backend() -> str | None:
    """'faiss' (faiss-gpu sees a GPU), 'torch' (torch sees CUDA) or None (CPU only)."""
    if hasattr(faiss, "GpuIndexBinaryFlat") and faiss.get_num_gpus() > 0:
        return "faiss"
    try:
        import torch
    except ImportError:  # torch is a dependency, but the index layer must not need it to search
        return None
    return "torch" if torch.cuda.is_available() else None


def make_gpu_searcher(codes: np.ndarray, bits: int, backend: str | None = None, device: str = "cuda"):
    """A searcher with `knn(queries, k) -> (rows, distances)` over `codes`, on the best backend."""
    backend = backend or gpu_backend()
    if backend == "faiss":
        return FaissGpuSearcher(codes, bits)
    if backend == "torch":
        return TorchHammingSearcher(codes, bits, device)
    raise RuntimeError("no GPU backend: install faiss-gpu or a CUDA build of torch on a machine with a GPU")


class TorchHammingSearcher:
    """Exact k-NN by matmul of ±1 codes; ties broken by row through one unique int64 key per item.

    Runs on any torch device (the tests check it on the CPU against FAISS).
    """

    def __init__(self, codes: np.ndarray, bits: int, device: str = "cuda"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.bits = bits
        self.n = len(codes)
        # integers up to 2048 are exact in float16, so every partial sum of a +-1 dot product is exact
        self.dtype = torch.float16 if self.device.type == "cuda" and bits <= 2048 else torch.float32
        self.database = unpack_codes(codes, bits).to(self.device, self.dtype)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        k = min(k, self.n)
        q = unpack_codes(queries, self.bits).to(self.device, self.dtype)
        block = max(k, BLOCK_ELEMENTS // max(len(q), 1))
        best = None
        for start in range(0, self.n, block):
            part = self.database[start : start + block]
            dists = ((self.bits - (q @ part.T).float()) / 2).round().long()
            rows = torch.arange(start, start + len(part), device=self.device)
            keys = torch.topk(dists * self.n + rows, min(k, len(part)), dim=1, largest=False, sorted=True).values
            if best is not None:
                keys = torch.topk(torch.cat([best, keys], dim=1), k, dim=1, largest=False, sorted=True).values
            best = keys
        best = best.cpu().numpy()
        return best % self.n, (best // self.n).astype(np.int32)


class FaissGpuSearcher:
    """``GpuIndexBinaryFlat`` k-NN; answers whose k-th distance ties past the fetched window go to the CPU.

    FAISS's GPU selection does not promise which of several tied items it keeps, so it fetches extra
    neighbours: when the last fetched distance exceeds the k-th, every item at the k-th distance was
    fetched and sorting by (distance, row) is exact; otherwise that query is answered by the CPU flat scan.
    """

    def __init__(self, codes: np.ndarray, bits: int):
        d = 8 * code_bytes(bits)
        self.n = len(codes)
        self.resources = faiss.StandardGpuResources()
        self.index = faiss.GpuIndexBinaryFlat(self.resources, d)
        self.index.add(codes)
        self.cpu_index = faiss.IndexBinaryFlat(d)
        self.cpu_index.add(codes)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        if k > FAISS_GPU_MAX_K:
            dists, rows = self.cpu_index.search(queries, k)
            return rows, dists
        fetched = min(self.n, FAISS_GPU_MAX_K, max(2 * k, k + 64))
        dists, rows = self.index.search(queries, fetched)
        out_rows = np.empty((len(queries), k), dtype=np.int64)
        out_dists = np.empty((len(queries), k), dtype=np.int32)
        uncertain = []
        for i in range(len(queries)):
            kth = dists[i, k - 1]
            if fetched == self.n or dists[i, -1] > kth:
                sel = dists[i] <= kth
                out_rows[i], out_dists[i] = sort_by_distance_then_row(rows[i][sel], dists[i][sel], self.n, k)
            else:
                uncertain.append(i)
        if uncertain:
            cpu_dists, cpu_rows = self.cpu_index.search(queries[uncertain], k)
            out_rows[uncertain], out_dists[uncertain] = cpu_rows, cpu_dists
        return out_rows, out_dists
