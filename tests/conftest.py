import pytest
import torch


@pytest.fixture(scope="session")
def mnist_sample_features():
    """Pixels (normalised) and multi-hot labels of 2,000 training images of the embedded MNIST sample."""
    from vdsh.data.protocols import load_protocol
    from vdsh.training.model import InputSpec

    images, split = load_protocol("mnist-sample")
    idx = split.train[::5]
    x = InputSpec(1, 28, "pixels", [0.1307], [0.3081]).prepare(images.images[idx])
    return x, torch.as_tensor(images.labels[idx]).float()
