"""Spectrum's signal-to-noise ratio of a weight matrix (Hartford et al. 2024), and KappaTune's
condition number from the same singular values.

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
