"""Classic hashing baselines: LSH, ITQ, spectral hashing (unsupervised) and SDH (supervised).

Each `fit_<name>(features (N, D), labels (N, L) multi-hot or None, bits, seed=0, **options)` returns
an encoder module whose `forward(features)` gives real (N, bits) outputs (codes = their signs), whose
fitted parameters are all buffers (so `state_dict()` holds the whole model) and which `config()` /
`from_config()` rebuild with the right shapes.
"""

from vdsh.training.trainers.shallow.itq import ItqEncoder, fit_itq
from vdsh.training.trainers.shallow.lsh import LshEncoder, fit_lsh
from vdsh.training.trainers.shallow.sdh import SdhEncoder, fit_sdh
from vdsh.training.trainers.shallow.spectral import SpectralEncoder, fit_spectral

BASELINES = {"lsh": fit_lsh, "itq": fit_itq, "spectral": fit_spectral, "sdh": fit_sdh}

__all__ = ["BASELINES", "ItqEncoder", "LshEncoder", "SdhEncoder", "SpectralEncoder",
           "fit_itq", "fit_lsh", "fit_sdh", "fit_spectral"]
