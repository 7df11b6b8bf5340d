"""Many rows of TurboQuant codes at once on CUDA: encode into the history store, decode a tile out.

Prefill and chunked calls move thousands of vectors per layer between full precision and codes;
written as torch ops that is tens of launches per side and chunk, with int64 index tensors and
float32 intermediates (an H200 spent ~400 us encoding and ~350 us decoding one 4096-token chunk of
an 8B layer that way, ``results/h200/prefill_parts_b56201e.json``; 130 and 49 us with these
kernels, ``prefill_parts_77430e0.json``). Each direction here is one Triton launch over (batch row
x KV head, block of rows):

* :func:`encode_rows`: rotated rows ``y = Pi x`` (float32, rotated by the caller with one GEMM) ->
  ``idx = bucketize(y / |y|)``, scale ``|y| / |c[idx]|`` (norm-corrected, fp16), codes packed
  little-endian within each byte group, written at the given history slots;
* :func:`dequantize_rows`: history slots ``lo .. hi-1`` -> ``c[idx] * scale`` in the rotated domain,
  rounded once to the output's dtype (the fused prefill path's key/value tile).

Same results as the torch code in :mod:`tqpatch.quantizer` / :mod:`tqpatch.kernels.reference` up
to float32 rounding (a code can differ where a rotated coordinate sits on a threshold).
"""

from __future__ import annotations

import torch

from .. import packing

__all__ = ["available", "dequantize_rows", "encode_rows", "serves"]

try:  # Triton is optional: CPU-only installs (and CI) have none.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _HAS_TRITON = False

_BLOCK_ROWS = 32


def available() -> bool:
    """Triton importable (the kernels take CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``)."""
    return _HAS_TRITON


def serves(bits: int, head_dim: int) -> bool:
    """Widths 2-4 bits and head dims that are powers of two from 16 to 256."""
    return bits in (2, 3, 4) and 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def _layout(bits: int) -> tuple[int, int]:
    """(codes per packed group, bytes per group): 2 bits 4/1, 3 bits 8/3, 4 bits 2/1."""
    g = packing.group_size(bits)
    return g, g * bits // 8


if _HAS_TRITON:

    @triton.jit
    def _tq_encode_rows_kernel(Y, SLOTS, THR, CENT, CODES, SCALES, N, C,
                               D: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GB: tl.constexpr,
                               BM: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        live = m < N
        i = tl.arange(0, D)
        y = tl.load(Y + (bh * N + m)[:, None] * D + i[None, :], mask=live[:, None], other=0.0)
        norm = tl.sqrt(tl.sum(y * y, axis=1))
        u = y / tl.where(norm > 0, norm, 1.0)[:, None]
        idx = tl.zeros([BM, D], dtype=tl.int32)
        for t in tl.static_range((1 << BITS) - 1):  # torch.bucketize(u, thresholds): thresholds below u
            idx += (u > tl.load(THR + t)).to(tl.int32)
        c = tl.load(CENT + idx)
        scale = norm / tl.sqrt(tl.sum(c * c, axis=1))
        row = bh * C + tl.load(SLOTS + m, mask=live, other=0).to(tl.int64)
        tl.store(SCALES + row, scale.to(tl.float16), mask=live)
        NG: tl.constexpr = D // PER  # packed groups per row, GB bytes each
        sh = (tl.arange(0, PER) * BITS)[None, None, :]
        word = tl.sum(idx.reshape(BM, NG, PER) << sh, axis=2)
        g = tl.arange(0, NG)
        for b in tl.static_range(GB):
            tl.store(CODES + row[:, None] * (NG * GB) + (g * GB + b)[None, :], ((word >> (8 * b)) & 0xFF).to(tl.uint8),
                     mask=live[:, None])

    @triton.jit
    def _tq_dequant_rows_kernel(CODES, SCALES, CENT, OUT, LO, S, C, out_bh_stride,
                                D: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GB: tl.constexpr,
                                BM: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        live = m < S
        row = bh * C + LO + m
        NG: tl.constexpr = D // PER
        g = tl.arange(0, NG)
        word = tl.zeros([BM, NG], dtype=tl.int32)
        for b in tl.static_range(GB):
            byte = tl.load(CODES + row[:, None] * (NG * GB) + (g * GB + b)[None, :], mask=live[:, None], other=0)
            word |= byte.to(tl.int32) << (8 * b)
        sh = (tl.arange(0, PER) * BITS)[None, None, :]
        idx = ((word[:, :, None] >> sh) & ((1 << BITS) - 1)).reshape(BM, D)
        scale = tl.load(SCALES + row, mask=live, other=0.0).to(tl.float32)
        vals = tl.load(CENT + idx) * scale[:, None]
        i = tl.arange(0, D)
        tl.store(OUT + bh * out_bh_stride + m[:, None] * D + i[None, :], vals.to(OUT.dtype.element_ty),
                 mask=live[:, None])


def _check(bits: int, d: int) -> None:
    if not _HAS_TRITON:
        raise RuntimeError("tqpatch.kernels.codes needs Triton (pip install triton); use the torch path")
    if not serves(bits, d):
        raise ValueError(f"the code kernels take 2-4 bits and head_dim a power of two in 16..256, got {bits} and {d}")


def encode_rows(y: torch.Tensor, slots: torch.Tensor, thresholds: torch.Tensor, centroids: torch.Tensor, bits: int,
                codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Encode rotated rows ``y [B, Hkv, N, d]`` (float32: ``Pi x``, or ``Pi (x / D)`` for smoothed
    keys) and write them at history ``slots [N]`` of ``codes [B, Hkv, C, d*bits/8]`` (uint8) and
    ``scales [B, Hkv, C]`` (fp16), in place."""
    B, H, N, d = y.shape
    _check(bits, d)
    per, gb = _layout(bits)
    y = y.to(torch.float32).contiguous()
    grid = (B * H, triton.cdiv(N, _BLOCK_ROWS))
    _tq_encode_rows_kernel[grid](y, slots.contiguous(), thresholds, centroids, codes, scales, N, codes.shape[2],
                                 D=d, BITS=bits, PER=per, GB=gb, BM=_BLOCK_ROWS, num_warps=4)


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, centroids: torch.Tensor, bits: int, lo: int, hi: int,
                    out: torch.Tensor) -> torch.Tensor:
    """History slots ``lo .. hi-1`` of ``codes [B, Hkv, C, d*bits/8]`` / ``scales [B, Hkv, C]`` as
    ``c[idx] * scale`` in the rotated domain, written into ``out [B, Hkv, hi-lo, d]`` (its last two
    dimensions contiguous, any float dtype). Returns ``out``."""
    B, H, C, _ = codes.shape
    d = out.shape[-1]
    _check(bits, d)
    if out.stride(-1) != 1 or out.stride(-2) != d or out.stride(0) != H * out.stride(1):
        raise ValueError("out must have contiguous rows of d and one stride per (batch, head)")
    per, gb = _layout(bits)
    grid = (B * H, triton.cdiv(hi - lo, _BLOCK_ROWS))
    _tq_dequant_rows_kernel[grid](codes, scales, centroids, out, lo, hi - lo, C, out.stride(1),
                                  D=d, BITS=bits, PER=per, GB=gb, BM=_BLOCK_ROWS, num_warps=4)
    return out
