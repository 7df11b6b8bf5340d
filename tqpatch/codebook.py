"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector.

If ``u`` is uniform on the unit sphere of R^d, each coordinate ``t = u_j`` has density
``f(t) = C_d (1 - t^2)^((d-3)/2)`` on ``[-1, 1]`` (so ``(1 + t)/2 ~ Beta((d-1)/2, (d-1)/2)``,
approximately ``N(0, 1/d)``). After a random rotation every coordinate of a unit vector follows this
law, which is what makes one fixed scalar codebook near-optimal (TurboQuant, arXiv 2504.19874).

The Lloyd-Max iteration alternates "boundaries at midpoints" and "centroids at conditional means";
both the interval masses (regularised incomplete beta) and the partial first moments
(``-C_d (1-t^2)^((d-1)/2) / (d-1)``) have closed forms, so each iteration is exact and vectorised.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import linalg, special

__all__ = ["lloyd_max", "boundaries", "distortion", "coordinate_pdf"]

_LLOYD_ITERS = 100
_NEWTON_ITERS = 30
_TOL = 1e-10  # of the coordinate's standard deviation; rounding in betainc sits near 1e-11


def _check(dim: int, bits: int) -> None:
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def coordinate_pdf(t: np.ndarray, dim: int) -> np.ndarray:
    """Density of one coordinate of a uniform random unit vector in R^dim."""
    a = (dim - 1) / 2.0
    log_c = special.gammaln(dim / 2.0) - 0.5 * math.log(math.pi) - special.gammaln(a)
    t = np.asarray(t, dtype=np.float64)
    inside = np.abs(t) < 1
    out = np.zeros_like(t)
    out[inside] = np.exp(log_c + (a - 1.0) * np.log1p(-t[inside] ** 2))
    return out


def _cdf(t: np.ndarray, dim: int) -> np.ndarray:
    a = (dim - 1) / 2.0
    return special.betainc(a, a, np.clip((1.0 + t) / 2.0, 0.0, 1.0))


def _partial_moment(t: np.ndarray, dim: int) -> np.ndarray:
    """Integral of s f(s) ds from -1 to t."""
    a = (dim - 1) / 2.0
    log_c = special.gammaln(dim / 2.0) - 0.5 * math.log(math.pi) - special.gammaln(a)
    one_minus = np.clip(1.0 - np.clip(t, -1.0, 1.0) ** 2, 0.0, None)
    with np.errstate(divide="ignore"):
        return -np.exp(log_c + a * np.log(one_minus)) / (dim - 1)


def _conditional_means(edges: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    mass = np.diff(_cdf(edges, dim))
    moment = np.diff(_partial_moment(edges, dim))
    return moment / np.maximum(mass, 1e-300), mass


def _lloyd_step(c: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2.0, [1.0]))
    mean, mass = _conditional_means(edges, dim)
    return mean, mass, edges, coordinate_pdf(edges, dim)


@functools.lru_cache(maxsize=None)
def _solve(dim: int, bits: int) -> np.ndarray:
    levels = 1 << bits
    sigma = 1.0 / math.sqrt(dim)
    # Start from the law's own quantiles at equal-mass bucket centres, take a few plain Lloyd steps
    # (globally convergent), then Newton on c = T(c) (T: one Lloyd step; its Jacobian is
    # tridiagonal) for the slowly converging modes of many-level codebooks.
    qs = (np.arange(levels) + 0.5) / levels
    a = (dim - 1) / 2.0
    c = 2.0 * special.betaincinv(a, a, qs) - 1.0
    for _ in range(_LLOYD_ITERS):
        c = _lloyd_step(c, dim)[0]
    best, best_err = c, math.inf
    for _ in range(_NEWTON_ITERS):
        mean, mass, edges, dens = _lloyd_step(c, dim)
        residual = mean - c
        err = float(np.max(np.abs(residual)))
        if err < best_err:
            best, best_err = c, err
        if err < _TOL * sigma:
            break
        mass = np.maximum(mass, 1e-300)
        lower = 0.5 * dens[:-1] * (mean - edges[:-1]) / mass  # dT_k / dc_{k-1} (and part of dc_k)
        upper = 0.5 * dens[1:] * (edges[1:] - mean) / mass  # dT_k / dc_{k+1} (and part of dc_k)
        lower[0] = upper[-1] = 0.0  # the outer edges are fixed at -1 and 1
        bands = np.zeros((3, levels))
        bands[0, 1:] = -upper[:-1]
        bands[1] = 1.0 - lower - upper
        bands[2, :-1] = -lower[1:]
        with np.errstate(all="ignore"):
            step = linalg.solve_banded((1, 1), bands, residual, check_finite=False)
        trial = c + step
        trial = (trial - trial[::-1]) / 2.0  # the law is symmetric: keep the codebook exactly so
        if np.all(np.isfinite(trial)) and np.all(np.diff(trial) > 0) and np.all(np.abs(trial) < 1):
            c = trial
        else:  # Newton left the valid region: fall back to plain (always valid) Lloyd steps
            for _ in range(_LLOYD_ITERS):
                c = _lloyd_step(c, dim)[0]
    if best_err > 10 * _TOL * sigma:  # pragma: no cover - never seen for dim >= 2, bits <= 8
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits} (step {best_err:.2e})")
    c = np.sort(best)
    c = (c - c[::-1]) / 2.0  # exactly symmetric (the plain Lloyd steps keep it only to rounding)
    c.setflags(write=False)
    return c


def lloyd_max(dim: int, bits: int) -> np.ndarray:
    """Lloyd-Max centroids for one coordinate of a uniform random unit vector in R^dim.

    Args:
        dim: vector dimension, >= 2.
        bits: code width, 1..8 (``2**bits`` centroids).

    Returns:
        Sorted, symmetric ``float64`` array of ``2**bits`` centroids (read-only; cached per
        ``(dim, bits)``). A fixed point of the Lloyd-Max iteration: one more step moves no centroid
        by more than 1e-9 of the coordinate's standard deviation.
    """
    _check(dim, bits)
    return _solve(dim, bits)


def boundaries(dim: int, bits: int) -> np.ndarray:
    """The ``2**bits - 1`` decision thresholds (midpoints between adjacent centroids)."""
    c = lloyd_max(dim, bits)
    return (c[1:] + c[:-1]) / 2.0


def distortion(dim: int, bits: int) -> float:
    """Exact ``dim * E[(t - Q(t))^2]`` for the codebook: the expected squared error of a unit
    vector reconstructed as ``Pi^T c[idx]`` (the paper's D_mse)."""
    c = lloyd_max(dim, bits)
    edges = np.concatenate(([-1.0], boundaries(dim, bits), [1.0]))
    mass = np.diff(_cdf(edges, dim))
    return float(1.0 - dim * np.sum(mass * c**2))
