"""One backend class per index kind, and `BACKENDS`, the one place that names them: a new kind is a
`Backend` subclass added to that dict."""

from __future__ import annotations

from vdsh.index.backends.approximate import IVF, Hash, MultiHash
from vdsh.index.backends.base import Backend
from vdsh.index.backends.exact import Auto, Distinct, Flat

BACKENDS: dict[str, type[Backend]] = {
    "flat": Flat,
    "distinct": Distinct,
    "auto": Auto,
    "hash": Hash,
    "multihash": MultiHash,
    "ivf": IVF,
}
