"""Back-prop baseline: it learns, its options are checked, and the history has the shared format."""

import pytest
import torch

from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.encoders.mlp import DeepMLP


@pytest.mark.slow
def test_backprop_learns_on_the_embedded_sample(mnist_sample_features):
    x, y = mnist_sample_features
    torch.manual_seed(0)
    encoder = DeepMLP(x.shape[1], depth=4, width=128, bits=32, batchnorm=True, residual=True)
    trained, history = BackpropTrainer(BackpropOptions(epochs=2, batch_size=128, lr=0.05, eval_every=0)).fit(encoder, x, y)
    assert len(history) == 2 and {"loss", "time", "train_map"} <= set(history[-1])
    assert history[-1]["train_map"] > 0.5  # forward-pass codes; chance is 0.10


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="optimizer"):
        BackpropOptions(optimizer="lbfgs")
    with pytest.raises(ValueError, match="schedule"):
        BackpropOptions(schedule="warm")
