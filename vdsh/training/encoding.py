"""A trained model's codes for many images at once, as the index builder and `vdsh eval` need them.

Models on vector features (GIST, a backbone) read the features their training cached for the whole pool,
rather than computing them again (a fine-tuned backbone: the cached trunk maps through its tuned stages); the
codes are those `HashingModel.encode` gives from the images.
"""

from __future__ import annotations

import numpy as np
import torch

from vdsh.data.imageset import ImageSet
from vdsh.index.codes import pack_codes
from vdsh.progress import progress_bar
from vdsh.training.encoders.model import HashingModel
from vdsh.training.features import cached_feature_vectors, cached_trunk_maps
from vdsh.training.features.finetune import tail_features
from vdsh.training.validation import forward_codes


def model_codes(model: HashingModel, pool: ImageSet, ids: np.ndarray | None = None, batch_size: int = 1024,
                label: str = "encoding") -> np.ndarray:
    """Packed codes (N, nbytes) of the pool's images at positions `ids` (default: all), with a progress bar."""
    ids = np.arange(len(pool)) if ids is None else np.asarray(ids)
    spec = model.input_spec
    if spec.features not in ("pixels", "image"):
        features = pool_features(model, pool)
        codes = forward_codes(model.encoder, spec.standardise(features[torch.as_tensor(ids)]))
        return pack_codes(codes.cpu())
    packed = []
    with progress_bar(label, len(ids)) as advance:
        for start in range(0, len(ids), batch_size):
            batch = np.asarray(pool.images[ids[start : start + batch_size]])
            packed.append(pack_codes(model.encode(batch, batch_size=batch_size)))
            advance(len(batch))
    return np.concatenate(packed) if packed else np.empty((0, (model.bits + 7) // 8), np.uint8)


def pool_features(model: HashingModel, pool: ImageSet) -> torch.Tensor:
    """The whole pool's (unstandardised) features as the model's float backbone or GIST computes them, from the caches."""
    spec, images = model.input_spec, np.asarray(pool.images)
    if not spec.tuned_stages:
        return cached_feature_vectors(spec.features, images, pool.name, spec.resolution)
    if model.int8 or model.folded:
        raise ValueError("pool features of a fine-tuned model come from its trainable float backbone; "
                         "load it without int8 or fold")
    maps = cached_trunk_maps(spec.features, images, pool.name, spec.resolution, spec.tuned_stages)
    return tail_features(model.backbone, maps, spec.tuned_stages)
