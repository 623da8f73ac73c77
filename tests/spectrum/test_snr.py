import numpy as np
import pytest
import torch

from spectraqlora.spectrum.snr import snr_from_singular_values, spectrum_snr


def matrix_with_singular_values(s, n_rows, n_cols, seed=0):
    """U diag(s) V^T with random orthonormal U, V: a matrix whose spectrum we chose."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n_rows, n_rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_cols, n_cols, generator=gen, dtype=torch.float64))
    k = len(s)
    return (u[:, :k] * torch.tensor(s, dtype=torch.float64)) @ v[:, :k].T


def reference(s, n_rows, n_cols):
    """The formula, written out with numpy (spectrum.py's definition)."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    edge = sigma * (1 + np.sqrt(min(n_rows, n_cols) / max(n_rows, n_cols)))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    return signal / noise / s[0]


def test_hand_computed_value():
    # s = 10, 3, 2, 1.5, 1 of a 5 x 8 matrix: q25 = 1.5, q75 = 3, sigma = 1.5 / 1.349,
    # edge = sigma * (1 + sqrt(5/8)) = 1.9914; signal = 10 + 3 + 2, noise = 1.5 + 1.
    expected = (15 / 2.5) / 10
    assert snr_from_singular_values(torch.tensor([10.0, 3, 2, 1.5, 1]), 5, 8) == pytest.approx(expected)


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12)])
def test_matches_the_formula_on_matrices_of_chosen_spectrum(shape):
    rng = np.random.default_rng(1)
    k = min(shape)
    s = np.concatenate([[25.0, 14.0, 9.0], rng.uniform(0.5, 1.5, k - 3)])
    w = matrix_with_singular_values(s, *shape)
    assert spectrum_snr(w) == pytest.approx(reference(s, *shape), rel=1e-5)


def test_no_signal_scores_zero():
    # 4 x 4 with s = 1, 1, 0, 0: IQR = 1, edge = 1.483 > every value.
    w = matrix_with_singular_values([1.0, 1.0, 0.0, 0.0], 4, 4)
    assert spectrum_snr(w) == 0.0
    assert spectrum_snr(torch.zeros(8, 8)) == 0.0


def test_no_noise_counts_noise_as_one():
    # Equal singular values: IQR = 0, so every value is signal; spectrum.py sets noise = 1.
    s = [2.0] * 6
    assert snr_from_singular_values(torch.tensor(s), 6, 6) == pytest.approx(sum(s) / 2.0)
    assert spectrum_snr(matrix_with_singular_values(s, 6, 6)) == pytest.approx(6.0, rel=1e-5)


def test_transpose_and_dtype_do_not_change_the_score():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    w[:, 0] += 10  # a rank-one signal on top of noise
    score = spectrum_snr(w)
    assert score > 0
    assert spectrum_snr(w.T) == pytest.approx(score, rel=1e-5)
    assert spectrum_snr(w.bfloat16()) == pytest.approx(score, rel=2e-2)


def test_one_dimensional_weight_is_a_row():
    assert spectrum_snr(torch.ones(5)) == pytest.approx(1.0)  # one value, all signal: 1/1
    with pytest.raises(ValueError):
        spectrum_snr(torch.ones(2, 2, 2))


def test_heavy_tail_alpha_equals_the_hand_computed_fit():
    """Eigenvalues 1, 2, 4, 8 (singular values their square roots): by hand, for each x_min the
    Hill estimate and the KS distance; the smallest distance picks x_min = 1."""
    from spectraqlora.spectrum.snr import heavy_tail_alpha

    x = np.array([1.0, 2.0, 4.0, 8.0])
    fits = []
    for i in range(3):
        tail = x[i:]
        a = 1 + len(tail) / np.log(tail / tail[0]).sum()
        d = np.max(np.abs(1 - (tail / tail[0]) ** (1 - a) - np.arange(len(tail)) / len(tail)))
        fits.append((d, a))
    expected = min(fits)[1]
    assert heavy_tail_alpha(torch.tensor(np.sqrt(x))) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 + 4 / np.log(64))  # x_min = 1: 1 + n / sum log(x / 1)


def test_heavy_tail_alpha_recovers_a_known_power_law_and_is_scale_free():
    """A matrix whose eigenvalues follow a Pareto law of exponent 2.5 gives alpha near 2.5; a
    random Gaussian matrix (a Marchenko-Pastur bulk, no tail) a much larger one, as
    WeightWatcher reads random layers (alpha > 6)."""
    from spectraqlora.spectrum.snr import heavy_tail_alpha, singular_values

    gen = torch.Generator().manual_seed(0)
    eig = torch.rand(400, generator=gen, dtype=torch.float64) ** (-1 / 1.5)  # Pareto, alpha 2.5, x_min 1
    w = matrix_with_singular_values(eig.sqrt().tolist(), 600, 400)
    alpha = heavy_tail_alpha(singular_values(w))
    assert 2.2 < alpha < 2.8
    assert heavy_tail_alpha(singular_values(1e-2 * w)) == pytest.approx(alpha, rel=1e-9)
    gaussian = torch.randn(1536, 576, generator=gen)
    assert heavy_tail_alpha(singular_values(gaussian)) > 6
    assert heavy_tail_alpha(torch.tensor([1.0])) is None  # one eigenvalue: nothing to fit
