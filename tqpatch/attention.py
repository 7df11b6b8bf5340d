"""Attention over compressed storage, and the encode step that fills it.

A chunk of ``Q`` new tokens at positions ``P .. P+Q-1`` (``P`` = tokens already stored) attends to
three parts, each giving ``(out, lse)``, merged by their log-sum-exp:

1. the history store: TurboQuant codes attended in the rotated domain
   (:func:`tqpatch.kernels.reference.history_attention`, or the Triton kernel on CUDA for one
   query token), or full-precision tensors for layers kept in 16 bits;
2. the full-precision window of the ``R`` most recent tokens;
3. the chunk's own exact K/V (causal).

Multi-token chunks in eager mode (prefill, chunked prefill, eval's chunk mode) take a fused path
where it applies (:func:`_fused_chunk_attention`): each history tile is dequantized to the model's
dtype in the rotated domain and every part runs through PyTorch's fused SDPA kernels (flash
attention on CUDA and CPU) with their log-sum-exp, so the score matrix is never materialised and the
dequantized tile is the only transient (bounded by the tile, not the prompt).

Then the tokens that leave the window (positions ``P-R .. P+Q-R-1``) are encoded, once, into the
history store, and the chunk's last tokens enter the window. Masks come from positions: padding
(``pos < start[b]``), causality, and sliding windows (``pos <= q_pos - W`` is invisible).
"""

from __future__ import annotations

import torch

from . import packing
from .cache import TurboQuantLayer
from .kernels.reference import dequantize_rotated, history_attention, slot_positions
from .rotation import matmul_rows

__all__ = ["attend_and_store", "dense_attention", "fused_attention", "merge_attention"]

