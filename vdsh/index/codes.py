"""Binary codes: sign codes in {-1,+1}, packed uint8 rows, and the files that hold them.

A code of `bits` bits is stored packed, `ceil(bits / 8)` bytes per row, most significant bit first
(numpy's `packbits` order), bit 1 for +1. Lengths that are not multiples of 8 are padded with zero
bits, which never differ between two codes and so never change a Hamming distance. This is the
layout FAISS binary indexes use (`d = 8 * nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vdsh.files import atomic_path


def code_bytes(bits: int) -> int:
    """Bytes per packed code of `bits` bits."""
    if bits <= 0:
        raise ValueError(f"code length must be positive, got {bits}")
    return (bits + 7) // 8


def sign_codes(outputs: torch.Tensor | np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """b = sgn(F(x)) in {-1,+1}, int8 unless `dtype` asks for another (trainers: their float dtype); zero maps to
    +1 so every bit is defined."""
    outputs = torch.as_tensor(outputs)
    return torch.where(outputs >= 0, 1, -1).to(torch.int8 if dtype is None else dtype)


def pack_codes(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """(n, bits) codes in {-1,+1} or {0,1} -> (n, ceil(bits/8)) uint8, zero-padded."""
    codes = np.asarray(torch.as_tensor(codes).cpu())
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-d array (n, bits), got shape {codes.shape}")
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> torch.Tensor:
    """(n, nbytes) uint8 -> (n, bits) int8 codes in {-1,+1}."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != code_bytes(bits):
        raise ValueError(
            f"packed codes of {bits} bits need {code_bytes(bits)} bytes per row, got shape {packed.shape}"
        )
    ones = np.unpackbits(packed, axis=1, count=bits)
    return torch.from_numpy(ones.astype(np.int8) * 2 - 1)


@dataclass
class CodeSet:
    """Codes of some items with their multi-hot labels, as exchanged between encoders and `vdsh eval`."""

    packed: np.ndarray  # (n, ceil(bits/8)) uint8
    bits: int
    labels: np.ndarray  # (n, n_classes) uint8 multi-hot

    def __post_init__(self) -> None:
        if self.packed.shape[1] != code_bytes(self.bits):
            raise ValueError(f"{self.bits}-bit codes need {code_bytes(self.bits)} bytes, got {self.packed.shape[1]}")
        if len(self.labels) != len(self.packed):
            raise ValueError(f"{len(self.packed)} codes but {len(self.labels)} label rows")

    @property
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits)

    @classmethod
    def from_codes(cls, codes: torch.Tensor | np.ndarray, labels: np.ndarray) -> "CodeSet":
        codes = torch.as_tensor(codes)
        return cls(pack_codes(codes), int(codes.shape[1]), as_multi_hot(labels))


def as_multi_hot(labels: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Class indices (n,) or a multi-hot matrix (n, c) -> uint8 multi-hot (n, c)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return (labels > 0).astype(np.uint8)
    if labels.ndim != 1:
        raise ValueError(f"labels must be (n,) class indices or (n, c) multi-hot, got shape {labels.shape}")
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    onehot = np.zeros((len(labels), n_classes), dtype=np.uint8)
    onehot[np.arange(len(labels)), labels] = 1
    return onehot


def save_codes(path: str | Path, code_set: CodeSet, ids: np.ndarray | None = None,
               class_names: list[str] | None = None) -> None:
    """Write codes and labels to `.npz` or `.h5`, atomically (temporary file, fsync, rename).

    ids (one int64 per code, e.g. positions in the dataset) and class_names (one per label column) are
    written too when given; `load_codes` ignores them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".h5", ".hdf5"):
        raise ValueError(f"unknown codes file type {path.suffix!r}: use .npz or .h5")
    extra = {}
    if ids is not None:
        if len(ids) != len(code_set.packed):
            raise ValueError(f"{len(code_set.packed)} codes but {len(ids)} ids")
        extra["ids"] = np.asarray(ids, dtype=np.int64)
    if class_names is not None:
        if len(class_names) != code_set.labels.shape[1]:
            raise ValueError(f"{code_set.labels.shape[1]} label columns but {len(class_names)} class names")
        extra["class_names"] = np.asarray(class_names, dtype=str)
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, codes=code_set.packed, bits=np.int64(code_set.bits), labels=code_set.labels, **extra)
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                f.create_dataset("codes", data=code_set.packed)
                f.create_dataset("labels", data=code_set.labels)
                if "ids" in extra:
                    f.create_dataset("ids", data=extra["ids"])
                if "class_names" in extra:
                    f.create_dataset("class_names", data=extra["class_names"].astype(object), dtype=h5py.string_dtype())
                f.attrs["bits"] = code_set.bits


def load_codes(path: str | Path, bits: int | None = None) -> CodeSet:
    """Read a codes file written by `save_codes` or by any encoder.

    Accepts `codes` either packed (uint8, with `bits` stored or given) or unpacked (n, bits) in
    {-1,+1} or {0,1}; `labels` either class indices or multi-hot.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codes file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in f.keys()}
            arrays.update({k: np.asarray(v) for k, v in f.attrs.items()})
    else:
        raise ValueError(f"unknown codes file type {path.suffix!r} ({path}): use .npz or .h5")
    for key in ("codes", "labels"):
        if key not in arrays:
            raise ValueError(f"{path} has no '{key}' array (found: {sorted(arrays)})")
    codes, labels = arrays["codes"], arrays["labels"]
    bits = int(arrays["bits"]) if bits is None and "bits" in arrays else bits
    is_packed = codes.dtype == np.uint8 and bits is not None and codes.shape[1] == code_bytes(bits) != bits
    if is_packed:
        return CodeSet(np.ascontiguousarray(codes), bits, as_multi_hot(labels))
    values = np.unique(codes)
    if not set(values.tolist()) <= {-1, 0, 1}:
        raise ValueError(f"{path}: unpacked codes must be in {{-1,+1}} or {{0,1}}, found values {values[:5]}")
    if bits is not None and codes.shape[1] != bits:
        raise ValueError(f"{path}: expected {bits}-bit codes, found {codes.shape[1]} columns")
    return CodeSet.from_codes(np.where(codes > 0, 1, -1), labels)


def code_words(codes: np.ndarray) -> np.ndarray:
    """(w, n) uint64 words of packed (n, nbytes) codes, zero-padded to whole words; a view when nbytes == 8.

    Word-major so that each word of every code is one contiguous row, the loop `flat_scan` vectorises.
    """
    n, nbytes = codes.shape
    if nbytes == 8:
        return np.ascontiguousarray(codes).view(np.uint64).reshape(1, n)
    words = -(-nbytes // 8)
    padded = np.zeros((n, 8 * words), dtype=np.uint8)
    padded[:, :nbytes] = codes
    return np.ascontiguousarray(padded.view(np.uint64).T)


def extended_code_words(words: np.ndarray, codes: np.ndarray, added: np.ndarray) -> np.ndarray:
    """`code_words(codes)` where `codes` are the codes of `words` followed by `added`: a view again for
    8-byte codes, else one concatenation, never a redo of the words already there."""
    if codes.shape[1] == 8:
        return code_words(codes)
    return np.concatenate([words, code_words(added)], axis=1)
