"""Rotated-domain attention over packed TurboQuant codes: the plain-torch path.

This is the algorithm every fast path must reproduce, and the path used on CPU (compiled by
Inductor) and for multi-token chunks. Scores never need the dequantized keys: with ``q~ = Pi_K q``,
``q . k_hat_t = s_t (q~ . c[idx_t])``; values are accumulated in the rotated domain
``sum_t p_t s_t c[idx_t]`` and the caller rotates the result back once (``Pi_V^T``).

Storage seen here, per layer (see :mod:`tqpatch.cache`): codes ``uint8 [B, Hkv, C, d*bits/8]``,
scales ``float16 [B, Hkv, C]``, and ``n`` = how many tokens were ever written. A full layer
(``ring=False``) holds positions ``0..n-1`` at slots ``0..n-1``; a ring (sliding windows) holds
position ``p`` at slot ``p % C``, so slot ``s`` holds position ``s + C * ((n - 1 - s) // C)``
once ``n > C``. Positions before ``start[b]`` are padding (left-padded batches) and never attended.
"""

from __future__ import annotations

import torch

from ..packing import unpack

__all__ = ["slot_positions", "history_attention", "dequantize_rotated"]


def dequantize_rotated(codes: torch.Tensor, scales: torch.Tensor | None, centroids: torch.Tensor, bits: int,
                       dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed codes ``uint8 [.., d*bits/8]`` -> vectors ``[.., d]`` in the rotated domain:
    ``c[idx]``, times ``scales [..]`` when given (computed in float32, rounded once to ``dtype``,
    written into ``out`` when given)."""
    vals = centroids[unpack(codes, bits).to(torch.int32)]
    if out is None:
        out = torch.empty(vals.shape, dtype=dtype, device=vals.device)
    if scales is None:
        return out.copy_(vals)
    return torch.mul(vals, scales.to(torch.float32).unsqueeze(-1), out=out)


def slot_positions(
    n: torch.Tensor, capacity: int, ring: bool, device: torch.device, stop: int | None = None, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute position held by each slot in ``[offset, stop)`` (default: all ``capacity``
    slots) and whether the slot holds anything."""
    s = torch.arange(offset, capacity if stop is None else stop, device=device)
    if not ring:
        return s, s < n
    wrapped = s + capacity * torch.div(n - 1 - s, capacity, rounding_mode="floor")
    pos = torch.where(n > capacity, wrapped, s)
    return pos, s < n


def history_attention(
    q_rot: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    k_centroids: torch.Tensor,
    v_centroids: torch.Tensor,
    n: torch.Tensor,
    start: torch.Tensor,
    *,
    key_bits: int,
    value_bits: int,
    scaling: float,
    softcap: float | None = None,
    ring: bool = False,
    q_pos: torch.Tensor | None = None,
    window: int = 0,
    capacity: int | None = None,
    slot_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of rotated queries over the compressed history.

    Args:
        q_rot: ``[B, Hq, Q, d]`` rotated queries (``Pi_K q``, or ``Pi_K D q`` with key smoothing).
        k_codes, v_codes: ``uint8 [B, Hkv, C, d*bits/8]``; ``Hq`` must be a multiple of ``Hkv``
            (query heads ``h*G .. h*G+G-1`` share KV head ``h``).
        k_scales, v_scales: ``[B, Hkv, C]``.
        k_centroids, v_centroids: float32 codebooks ``[2**bits]``.
        n: int tensor (0-d or ``[1]``): tokens ever written to this storage.
        start: ``int [B]``: first non-padding position of each row.
        scaling: softmax scale; ``softcap``: Gemma2-style ``tanh`` logit cap (``None``: off).
        ring: slots are a ring buffer (sliding-window layers).
        q_pos: ``[Q]`` absolute query positions, needed only with ``window``.
        window: sliding window (a query at ``p`` sees keys at ``> p - window``); 0: none.
        capacity, slot_offset: when the codes passed are slots ``slot_offset ..
            slot_offset + C - 1`` of a store of ``capacity`` slots (eager callers slice to the
            filled slots, in tiles, so cost follows the length); default: the whole store.

    Returns:
        ``(out_rot [B, Hq, Q, d] float32, lse [B, Hq, Q] float32)``: the softmax-weighted sum of
        values in the rotated domain and the log-sum-exp of the scores (``-inf`` where no key is
        visible; ``out_rot`` is 0 there).
    """
    B, Hq, Q, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    G = Hq // Hkv
    kc = dequantize_rotated(k_codes, None, k_centroids, key_bits)  # [B, Hkv, C, d], rotated domain
    q = q_rot.to(torch.float32).reshape(B, Hkv, G * Q, d)
    scores = (q @ kc.transpose(-1, -2)) * (k_scales.to(torch.float32) * scaling).unsqueeze(-2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos, filled = slot_positions(n.reshape(()), capacity or C, ring, q_rot.device, slot_offset + C, slot_offset)
    visible = filled & (pos >= start.reshape(B, 1, 1))  # [B, 1, C]
    visible = visible.unsqueeze(1).expand(B, Hkv, G * Q, C)
    if window:
        qp = q_pos.reshape(1, 1, 1, Q, 1).expand(B, Hkv, G, Q, 1).reshape(B, Hkv, G * Q, 1)
        visible = visible & (pos > qp - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    vc = dequantize_rotated(v_codes, v_scales, v_centroids, value_bits)
    out = p @ vc
    return out.reshape(B, Hq, Q, d), lse.reshape(B, Hq, Q)
