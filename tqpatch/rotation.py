"""Seeded random rotations: dense Haar-random orthogonal matrices and randomized Hadamard.

A rotation ``Pi`` maps ``x -> y = Pi x``. Both kinds are plain ``float32`` matrices so the hot
path is one matmul (``x @ Pi.T``) on any device and any leading shape; the randomized Hadamard
transform also has an ``O(d log d)`` form (:func:`fwht`) for encoding long prompts.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from .kernels import rows as _rows_kernel

__all__ = ["RotationKind", "haar_matrix", "hadamard_matrix", "rotation_matrix", "fwht", "rotate", "unrotate"]

RotationKind = Literal["haar", "hadamard"]


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


@functools.lru_cache(maxsize=1024)
def _haar(dim: int, seed: int) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(torch.float32)


def haar_matrix(dim: int, seed: int = 0) -> torch.Tensor:
    """A Haar-distributed random orthogonal ``float32`` matrix ``[dim, dim]`` (CPU).

    QR of a standard Gaussian matrix (computed in float64) with the sign fix
    ``Q <- Q diag(sign(diag(R)))``, which makes the law exactly Haar. Same seed, same matrix.
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    return _haar(int(dim), int(seed)).clone()  # cached: apply() builds one per layer


def _sylvester(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(dim: int, seed: int = 0) -> torch.Tensor:
    """Randomized Hadamard rotation ``H D / sqrt(dim)`` (``D``: seeded random signs), ``float32``.

    ``dim`` must be a power of two.
    """
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dimension, got {dim}; use rotation='haar'")
    signs = torch.randint(0, 2, (dim,), generator=_generator(seed), dtype=torch.int64) * 2 - 1
    return (_sylvester(dim) * signs.to(torch.float64) / math.sqrt(dim)).to(torch.float32)


def rotation_matrix(dim: int, seed: int = 0, kind: RotationKind = "haar") -> torch.Tensor:
    """The ``[dim, dim]`` orthogonal matrix ``Pi`` of the given kind and seed (CPU, float32)."""
    if kind == "haar":
        return haar_matrix(dim, seed)
    if kind == "hadamard":
        return hadamard_matrix(dim, seed)
    raise ValueError(f"unknown rotation {kind!r}: use 'haar' or 'hadamard'")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last (power-of-two) dimension."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, d) / math.sqrt(d)


def matmul_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` over all leading rows of ``x`` (float32 in, float32 out).

    Eager: one 2-D GEMM. Under ``torch.compile`` with few rows (a decode step: one token's heads):
    on CUDA with Triton, :func:`tqpatch.kernels.rows.rows_matmul` (exact float32, one small launch);
    otherwise a broadcast multiply-and-sum that Inductor fuses into its neighbours. cuBLAS picks a
    float32 kernel that takes 52 us for ``[8, 128] @ [128, 128]`` on an H100 (64 of them were
    3.3 ms of an 8B decode step; ``tools/profile_store.py``), and Inductor's reduction took 14 us
    per layer for 256 rows on an H200 (``results/h200/notes.md``).
    """
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() and rows.shape[0] <= _FUSED_ROWS:
        if rows.is_cuda and _rows_kernel.available() and _rows_kernel.serves(*m.shape):
            out = _rows_kernel.rows_matmul(rows, m)
        else:
            out = (rows.unsqueeze(-1) * m.unsqueeze(0)).sum(1)
    else:
        out = rows @ m
    return out.reshape(*x.shape[:-1], m.shape[-1])


_FUSED_ROWS = 256


def rotate(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``y = Pi x`` for every vector in the last dimension of ``x``; computed in float32 and
    returned in ``x``'s dtype."""
    pi = matrix.to(device=x.device, dtype=torch.float32)
    return (x.to(torch.float32) @ pi.T).to(x.dtype)


def unrotate(y: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x = Pi^T y`` (the inverse of :func:`rotate`), in ``y``'s dtype."""
    pi = matrix.to(device=y.device, dtype=torch.float32)
    return (y.to(torch.float32) @ pi).to(y.dtype)
