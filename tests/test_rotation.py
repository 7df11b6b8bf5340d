"""Rotations: orthogonality in float64, Haar law, determinism, dtypes, shapes, Hadamard forms."""

from __future__ import annotations

import math

import pytest
import torch

from tqpatch.rotation import fwht, haar_matrix, hadamard_matrix, rotate, rotation_matrix, unrotate

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: see conftest


def sylvester_reference(d: int) -> torch.Tensor:
    """Unnormalised Sylvester-Hadamard matrix by Kronecker products (float64)."""
    h = torch.tensor([[1.0]], dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(base, h)
    return h


def signs_of(matrix: torch.Tensor) -> torch.Tensor:
    """The random signs D of a randomized Hadamard H D / sqrt(d) (row 0 of H is all ones)."""
    return torch.sign(matrix[0].to(torch.float64))


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
@pytest.mark.parametrize("d", [2, 8, 64, 128, 256])
def test_orthogonal_in_float64(kind, d):
    pi = rotation_matrix(d, seed=3, kind=kind)
    assert pi.dtype == torch.float32 and pi.shape == (d, d)
    p = pi.to(torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    # float32 entries: orthogonal to float32 rounding
    assert torch.max(torch.abs(p @ p.T - eye)) < 2e-6
    assert torch.max(torch.abs(p.T @ p - eye)) < 2e-6
    assert abs(abs(float(torch.linalg.det(p))) - 1.0) < 1e-4




def test_haar_law(one_thread):
    """Haar measure on O(d): E tr(Pi) = 0, E tr(Pi)^2 = 1, E Pi_ij^2 = 1/d, both signs of the
    determinant. QR without the sign fix would bias the diagonal (LAPACK's R has a sign convention)."""
    d, n = 6, 2000
    mats = torch.stack([haar_matrix(d, seed=s) for s in range(n)]).to(torch.float64)
    traces = mats.diagonal(dim1=-2, dim2=-1).sum(-1)
    se = float(traces.std()) / math.sqrt(n)
    assert abs(float(traces.mean())) < 4 * se
    assert float((traces**2).mean()) == pytest.approx(1.0, abs=0.12)
    assert float((mats**2).mean()) == pytest.approx(1 / d, rel=1e-6)  # rows are unit vectors
    assert float((mats[:, 0, 0] ** 2).mean()) == pytest.approx(1 / d, rel=0.1)
    dets = torch.linalg.det(mats)
    assert 0.4 < float((dets > 0).double().mean()) < 0.6


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_seeded_determinism(kind):
    a = rotation_matrix(64, seed=7, kind=kind)
    torch.manual_seed(123)  # the global RNG must not matter
    torch.randn(1000)
    b = rotation_matrix(64, seed=7, kind=kind)
    assert torch.equal(a, b)
    assert not torch.equal(a, rotation_matrix(64, seed=8, kind=kind))
    # a returned matrix is the caller's: mutating it must not change the next one
    a.zero_()
    assert torch.equal(b, rotation_matrix(64, seed=7, kind=kind))


@pytest.mark.parametrize("d", [2, 4, 64, 256])
def test_hadamard_matrix_is_sylvester_times_signs(d):
    pi = hadamard_matrix(d, seed=5)
    signs = signs_of(pi)
    assert torch.all(signs.abs() == 1)
    expected = sylvester_reference(d) * signs / math.sqrt(d)
    assert torch.allclose(pi.to(torch.float64), expected, rtol=0, atol=1e-7)
    assert torch.allclose(pi.abs(), torch.full((d, d), 1 / math.sqrt(d)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 64), (1, 1, 2, 256), (0, 16)])
def test_fwht_against_dense_matrix(shape):
    d = shape[-1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x @ (sylvester_reference(d) / math.sqrt(d)).T
    got = fwht(x)
    assert got.shape == x.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert torch.allclose(fwht(got), x, rtol=0, atol=1e-12)  # orthonormal and symmetric: an involution


@pytest.mark.parametrize("d", [16, 128])
def test_randomized_hadamard_fast_form(d):
    """x @ Pi^T for Pi = H D / sqrt(d) equals fwht(x * signs)."""
    pi = hadamard_matrix(d, seed=11)
    x = torch.randn(5, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    dense = x @ pi.to(torch.float64).T
    fast = fwht(x * signs_of(pi))
    assert torch.allclose(dense, fast, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [3, 12, 96])
def test_non_power_of_two_hadamard_rejected(d):
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(d)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, d))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown rotation"):
        rotation_matrix(8, kind="dct")
    with pytest.raises(ValueError):
        haar_matrix(0)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
@pytest.mark.parametrize("shape", [(64,), (5, 64), (2, 3, 64), (2, 1, 4, 64), (0, 64)])
def test_rotate_leading_shapes_float32(kind, shape):
    pi = rotation_matrix(64, seed=1, kind=kind)
    x = torch.randn(shape, dtype=torch.float32, generator=torch.Generator().manual_seed(len(shape)))
    y = rotate(x, pi)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = x.to(torch.float64) @ pi.to(torch.float64).T
    assert torch.allclose(y.to(torch.float64), ref, rtol=0, atol=1e-5)
    back = unrotate(y, pi)
    assert torch.allclose(back, x, rtol=0, atol=1e-5)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=-1), torch.linalg.vector_norm(x, dim=-1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_rotate_bfloat16(kind):
    pi = rotation_matrix(128, seed=2, kind=kind)
    x = torch.randn(4, 3, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = rotate(x, pi)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # computed in float32, rounded once to bfloat16
    ref = (x.to(torch.float64) @ pi.to(torch.float64).T).to(torch.bfloat16)
    assert torch.allclose(y.float(), ref.float(), rtol=2**-7, atol=1e-6)
    back = unrotate(y, pi)
    assert back.dtype == torch.bfloat16
    assert torch.allclose(back.float(), x.float(), rtol=0, atol=0.05)


def test_rotate_float64_keeps_dtype():
    pi = haar_matrix(32, seed=0)
    x = torch.randn(10, 32, dtype=torch.float64)
    assert rotate(x, pi).dtype == torch.float64
