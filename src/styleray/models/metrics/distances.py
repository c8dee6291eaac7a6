"""Distances between two sets of features: Fréchet (FID), kernel MMD (KID), mean pairwise distance.

All accumulate in float64. Feature arrays are [N, D]; means [D]; covariances [D, D].
"""

from __future__ import annotations

import numpy as np
import torch


def _as_f64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD matrices, without a general (complex) matrix square root.

    With A = sqrt(sigma1), sigma1 @ sigma2 = A (A sigma2) has the same eigenvalues as (A sigma2) A = A sigma2 A,
    which is symmetric PSD: its eigenvalues are real and >= 0, and the trace of the square root is the sum
    of their square roots.
    """
    a = _psd_sqrt(sigma1)
    m = a @ sigma2 @ a
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): the Fréchet distance of two Gaussians."""
    mu1, mu2, sigma1, sigma2 = (_as_f64(v) for v in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    if not all(np.isfinite(v).all() for v in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("feature statistics contain NaN or inf (did the generator diverge?)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / D + 1)³, KID's kernel. [N, D], [M, D] -> [N, M]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y, device: torch.device | str = "cpu") -> float:
    """The unbiased estimate of MMD² (the U-statistic: self-similarities i = j left out) with KID's kernel."""
    x = torch.as_tensor(_as_f64(x) if not isinstance(x, torch.Tensor) else x, device=device).double()
    y = torch.as_tensor(_as_f64(y) if not isinstance(y, torch.Tensor) else y, device=device).double()
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD needs two [>=2, D] sets with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kernel_inception_distance(
    real,  # [N, D] features of the data
    gen,  # [M, D] features of generated images
    num_subsets: int = 100,  # Random subset pairs averaged over.
    max_subset_size: int = 1000,  # Subset size, capped by min(N, M).
    seed: int = 0,  # Subset selection seed.
    device: torch.device | str = "cpu",
) -> float:
    """KID (Bińkowski et al. 2018) as StyleGAN2-ADA computes it: the unbiased MMD² averaged over subsets.

    Independent samples of one distribution give 0 on average (and may give slightly negative values). The
    very same rows on both sides give a small negative value, -O(1/m), not exactly 0: the cross term pairs
    each point with itself, which the within-set terms leave out.
    """
    real, gen = _as_f64(real), _as_f64(gen)
    m = min(len(real), len(gen), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated images, got {len(real)} and {len(gen)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets {num_subsets} must be >= 1")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        total += mmd2_unbiased(x, y, device)
    return total / num_subsets


def mean_pairwise_distance(features, max_samples: int = 2000, seed: int = 0, device: torch.device | str = "cpu") -> float:
    """Mean Euclidean distance between two different samples (over at most max_samples, chosen at random).

    An unbiased estimate of E||f - f'|| whatever the sample size, so a generator's value can be compared with
    the dataset's: a ratio well below 1 means the samples are less varied than the data (mode collapse).
    """
    f = _as_f64(features)
    if len(f) < 2:
        raise ValueError(f"pairwise distance needs at least 2 samples, got {len(f)}")
    if len(f) > max_samples:
        f = f[np.random.default_rng(seed).choice(len(f), max_samples, replace=False)]
    x = torch.from_numpy(f).to(device)
    d = torch.cdist(x, x)
    d.fill_diagonal_(0)
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1)))
