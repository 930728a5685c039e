"""The CNN recipe of `BackpropTrainer`: what back-prop on images needs beyond the MLP defaults.

Per-channel normalisation of the training images (`protocol_inputs.image_spec`), crop/flip augmentation
on the device, label smoothing, channels-last, bf16 autocast on CUDA (the pipeline sets it). Hashing
mode: tanh head + linear classifier + quantisation term (the trainer's loss). Classifier mode
(PROTOCOL.md's baseline): one output per class, plain cross-entropy, codes from `ClassScoreCode`.
"""

from __future__ import annotations

from dataclasses import replace

from vdsh.training.trainers.backprop import BackpropOptions

# The fast-CIFAR settings: one-cycle Nesterov SGD, label smoothing 0.1 as in the ResNet-9 trainers. Peak
# lr 0.2 and no quantisation term won a small screen on mnist-sample (small_cnn w=8, 4 epochs, batch 128,
# 48 bits; lr 0.05, 0.1, 0.2; quantisation 0, 0.002, 0.01). Measured figures: BENCHMARKS.md, "CNN trainers".
CNN_OPTIONS = BackpropOptions(epochs=10, batch_size=256, lr=0.2, label_smoothing=0.1, quantisation=0.0,
                              channels_last=True, eval_every=0)


def cnn_options(settings: dict) -> BackpropOptions:
    """CNN_OPTIONS with the pipeline's settings (device, seed, epochs, extras); bf16 autocast on CUDA."""
    device = settings.get("device", CNN_OPTIONS.device)
    return replace(CNN_OPTIONS, **{"dtype": "bfloat16" if device.startswith("cuda") else "float32", **settings})
