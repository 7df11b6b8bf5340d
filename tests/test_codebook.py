"""Lloyd-Max codebooks against references computed independently here.

The reference density is written from scratch (log-gamma normaliser) and integrated with
``scipy.integrate.quad`` in float64; the known Gaussian Lloyd-Max tables (Max, 1960) check the
large-dimension limit.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import integrate, special, stats

from tqpatch import codebook
from tqpatch.codebook import boundaries, coordinate_pdf, distortion, lloyd_max

REFERENCE_D128 = {1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: see conftest


def ref_pdf(t: float, d: int) -> float:
    """Density of one coordinate of a uniform unit vector in R^d, written independently."""
    if abs(t) >= 1:
        return 0.0
    log_c = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
    return math.exp(log_c + (d - 3) / 2 * math.log1p(-t * t))


def quad(f, a: float, b: float) -> float:
    val, _ = integrate.quad(f, a, b, epsabs=1e-15, epsrel=1e-12, limit=400)
    return val


def bucket_moments(c: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass, first and second moment of every bucket, by quadrature."""
    edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2, [1.0]))
    mass = np.array([quad(lambda t: ref_pdf(t, d), a, b) for a, b in zip(edges[:-1], edges[1:])])
    m1 = np.array([quad(lambda t: t * ref_pdf(t, d), a, b) for a, b in zip(edges[:-1], edges[1:])])
    m2 = np.array([quad(lambda t: t * t * ref_pdf(t, d), a, b) for a, b in zip(edges[:-1], edges[1:])])
    return mass, m1, m2


@pytest.mark.parametrize("d", [3, 16, 64, 128, 256])
def test_reference_density_is_a_density(d):
    assert quad(lambda t: ref_pdf(t, d), -1, 1) == pytest.approx(1.0, abs=1e-10)
    # variance of one coordinate of a unit vector is exactly 1/d
    assert quad(lambda t: t * t * ref_pdf(t, d), -1, 1) == pytest.approx(1.0 / d, rel=1e-9)
    t = np.linspace(-0.99, 0.99, 41)
    np.testing.assert_allclose(coordinate_pdf(t, d), [ref_pdf(v, d) for v in t], rtol=1e-12, atol=1e-300)
    # the same law as (1 + t)/2 ~ Beta((d-1)/2, (d-1)/2)
    a = (d - 1) / 2
    np.testing.assert_allclose(coordinate_pdf(t, d), stats.beta.pdf((1 + t) / 2, a, a) / 2, rtol=1e-10)


@pytest.mark.parametrize("d,bits", [(2, 1), (3, 2), (64, 1), (64, 3), (128, 1), (128, 2), (128, 3), (128, 4), (256, 4)])
def test_centroid_condition_against_quadrature(d, bits):
    """Each centroid is the conditional mean of its bucket (boundaries at midpoints)."""
    c = lloyd_max(d, bits)
    mass, m1, _ = bucket_moments(c, d)
    assert mass.sum() == pytest.approx(1.0, abs=1e-10)
    sigma = 1 / math.sqrt(d)
    np.testing.assert_allclose(c, m1 / mass, rtol=0, atol=1e-9 * sigma)


