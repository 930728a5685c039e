"""Classic hashing baselines: the properties each algorithm promises, then retrieval on real MNIST digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch
import torch

from vdsh.index.codes import as_multi_hot, sign_codes
from vdsh.training.trainers.registry import SHALLOW_HASHERS as BASELINES
from vdsh.training.trainers.shallow.itq import fit_itq, quantisation_loss
from vdsh.training.trainers.shallow.lsh import fit_lsh
from vdsh.training.encoders.shallow import SdhEncoder, squared_distances
from vdsh.training.trainers.shallow.sdh import discrete_code_step, fit_sdh, ridge_regression, solve_sdh
from vdsh.training.trainers.shallow.spectral import fit_spectral, select_modes
from vdsh.training.encoders.model import HashingModel, InputSpec, load_model, save_model

SMALL_SDH = {"anchors": 100}  # keeps synthetic fits fast; real-data tests use the default 1000


def clustered(n: int = 600, dim: int = 24, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian classes with an uneven spectrum (as image features have), one-hot labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=gen)
    classes_of = torch.randint(0, classes, (n,), generator=gen)
    scales = torch.logspace(0, -1.5, dim)  # variance falls off across directions
    x = (centres[classes_of] + torch.randn(n, dim, generator=gen)) * scales
    return x.float(), as_multi_hot(classes_of.numpy(), classes)


def fit(name: str, x: torch.Tensor, labels: np.ndarray, bits: int, seed: int = 0) -> torch.nn.Module:
    return BASELINES[name](x, labels, bits, seed=seed, **(SMALL_SDH if name == "sdh" else {}))


# ---- every method ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_outputs_are_real_bits_wide_and_in_the_input_dtype(name):
    x, labels = clustered()
    encoder = fit(name, x, labels, bits=12)
    out = encoder(x)
    assert out.shape == (len(x), 12) and out.dtype == torch.float32
    assert encoder(x.double()).dtype == torch.float64
    images = x.reshape(len(x), 1, 4, 6)  # (N, C, H, W) is flattened like the features it came from
    assert torch.equal(encoder(images), out)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_config_and_state_dict_rebuild_an_identical_encoder_through_safetensors(name):
    x, labels = clustered()
    encoder = fit(name, x, labels, bits=16)
    state = safetensors.torch.load(safetensors.torch.save(encoder.state_dict()))
    rebuilt = type(encoder).from_config(encoder.config())
    rebuilt.load_state_dict(state)  # strict: same buffer names and shapes
    assert torch.equal(rebuilt(x), encoder(x))
    assert not list(encoder.parameters()), "fitted values must be buffers, not trainable parameters"


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_a_saved_baseline_model_file_reloads_to_the_same_codes(name, tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 6, 6), generator=gen, dtype=torch.uint8)
    labels = as_multi_hot(torch.randint(0, 4, (300,), generator=gen).numpy(), 4)
    spec = InputSpec(channels=1, size=6, features="pixels")
    model = HashingModel(fit(name, spec.prepare(images), labels, bits=8), spec)
    save_model(tmp_path / "model.safetensors", model, {"trainer": name})
    reloaded = load_model(tmp_path / "model.safetensors")
    assert type(reloaded.encoder) is type(model.encoder) and reloaded.encoder.kind == name
    assert torch.equal(reloaded.encode(images), model.encode(images))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_same_seed_same_encoder(name):
    x, labels = clustered()
    first, second = fit(name, x, labels, 16, seed=3), fit(name, x, labels, 16, seed=3)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_a_loaded_sdh_encoder_recomputes_its_anchor_norms_and_gives_the_same_outputs():
    x, labels = clustered()
    fitted = fit("sdh", x, labels, 16)
    loaded = SdhEncoder.from_config(fitted.config())
    assert "anchor_norms" not in fitted.state_dict()  # derived, not saved
    loaded.load_state_dict(fitted.state_dict())
    assert torch.allclose(loaded.anchor_norms, (fitted.anchors ** 2).sum(1))
    assert torch.equal(loaded(x), fitted(x))
    plain = torch.exp(-squared_distances(x.double(), fitted.anchors) / (2 * fitted.sigma ** 2)) @ fitted.projection + fitted.bias
    torch.testing.assert_close(fitted(x), plain.float())


@pytest.mark.parametrize("name", ["lsh", "itq", "sdh"])
def test_seeded_methods_depend_on_the_seed(name):
    x, labels = clustered()
    assert not torch.equal(fit(name, x, labels, 16, seed=0)(x), fit(name, x, labels, 16, seed=1)(x))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_bad_input_is_refused_with_a_clear_error(name):
    x, labels = clustered()
    with pytest.raises(ValueError, match="bits"):
        fit(name, x, labels, bits=0)
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(name, nan, labels, bits=8)
    encoder = fit(name, x, labels, bits=8)
    with pytest.raises(ValueError, match="expects 24 features"):
        encoder(x[:, :20])


# ---- LSH ------------------------------------------------------------------------------------------


def test_lsh_hamming_distance_estimates_the_angle_between_centred_points():
    x, _ = clustered(dim=24)
    encoder = fit_lsh(x, None, bits=8192)
    a, b = x[:2] - encoder.mean.float()
    angle = math.acos(float(a @ b / (a.norm() * b.norm())))
    codes = sign_codes(encoder(x[:2]))
    differing = float((codes[0] != codes[1]).float().mean())
    assert differing == pytest.approx(angle / math.pi, abs=0.03)  # 3 standard errors at 8192 bits


# ---- ITQ ------------------------------------------------------------------------------------------


def test_itq_rotation_is_orthogonal_and_pca_directions_orthonormal():
    x, _ = clustered()
    encoder = fit_itq(x, None, bits=16)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(encoder.rotation.T @ encoder.rotation, eye, atol=1e-10)
    assert torch.allclose(encoder.pca.T @ encoder.pca, eye, atol=1e-10)


def test_itq_quantisation_loss_falls_with_iterations_and_beats_pca_sign():
    x, _ = clustered()
    losses = []
    for iterations in (0, 1, 10, 50):
        encoder = fit_itq(x, None, bits=16, iterations=iterations)
        projected = (x.double() - encoder.mean) @ encoder.pca
        losses.append(quantisation_loss(projected, encoder.rotation))
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    pca_sign = quantisation_loss(projected, torch.eye(16, dtype=torch.float64))
    assert losses[-1] < 0.9 * pca_sign


def test_itq_needs_no_more_bits_than_feature_dimensions():
    x, _ = clustered(dim=24)
    with pytest.raises(ValueError, match="exceeds 24"):
        fit_itq(x, None, bits=32)


# ---- SDH ------------------------------------------------------------------------------------------


def test_ridge_regression_is_the_least_squares_solution_of_the_augmented_system():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(200, 16, generator=gen, dtype=torch.float64).sign()
    y = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    lam = 0.7
    augmented_b = torch.cat([b, math.sqrt(lam) * torch.eye(16, dtype=torch.float64)])
    augmented_y = torch.cat([y, torch.zeros(16, 5, dtype=torch.float64)])
    expected = torch.linalg.lstsq(augmented_b, augmented_y).solution
    assert torch.allclose(ridge_regression(b, y, lam), expected, atol=1e-10)


def test_discrete_code_step_leaves_no_single_bit_flip_that_lowers_its_objective():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    q = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    start = torch.randn(30, 8, generator=gen, dtype=torch.float64).sign()

    def objective(codes):
        return float(((codes @ w) ** 2).sum() - 2 * (codes * q).sum())

    codes = discrete_code_step(start, w, q, max_sweeps=100)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert objective(codes) <= objective(start)
    for i in range(codes.shape[0]):
        for bit in range(codes.shape[1]):
            flipped = codes.clone()
            flipped[i, bit] *= -1
            assert objective(flipped) >= objective(codes) - 1e-9


def test_sdh_objective_never_increases_and_its_classifier_is_the_ridge_solution():
    x, labels = clustered()
    phi1 = torch.cat([torch.tanh(x.double()), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    y = torch.as_tensor(labels, dtype=torch.float64)
    solution = solve_sdh(phi1, y, 16, torch.Generator().manual_seed(0), lam=1.0, nu=1e-2, ridge=1e-2,
                         iterations=6, max_sweeps=10)
    history = solution.objective
    assert all(later <= earlier + 1e-9 for earlier, later in zip(history, history[1:]))
    assert torch.allclose(solution.classifier, ridge_regression(solution.codes, y, 1.0))
    assert torch.allclose(solution.projection, ridge_regression(phi1, solution.codes, 1e-2))


def test_sdh_learns_multi_label_targets_that_unsupervised_itq_cannot_see():
    """Half the feature dimensions carry the labels, half are larger label-free nuisance; relevance is
    sharing any of 6 labels. SDH's multi-hot regression finds the label directions, ITQ the variance."""
    from vdsh.index.metrics import mean_average_precision

    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(800, 6, generator=gen) < 0.3).float()
    labels[labels.sum(1) == 0, 0] = 1  # every item has at least one label
    signal = labels @ torch.randn(6, 10, generator=gen) + 0.3 * torch.randn(800, 10, generator=gen)
    x = torch.cat([signal, 2 * torch.randn(800, 10, generator=gen)], dim=1)
    train, query = slice(0, 600), slice(600, 800)
    scores = {}
    for name in ("itq", "sdh"):
        encoder = fit(name, x[train], labels[train].numpy(), bits=16)
        codes = sign_codes(encoder(x))
        scores[name] = mean_average_precision(codes[query], labels[query].numpy(), codes[train], labels[train].numpy())
    assert scores["sdh"] > scores["itq"] + 0.1, scores


