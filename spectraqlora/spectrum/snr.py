"""Spectrum's signal-to-noise ratio of a weight matrix (Hartford et al. 2024), KappaTune's
condition number and the heavy-tail exponent alpha (WeightWatcher; AlphaLoRA, OwLore), all three
from the same singular values.

Singular values inside the Marchenko-Pastur bulk of a random matrix with the same shape count as
noise, those above its edge as signal. Computed as the public spectrum.py does, so rankings match:

    S       = singular values of W (fp32), descending
    sigma   = IQR(S) / 1.349                      (quantiles with linear interpolation)
    beta    = min(n, m) / max(n, m)
    edge    = sigma * (1 + sqrt(beta))
    snr     = (sum(S > edge) / sum(S <= edge)) / S[0]

No value above the edge gives 0. No value at or below it gives noise = 1, as spectrum.py does
today (older result files hold Infinity there).
"""
from __future__ import annotations

import math

import torch


def snr_from_singular_values(s: torch.Tensor, n_rows: int, n_cols: int) -> float:
    """SNR from the singular values of an n_rows x n_cols matrix (any order)."""
    s = torch.sort(s.double(), descending=True).values
    if s.numel() == 0 or s[0] <= 0:
        return 0.0
    iqr = torch.quantile(s, 0.75) - torch.quantile(s, 0.25)
    sigma = iqr / 1.349
    beta = min(n_rows, n_cols) / max(n_rows, n_cols)
    edge = sigma * (1 + math.sqrt(beta))
    signal = s[s > edge].sum()
    if signal == 0:
        return 0.0
    noise = s[s <= edge].sum() if bool((s <= edge).any()) else torch.tensor(1.0)
    return float(signal / noise / s[0])


def condition_number(s: torch.Tensor) -> float:
    """KappaTune's condition number of a matrix from its singular values (any order):
    S_max / (S_min + 1e-8), as peft.helpers.KappaTuneSelector computes it (arXiv 2506.16289)."""
    s = s.double()
    return float(s.max() / (s.min() + 1e-8))


EIGEN_FLOOR = 1e-5  # eigenvalues at or below this are left out of the fit, as WeightWatcher's EVALS_THRESH


def heavy_tail_alpha(s: torch.Tensor) -> float | None:
    """The power-law exponent of the tail of W's empirical spectral density, fitted as
    WeightWatcher fits it (Martin & Mahoney; Clauset, Shalizi & Newman 2009):

        x       = eigenvalues of W^T W (the squared singular values) above EIGEN_FLOOR, ascending
        for each candidate x_min = x[i] (every value but the largest):
            n       = number of values >= x_min
            alpha_i = 1 + n / sum(log(x_j / x_min))               (continuous MLE, Hill estimator)
            D_i     = max |(1 - (x_j / x_min)^(1 - alpha_i)) - (j - i) / n|   (Kolmogorov-Smirnov)
        alpha   = alpha_i at the x_min with the smallest D_i (a fit with alpha_i <= 1 counts D = 1)

    Scale-free: W and c x W give the same alpha. Well-trained layers show heavy tails (alpha ~2-4),
    a random Gaussian matrix a Marchenko-Pastur bulk with no tail (alpha well above 4). None when
    fewer than two eigenvalues clear the floor.
    """
    x = torch.sort(s.double() ** 2).values
    x = x[x > EIGEN_FLOOR]
    if x.numel() < 2:
        return None
    log_x = x.log()
    n = torch.arange(x.numel(), 0, -1, dtype=torch.float64)[:-1]  # tail sizes for x_min = x[0..N-2]
    tail_log_sum = log_x.flip(0).cumsum(0).flip(0)[:-1]              # sum of log x_j over each tail
    spread = tail_log_sum - n * log_x[:-1]
    alphas = 1 + n / spread.clamp_min(1e-300)
    distances = torch.ones_like(alphas)
    j = torch.arange(x.numel())
    for start in range(0, alphas.numel(), 256):  # 256 candidate x_min at a time: memory stays ~256 x N
        i = torch.arange(start, min(start + 256, alphas.numel()))
        a = alphas[i, None]
        fitted = 1 - (x[None, :] / x[i, None]) ** (1 - a)
        empirical = (j[None, :] - i[:, None]) / n[i, None]
        gap = torch.where(j[None, :] >= i[:, None], (fitted - empirical).abs(), 0.0).amax(1)
        distances[i] = torch.where(a[:, 0] > 1, gap, 1.0)
    return float(alphas[int(torch.argmin(distances))])


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix. Square: fp32 svdvals, as spectrum.py. Rectangular: the
    square roots of the eigenvalues of the smaller Gram matrix, in float64, which is several
    times faster on CPUs for the tall MLP matrices and agrees with fp32 svdvals to ~1e-5 of the
    largest value (tests pin the SNR to 1e-4 relative on real weights)."""
    n, m = w.shape
    if n == m:
        return torch.linalg.svdvals(w.float())
    x = w.double()
    gram = x.T @ x if n > m else x @ x.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def spectrum_snr(weight: torch.Tensor) -> float:
    """SNR of one weight matrix; a 1-D weight is treated as a 1 x d matrix."""
    w = weight.detach()
    if w.ndim == 1:
        w = w.unsqueeze(0)
    if w.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D weight, got shape {tuple(w.shape)}")
    return snr_from_singular_values(singular_values(w), *w.shape)
