"""Bit packing of quantization codes along the last dimension.

Layout: the codes of one vector form a little-endian bit stream. Code ``i`` occupies bits
``[i*b, (i+1)*b)`` of that stream and byte ``k`` holds stream bits ``[8k, 8k+8)``, least
significant first. So at 4 bits byte ``j`` is ``code[2j] | code[2j+1] << 4``; at 2 bits it is
``code[4j] | code[4j+1] << 2 | ...``; at 3 bits 8 codes fill 3 bytes. The GPU kernels read the
same layout.

Codes come in groups of ``g = 8 / gcd(b, 8)`` (the fewest codes that fill whole bytes: 1 code at 8
bits, 2 at 4, 4 at 2 and 6, 8 at odd widths) and each group packs into ``g*b/8`` bytes, so a
vector of ``n`` codes packs into exactly ``n*b/8`` bytes. ``n`` must be a multiple of ``g``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SUPPORTED_BITS", "group_size", "packed_size", "pack", "unpack"]

SUPPORTED_BITS = tuple(range(1, 9))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def group_size(bits: int) -> int:
    """Number of codes in the smallest run that packs into whole bytes."""
    _check_bits(bits)
    return 8 // math.gcd(bits, 8)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits pack into (exactly ``n*bits/8``)."""
    g = group_size(bits)
    if n % g:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes: n must be a multiple of {g}")
    return n * bits // 8


def _shifts(count: int, step: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.arange(count, device=device, dtype=dtype) * step


def _word_dtype(group_bytes: int) -> torch.dtype:
    """The narrowest integer type holding one group's bit word (int32 up to 3 bytes)."""
    return torch.int32 if group_bytes <= 3 else torch.int64


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dimension into ``uint8``.

    Args:
        codes: integer tensor ``[..., n]``; values must lie in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``uint8`` tensor ``[..., n*bits/8]``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n = codes.shape[-1]
    nbytes = packed_size(n, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    g = group_size(bits)
    lead = codes.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: no code straddles a byte, so work in uint8 throughout
        c = (codes.reshape(*lead, nbytes, g) & mask).to(torch.uint8)
        out = c[..., 0]
        for i in range(1, g):
            out = out | (c[..., i] << (i * bits))
        return out
    gb = g * bits // 8
    wd = _word_dtype(gb)  # <= 56 bits per group
    c = codes.reshape(*lead, n // g, g).to(wd) & mask
    word = (c << _shifts(g, bits, codes.device, wd)).sum(-1, keepdim=True, dtype=wd)
    out = (word >> _shifts(gb, 8, codes.device, wd)) & 0xFF
    return out.reshape(*lead, nbytes).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., n*bits/8]`` -> ``uint8 [..., n]`` codes."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    nbytes = packed.shape[-1]
    if (nbytes * 8) % bits:
        raise ValueError(f"{nbytes} bytes do not hold a whole number of {bits}-bit codes")
    count = nbytes * 8 // bits
    if n is not None and n != count:
        raise ValueError(f"expected {n} codes of {bits} bits, the packed tensor holds {count}")
    if bits == 8:
        return packed
    g = group_size(bits)
    gb = g * bits // 8
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: shift each byte, uint8 throughout
        codes = (packed.unsqueeze(-1) >> _shifts(g, bits, packed.device, torch.uint8)) & mask
        return codes.reshape(*lead, count)
    wd = _word_dtype(gb)
    p = packed.reshape(*lead, nbytes // gb, gb).to(wd)
    word = (p << _shifts(gb, 8, packed.device, wd)).sum(-1, keepdim=True, dtype=wd)
    codes = (word >> _shifts(g, bits, packed.device, wd)) & mask
    return codes.reshape(*lead, count).to(torch.uint8)