_HISTORY_TILE = 4096
_QUERY_TILE = 1024
_NATIVE_GQA = {"cpu": True, "cuda": True}  # flash kernels take fewer K/V heads (set False if one refuses)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention results ``(out [.., Q, d], lse [.., Q])`` over disjoint key sets
    into the ``(out, lse)`` of their union."""
    if len(parts) == 1:
        return parts[0]
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    safe = torch.where(torch.isfinite(total), total, 0.0)
    out = 0
    for o, lse in parts:
        out = out + o * torch.exp(lse - safe).unsqueeze(-1)
    return out, total


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pos: torch.Tensor,
    k_filled: torch.Tensor,
    q_pos: torch.Tensor,
    start: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q [B, Hq, Q, d]`` over full-precision ``k, v [B, Hkv, T, d]`` whose
    slots hold positions ``k_pos [T]`` (``k_filled``: slot used). Returns float32
    ``(out [B, Hq, Q, d], lse [B, Hq, Q])``."""
    B, Hq, Q, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.to(torch.float32).reshape(B, Hkv, G * Q, d)
    scores = (qf @ k.to(torch.float32).transpose(-1, -2)) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qp = q_pos.reshape(1, Q, 1).expand(G, Q, 1).reshape(1, 1, G * Q, 1)
    kp = k_pos.reshape(1, 1, 1, T)
    visible = k_filled.reshape(1, 1, 1, T) & (kp >= start.reshape(B, 1, 1, 1)) & (kp <= qp)
    if window:
        visible = visible & (kp > qp - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = p @ v.to(torch.float32)
    return out.reshape(B, Hq, Q, d), lse.reshape(B, Hq, Q)


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [B, Hq, Q, d]`` over ``k, v [B, Hkv, T, d]`` (same dtype; causal:
    query ``i`` sees keys ``<= i``, needs ``Q == T``) through PyTorch's fused SDPA kernels, with the
    log-sum-exp of the scores. Returns float32 ``(out [B, Hq, Q, d], lse [B, Hq, Q])``."""
    B, Hq, Q, d = q.shape
    G = Hq // k.shape[1]
    flash = not q.is_cuda or (q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0)
    if G > 1 and not (flash and _NATIVE_GQA[q.device.type]):  # query heads h*G .. h*G+G-1 share KV head h
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    try:
        if not q.is_cuda:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scaling)
        elif flash:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                           scale=scaling)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scaling)[:2]
    except RuntimeError:
        if k.shape[1] == Hq:
            raise
        _NATIVE_GQA[q.device.type] = False  # this build's kernel wants K/V heads == query heads
        return fused_attention(q, k, v, scaling=scaling, causal=causal)
    return out.to(torch.float32), lse[..., :Q].to(torch.float32)


def _fused_chunk_applies(layer: TurboQuantLayer, Q: int) -> bool:
    """The fused multi-token path covers eager chunks of full-attention layers without a logit soft
    cap and without left padding; everything else takes the reference path."""
    p = layer.plan
    return (_eager() and Q > 1 and not p.softcap and not p.sliding_window and not layer.ring
            and not bool(layer.start.any()))


def _fused_chunk_attention(layer: TurboQuantLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a chunk over its own K/V (causal), the full-precision window and the history,
    all through :func:`fused_attention`; history tiles are dequantized one at a time."""
    p = layer.plan
    parts = [fused_attention(q, k.to(q.dtype), v.to(q.dtype), scaling=p.scaling, causal=True)]
    n_hist = max(int(layer.n) - p.window, 0)
    if n_hist and p.quantized:
        q_rot = q.to(torch.float32)
        if layer.key_scale is not None:
            G = q.shape[1] // p.num_kv_heads
            q_rot = q_rot * layer.key_scale.repeat_interleave(G, dim=0).reshape(1, q.shape[1], 1, p.head_dim)
        q_rot = matmul_rows(q_rot, layer.rotation_k.T).to(q.dtype)
    for lo in range(0, n_hist, _HISTORY_TILE):
        hi = min(lo + _HISTORY_TILE, n_hist)
        if p.quantized:
            kt = dequantize_rotated(layer.k_codes[:, :, lo:hi], layer.k_scales[:, :, lo:hi], layer.k_centroids,
                                    p.key_bits, q.dtype)
            vt = dequantize_rotated(layer.v_codes[:, :, lo:hi], layer.v_scales[:, :, lo:hi], layer.v_centroids,
                                    p.value_bits, q.dtype)
            out, lse = fused_attention(q_rot, kt, vt, scaling=p.scaling, causal=False)
            parts.append((matmul_rows(out, layer.rotation_v), lse))
        else:
            parts.append(fused_attention(q, layer.keys[:, :, lo:hi].to(q.dtype), layer.values[:, :, lo:hi].to(q.dtype),
                                         scaling=p.scaling, causal=False))
    filled = min(int(layer.n), p.window)
    if filled:  # the window ring holds positions n-filled .. n-1, in some slot order: all visible
        slots = torch.remainder(layer.n - filled + torch.arange(filled, device=q.device), p.window)
        parts.append(fused_attention(q, layer.win_k.index_select(2, slots).to(q.dtype),
                                     layer.win_v.index_select(2, slots).to(q.dtype), scaling=p.scaling, causal=False))
    return merge_attention(parts)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _history_part(layer: TurboQuantLayer, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention over the history store (positions written before the window)."""
    p = layer.plan
    if layer.capacity == 0:
        return None
    n_hist = (layer.n - p.window).clamp(min=0)
    B, Hq, Q, d = q.shape
    sliding = p.sliding_window or 0
    if p.quantized:
        q_rot = q.to(torch.float32)
        if layer.key_scale is not None:
            G = Hq // p.num_kv_heads
            q_rot = q_rot * layer.key_scale.repeat_interleave(G, dim=0).reshape(1, Hq, 1, d)
        q_rot = matmul_rows(q_rot, layer.rotation_k.T)
        if q.is_cuda and Q == 1:
            from .kernels import triton_decode

            if triton_decode.available():
                out, lse = triton_decode.decode_attention(
                    q_rot[:, :, 0], layer.k_codes, layer.k_scales, layer.v_codes, layer.v_scales,
                    layer.k_centroids, layer.v_centroids, n_hist.to(torch.int32).reshape(1),
                    layer.start.to(torch.int32), key_bits=p.key_bits, value_bits=p.value_bits,
                    scaling=p.scaling, softcap=p.softcap or 0.0, ring=layer.ring,
                )
                return matmul_rows(out, layer.rotation_v).unsqueeze(2), lse.unsqueeze(2)
    slots = layer.capacity
    if _eager():  # follow the length, not the allocation
        slots = min(int(n_hist), layer.capacity)
        if slots == 0:
            return None
    parts = []
    tile = _HISTORY_TILE if _eager() else slots
    for lo in range(0, slots, tile):
        hi = min(lo + tile, slots)
        if p.quantized:
            out, lse = history_attention(
                q_rot, layer.k_codes[:, :, lo:hi], layer.k_scales[:, :, lo:hi], layer.v_codes[:, :, lo:hi],
                layer.v_scales[:, :, lo:hi], layer.k_centroids, layer.v_centroids, n_hist, layer.start,
                key_bits=p.key_bits, value_bits=p.value_bits, scaling=p.scaling, softcap=p.softcap,
                ring=layer.ring, q_pos=q_pos, window=sliding, capacity=layer.capacity, slot_offset=lo,
            )
            out = matmul_rows(out, layer.rotation_v)
        else:
            pos, filled = slot_positions(n_hist, layer.capacity, layer.ring, q.device, hi, offset=lo)
            out, lse = dense_attention(
                q, layer.keys[:, :, lo:hi], layer.values[:, :, lo:hi], pos, filled, q_pos, layer.start,
                scaling=p.scaling, softcap=p.softcap, window=sliding,
            )
        parts.append((out, lse))
    return merge_attention(parts)


def _encode_into_history(layer: TurboQuantLayer, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    """Write tokens at ``positions`` (``k, v [B, Hkv, N, d]``) into the history store."""
    p = layer.plan
    slots = torch.remainder(positions, layer.capacity)
    if p.quantized:
        ks = k.to(torch.float32)
        if layer.key_scale is not None:
            ks = ks / layer.key_scale.reshape(1, p.num_kv_heads, 1, p.head_dim)
        kidx, kscale = p.key_quantizer.encode_indices(ks)
        vidx, vscale = p.value_quantizer.encode_indices(v)
        layer.k_codes.index_copy_(2, slots, packing.pack(kidx, p.key_bits))
        layer.v_codes.index_copy_(2, slots, packing.pack(vidx, p.value_bits))
        layer.k_scales.index_copy_(2, slots, kscale.to(torch.float16))
        layer.v_scales.index_copy_(2, slots, vscale.to(torch.float16))
    else:
        layer.keys.index_copy_(2, slots, k.to(layer.keys.dtype))
        layer.values.index_copy_(2, slots, v.to(layer.values.dtype))


def _store(layer: TurboQuantLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    """Move the chunk into storage: evicted window tokens and overflow are encoded once."""
    p = layer.plan
    Q, R = k.shape[2], p.window
    P = layer.n
    if layer.capacity > 0:
        # Tokens at positions P-R .. P+Q-R-1 leave (or skip) the window now. Negative positions
        # (nothing to encode yet) land on slots that are masked until real tokens overwrite them.
        count = min(Q, layer.capacity) if layer.ring else Q
        first = Q - count
        enc_pos = P - R + torch.arange(first, Q, device=k.device)
        if R:
            from_chunk = (enc_pos - P).clamp(min=0, max=Q - 1)
            from_win = torch.remainder(enc_pos, R)
            use_win = (enc_pos < P).reshape(1, 1, count, 1)
            ek = torch.where(use_win, layer.win_k.index_select(2, from_win), k.index_select(2, from_chunk))
            ev = torch.where(use_win, layer.win_v.index_select(2, from_win), v.index_select(2, from_chunk))
        else:
            ek, ev = k[:, :, first:], v[:, :, first:]
        _encode_into_history(layer, ek, ev, enc_pos)
    if R:
        keep = min(Q, R)
        slots = torch.remainder(P + torch.arange(Q - keep, Q, device=k.device), R)
        layer.win_k.index_copy_(2, slots, k[:, :, Q - keep :].to(layer.win_k.dtype))
        layer.win_v.index_copy_(2, slots, v[:, :, Q - keep :].to(layer.win_v.dtype))
    layer.n.add_(Q)


def _chunk_part(layer, q, k, v, q_pos) -> tuple[torch.Tensor, torch.Tensor]:
    p = layer.plan
    Q = q.shape[2]
    filled = torch.ones(Q, dtype=torch.bool, device=q.device)
    parts = []
    step = _QUERY_TILE if _eager() else Q
    for lo in range(0, Q, step):  # query tiles bound the score matrix for long prompts
        hi = min(lo + step, Q)
        parts.append(
            dense_attention(
                q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], q_pos[:hi], filled[:hi], q_pos[lo:hi], layer.start,
                scaling=p.scaling, softcap=p.softcap, window=p.sliding_window or 0,
            )
        )
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], 2), torch.cat([l for _, l in parts], 2)


def attend_and_store(layer: TurboQuantLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of a chunk (``q [B, Hq, Q, d]``, ``k, v [B, Hkv, Q, d]``, post-RoPE) over the
    layer's stored history plus its own exact K/V; then stores the chunk. Returns
    ``[B, Hq, Q, d]`` in ``q``'s dtype."""
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    layer.ensure_room(k.shape[2])
    p = layer.plan
    Q = q.shape[2]
    q_pos = layer.n + torch.arange(Q, device=q.device)
    if _fused_chunk_applies(layer, Q):
        out, _ = _fused_chunk_attention(layer, q, k, v, q_pos)
        _store(layer, k, v)
        return out.to(q.dtype)
    parts = [_chunk_part(layer, q, k, v, q_pos)]
    hist = _history_part(layer, q, q_pos)
    if hist is not None:
        parts.append(hist)
    if p.window:
        wpos, wfilled = slot_positions(layer.n, p.window, True, q.device)
        parts.append(
            dense_attention(
                q, layer.win_k, layer.win_v, wpos, wfilled, q_pos, layer.start,
                scaling=p.scaling, softcap=p.softcap, window=p.sliding_window or 0,
            )
        )
    out, _ = merge_attention(parts)
    _store(layer, k, v)
    return out.to(q.dtype)