def test_sdh_is_supervised_and_needs_enough_rows_for_its_anchors():
    x, labels = clustered(n=300)
    with pytest.raises(ValueError, match="supervised"):
        fit_sdh(x, None, bits=8)
    with pytest.raises(ValueError, match="anchors"):
        fit_sdh(x, labels, bits=8)  # 1000 anchors > 300 rows
    with pytest.raises(ValueError, match="label rows"):
        fit_sdh(x, labels[:-1], bits=8, anchors=50)


# ---- spectral hashing -----------------------------------------------------------------------------


def test_spectral_modes_are_the_smallest_eigenvalues_of_the_authors_enumeration():
    widths = torch.tensor([4.0, 2.5, 1.0, 0.3], dtype=torch.float64)
    bits = 9
    # The authors' code: multiples up to ceil((bits + 1) * width / max width) - 1 per direction.
    candidates = [
        ((k / float(w)) ** 2, d, k)
        for d, w in enumerate(widths)
        for k in range(1, math.ceil((bits + 1) * float(w) / float(widths.max())))
    ]
    expected = sorted(candidates)[:bits]
    dims, multiples = select_modes(widths, bits)
    assert [(d, k) for _, d, k in expected] == list(zip(dims.tolist(), multiples.int().tolist()))


def test_spectral_bits_are_balanced_on_uniform_box_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20000, 5, generator=gen) * torch.tensor([8.0, 5.0, 3.0, 2.0, 1.0])
    encoder = fit_spectral(x, None, bits=12)
    assert encoder.mode_multiples.max() > 1, "the test should cover higher-frequency modes"
    balance = sign_codes(encoder(x)).float().mean(0)
    assert balance.abs().max() < 0.1