@pytest.mark.parametrize("d,bits", [(64, 2), (128, 1), (128, 2), (128, 3), (128, 4), (256, 3)])
def test_distortion_formula_against_quadrature(d, bits):
    c = lloyd_max(d, bits)
    mass, m1, m2 = bucket_moments(c, d)
    per_coord = float(np.sum(m2 - 2 * c * m1 + c * c * mass))
    assert distortion(d, bits) == pytest.approx(d * per_coord, rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d128_reference_values_exact_formula(bits):
    assert distortion(128, bits) == pytest.approx(REFERENCE_D128[bits], rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d128_reference_values_monte_carlo(bits):
    """Quantize every coordinate of random unit vectors by nearest centroid (argmin, not the
    module's thresholds) and measure E||u - u_hat||^2."""
    d, n = 128, 20_000
    rng = np.random.default_rng(1234 + bits)
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = lloyd_max(d, bits)
    # nearest centroid, chunked to bound memory
    err = np.empty(n)
    for lo in range(0, n, 2000):
        block = u[lo : lo + 2000]
        idx = np.abs(block[..., None] - c).argmin(-1)
        err[lo : lo + 2000] = ((block - c[idx]) ** 2).sum(-1)
    mc, se = err.mean(), err.std() / math.sqrt(n)
    assert mc == pytest.approx(REFERENCE_D128[bits], rel=0.03)
    assert abs(mc - distortion(d, bits)) < 4 * se + 1e-12


@pytest.mark.parametrize("d", [2, 3, 5, 64, 128, 256, 1000])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_sorted_symmetric_shape(d, bits):
    c = lloyd_max(d, bits)
    assert c.dtype == np.float64
    assert c.shape == (2**bits,)
    assert np.all(np.diff(c) > 0)
    assert np.all(np.abs(c) < 1)
    np.testing.assert_array_equal(c, -c[::-1])  # exactly symmetric
    assert not c.flags.writeable  # cached: must not be mutable by callers
    b = boundaries(d, bits)
    np.testing.assert_array_equal(b, (c[1:] + c[:-1]) / 2)
    assert np.all((c[:-1] < b) & (b < c[1:]))


def _independent_lloyd_step(c: np.ndarray, d: int) -> np.ndarray:
    """One Lloyd step from closed forms written here: mass by the regularised incomplete beta,
    first moment int t f = -C (1 - t^2)^((d-1)/2) / (d - 1)."""
    a = (d - 1) / 2
    edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2, [1.0]))
    cdf = special.betainc(a, a, (1 + edges) / 2)
    log_c = special.gammaln(d / 2) - 0.5 * math.log(math.pi) - special.gammaln(a)
    with np.errstate(divide="ignore"):
        prim = -np.exp(log_c + a * np.log(np.clip(1 - edges**2, 0, None))) / (d - 1)
    return np.diff(prim) / np.diff(cdf)


@pytest.mark.parametrize("d", [2, 3, 64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_converged(d, bits):
    """One more Lloyd step moves no centroid by more than 1e-9 of the coordinate's std."""
    c = lloyd_max(d, bits)
    step = np.max(np.abs(_independent_lloyd_step(c, d) - c))
    assert step < 1e-9 / math.sqrt(d)


def test_large_dimension_matches_gaussian_lloyd_max():
    """sqrt(d) c tends to the Lloyd-Max quantizer of N(0, 1) (Max 1960)."""
    d = 1 << 16
    gauss = {
        1: [0.7979],
        2: [0.4528, 1.5104],
        3: [0.2451, 0.7560, 1.3440, 2.1520],
    }
    for bits, positive in gauss.items():
        c = lloyd_max(d, bits) * math.sqrt(d)
        np.testing.assert_allclose(c[2 ** (bits - 1) :], positive, atol=2e-3)
    assert distortion(d, 1) == pytest.approx(1 - 2 / math.pi, rel=1e-3)  # 0.3634
    assert distortion(d, 2) == pytest.approx(0.1175, rel=2e-3)


def test_two_dimensions_one_bit_closed_form():
    # d = 2: arcsine law on [-1, 1]; the 1-bit centroids are +-E|t| = +-2/pi
    np.testing.assert_allclose(lloyd_max(2, 1), [-2 / math.pi, 2 / math.pi], rtol=1e-12)


def test_all_tables_fast_and_cached():
    codebook._solve.cache_clear()
    start = time.perf_counter()
    for d in (64, 128, 256):
        for bits in (1, 2, 3, 4):
            lloyd_max(d, bits)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"all 12 tables took {elapsed:.2f} s"
    start = time.perf_counter()
    for _ in range(1000):
        lloyd_max(128, 4)
    assert time.perf_counter() - start < 0.5  # cached
    assert lloyd_max(128, 4) is lloyd_max(128, 4)


@pytest.mark.parametrize("d,bits", [(1, 2), (0, 2), (-4, 2), (128, 0), (128, 9), (128, -1), (2.5, 2), (128, 2.0), ("128", 2)])
def test_bad_arguments(d, bits):
    with pytest.raises(ValueError):
        lloyd_max(d, bits)
    with pytest.raises(ValueError):
        distortion(d, bits)
