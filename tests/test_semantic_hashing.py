"""Semantic hashing: CD-1 is the free-energy gradient difference, pretraining lowers reconstruction error, codes retrieve."""

import math

import pytest
import torch
from torch.nn.functional import softplus

from sample_problem import CHANCE_MAP, assert_round_trip, sample_problem
from vdsh.training.trainers.semantic_hashing import (Rbm, SemanticHashingOptions, SemanticHashingTrainer, SigmoidEncoder,
                                            cd1_gradients, train_rbm)


def free_energy(rbm: Rbm, v: torch.Tensor) -> torch.Tensor:
    visible_term = 0.5 * (v - rbm.visible_bias).pow(2).sum(1) if rbm.gaussian else -(v @ rbm.visible_bias)
    return visible_term - softplus(v @ rbm.weight + rbm.hidden_bias).sum(1)


@pytest.mark.parametrize("gaussian", [True, False])
def test_cd1_is_the_free_energy_gradient_between_data_and_one_gibbs_step(gaussian):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(40, 6, generator=gen, dtype=torch.float64) if gaussian else torch.rand(40, 6, generator=gen, dtype=torch.float64)
    rbm = Rbm(0.3 * torch.randn(6, 4, generator=gen, dtype=torch.float64), 0.1 * torch.randn(6, generator=gen, dtype=torch.float64),
              0.1 * torch.randn(4, generator=gen, dtype=torch.float64), gaussian)
    grad_w, grad_v, grad_h, _ = cd1_gradients(rbm, v, torch.Generator().manual_seed(5))
    # Re-draw the same negative sample, then differentiate −(mean F(data) − mean F(sample)) by autograd.
    replay = torch.Generator().manual_seed(5)
    h_prob = rbm.hidden_probabilities(v)
    v_model = rbm.visible_mean((torch.rand(h_prob.shape, generator=replay).to(h_prob) < h_prob).to(v.dtype))
    params = [rbm.weight.requires_grad_(), rbm.visible_bias.requires_grad_(), rbm.hidden_bias.requires_grad_()]
    objective = -(free_energy(rbm, v).mean() - free_energy(rbm, v_model).mean())
    expected = torch.autograd.grad(objective, params)
    for got, want in zip((grad_w, grad_v, grad_h), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gaussian_rbm_pretraining_lowers_reconstruction_error():
    problem = sample_problem()
    gen = torch.Generator().manual_seed(0)
    x = problem.train_x[:500]
    rbm = Rbm.initial(x, 64, gaussian=True, generator=gen)
    errors = train_rbm(rbm, x, epochs=6, lr=0.01, momentum=0.9, weight_decay=2e-4, batch_size=100, generator=gen)
    assert errors[-1] < 0.8 * errors[0], errors


@pytest.mark.slow
def test_semantic_hashing_learns_balanced_codes_without_labels(tmp_path):
    problem = sample_problem()
    options = SemanticHashingOptions(rbm_epochs=4, finetune_epochs=3, eval_every=0)
    encoder, history = SemanticHashingTrainer(options).fit(SigmoidEncoder([784, 128, 64, 16]), problem.train_x, torch.zeros_like(problem.train_y),
                                                           problem.validation)
    assert isinstance(encoder, SigmoidEncoder) and encoder.bits == 16
    assert [r["phase"] for r in history].count("finetune") == 3
    final = history[-1]["val_map"]
    assert final > 2 * CHANCE_MAP, final  # unsupervised: clearly above chance (labels above were zeros)
    with torch.no_grad():
        on = (encoder(problem.train_x) >= 0).float().mean(0)
    assert bool(((on - 0.5).abs() <= 0.01).all())  # balanced: each bit splits the training set in half
    assert_round_trip(encoder, problem, tmp_path)


def test_standardisation_gives_unit_variance_pixels_and_folds_into_the_first_layer():
    from vdsh.training.trainers.semantic_hashing import Standardisation

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64) * torch.tensor([0.5, 2.0, 3.0, 1.0, 1e-9], dtype=torch.float64) + 4.0
    pixels = Standardisation.of(x, floor=0.1)
    standardised = pixels(x)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(standardised.std(0)[:4], torch.ones(4, dtype=torch.float64))  # each pixel on its own scale
    assert float(pixels.std[4]) == pytest.approx(0.1 * float(x.std(0).mean()))  # the near-constant pixel is floored
    encoder = SigmoidEncoder([5, 4, 3]).double()
    torch.testing.assert_close(pixels.folded(encoder)(x), encoder(standardised))


def test_lbfgs_fine_tuning_lowers_the_reconstruction_error_and_retrieves():
    problem = sample_problem()
    options = SemanticHashingOptions(rbm_epochs=2, finetune_epochs=2, finetune="lbfgs", eval_every=0, balance=False, code_noise=0.0)
    encoder, history = SemanticHashingTrainer(options).fit(SigmoidEncoder([784, 64, 16]), problem.train_x, problem.train_y, problem.validation)
    finetune = [r["loss"] for r in history if r["phase"] == "finetune"]
    assert len(finetune) == 2 and finetune[1] < finetune[0]
    assert history[-1]["val_map"] > 2 * CHANCE_MAP


def test_a_diverging_rbm_starts_again_at_a_smaller_step():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=generator)
    options = SemanticHashingOptions(rbm_epochs=2, finetune_epochs=1, gaussian_lr=1.0, eval_every=0)  # CD-1 blows up
    encoder, history = SemanticHashingTrainer(options).fit(SigmoidEncoder([64, 32, 8]), x, torch.zeros(200, 2))
    first = [r for r in history if r["phase"] == "rbm1"]
    assert first[0]["lr"] < 1.0 and all(math.isfinite(r["loss"]) and r["loss"] < 10 * 64 for r in first)
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