# ---- real data: the embedded MNIST sample ---------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_sample_map():
    """mAP@all of every baseline at 32 bits on the `mnist-sample` protocol, plus the chance level."""
    from vdsh.data.protocols import load_protocol
    from vdsh.index.metrics import mean_average_precision

    images, split = load_protocol("mnist-sample")
    pixels = torch.from_numpy(images.images.reshape(len(images.images), -1)).float() / 255
    labels = images.labels
    scores = {}
    for name, fit_baseline in BASELINES.items():
        encoder = fit_baseline(pixels[split.train], labels[split.train], bits=32, seed=0)
        query, database = sign_codes(encoder(pixels[split.query])), sign_codes(encoder(pixels[split.database]))
        scores[name] = mean_average_precision(query, labels[split.query], database, labels[split.database])
    relevant = (labels[split.query].astype(float) @ labels[split.database].T.astype(float)) > 0
    scores["chance"] = float(relevant.mean())
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_retrieves_mnist_digits_well_above_chance(mnist_sample_map, name):
    assert mnist_sample_map[name] > 2 * mnist_sample_map["chance"]


@pytest.mark.slow
def test_supervised_sdh_beats_unsupervised_lsh_and_itq_on_mnist(mnist_sample_map):
    assert mnist_sample_map["sdh"] > max(mnist_sample_map["lsh"], mnist_sample_map["itq"]) + 0.2


def test_bench_baselines_writes_its_measured_table_into_benchmarks_md(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vdsh.app.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["bench", "baselines", "--protocol", "mnist-sample", "--bits", "8",
                                      "--bits", "16", "--method", "lsh"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Classic baselines, mnist-sample, pixels" in text
    rows = [line for line in text.splitlines() if line.startswith(("| lsh | 8 |", "| lsh | 16 |"))]
    assert len(rows) == 2
    assert all(0 < float(row.split("|")[3]) <= 1 for row in rows)  # an mAP, as measured


def test_an_unknown_trainer_names_the_known_ones():
    from vdsh.training.run import RunConfig

    with pytest.raises(ValueError, match="lsh, itq, spectral, sdh"):
        RunConfig("mnist-sample", "pca-sign")
