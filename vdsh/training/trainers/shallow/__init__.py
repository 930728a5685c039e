"""Classic hashing baselines: LSH, ITQ, spectral hashing (unsupervised) and SDH (supervised).

Each `fit_<name>(features (N, D), labels (N, L) multi-hot or None, bits, seed=0, **options)` returns its
encoder (`vdsh.training.encoders.shallow`): fitted parameters as buffers, real (N, bits) outputs whose
signs are the codes. The registry (`trainers.registry.SHALLOW_HASHERS`) names them.
"""

from vdsh.training.trainers.shallow.itq import fit_itq
from vdsh.training.trainers.shallow.lsh import fit_lsh
from vdsh.training.trainers.shallow.sdh import fit_sdh
from vdsh.training.trainers.shallow.spectral import fit_spectral

__all__ = ["fit_itq", "fit_lsh", "fit_sdh", "fit_spectral"]
