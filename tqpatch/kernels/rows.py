"""``rows @ m`` in float32 for the few rows of a decode step (a Triton op).

A decode step rotates one token's query heads into the keys' domain (``q @ Pi_K^T``, up to a few
hundred rows of d). cuBLAS picks a slow float32 kernel for such shapes, and the broadcast
multiply-and-sum that Inductor fuses instead (:func:`tqpatch.rotation.matmul_rows`) compiles to a
reduction kernel that took 14 us per layer at B = 8 on an H200 (``results/h200/notes.md``). This op
does it as one small dot per 16 rows x 32 columns, with exact float32 products and sums
(``input_precision="ieee"``), inside compiled graphs (``torch.library.triton_op``).
"""

from __future__ import annotations

import torch

__all__ = ["available", "rows_matmul", "serves"]

try:  # Triton is optional: CPU-only installs (and CI) have none.
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _HAS_TRITON = False


def available() -> bool:
    """Triton importable (the op runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``)."""
    return _HAS_TRITON


if _HAS_TRITON:

    @triton.jit
    def _rows_matmul_kernel(X, M, Y, rows, stride_mk, stride_mn, K: tl.constexpr, N: tl.constexpr,
                            BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        k = tl.arange(0, K)
        rmask = (r < rows)[:, None]
        x = tl.load(X + r[:, None].to(tl.int64) * K + k[None, :], mask=rmask, other=0.0)
        m = tl.load(M + k[:, None] * stride_mk + c[None, :] * stride_mn)
        y = tl.dot(x, m, input_precision="ieee")
        tl.store(Y + r[:, None].to(tl.int64) * N + c[None, :], y, mask=rmask)

    @triton_op("tqpatch::rows_matmul", mutates_args=())
    def _rows_matmul_op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        rows, K = x.shape
        N = m.shape[1]
        y = torch.empty((rows, N), device=x.device, dtype=torch.float32)
        bc = 32  # 37-56 registers for K 64..256 (64 columns: 255 and spills at K = 128)
        wrap_triton(_rows_matmul_kernel)[(triton.cdiv(rows, 16), triton.cdiv(N, bc))](
            x, m, y, rows, m.stride(0), m.stride(1), K=K, N=N, BR=16, BC=bc, num_warps=4)
        return y


def serves(k: int, n: int) -> bool:
    """Shapes the kernel takes: ``K`` and ``N`` powers of two from 16 to 256."""
    return all(16 <= v <= 256 and not v & (v - 1) for v in (k, n))


def rows_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x [rows, K] @ m [K, N]`` in float32 (:func:`serves` ``(K, N)``; ``m`` may be a transposed
    view)."""
    if not _HAS_TRITON:
        raise RuntimeError("rows_matmul needs Triton; use x @ m")
    K, N = m.shape
    if x.ndim != 2 or x.shape[1] != K or not serves(K, N):
        raise ValueError(f"rows_matmul takes x [rows, K] and m [K, N] with K, N powers of two in 16..256, "
                         f"got {tuple(x.shape)} and {tuple(m.shape)}")
    return torch.ops.tqpatch.rows_matmul(x.to(torch.float32).contiguous(), m.to(torch.float32))
