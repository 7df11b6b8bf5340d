"""Attention over compressed storage, and the encode step that fills it.

A chunk of ``Q`` new tokens at positions ``P .. P+Q-1`` (``P`` = tokens already stored) attends to
three parts, each giving ``(out, lse)``, merged by their log-sum-exp:

1. the history store: TurboQuant codes attended in the rotated domain
   (:func:`tqpatch.kernels.reference.history_attention`, or the Triton kernel on CUDA for one
   query token), or full-precision tensors for layers kept in 16 bits;
2. the full-precision window of the ``R`` most recent tokens;
3. the chunk's own exact K/V (causal).

Multi-token chunks in eager mode (prefill, chunked prefill, eval's chunk mode) take a fused path
where it applies (:func:`_fused_chunk_attention`): the stored tokens (history codes dequantized in
the rotated domain, and the window rotated into it) and the chunk itself go through PyTorch's fused
SDPA kernels (flash attention on CUDA and CPU) with their log-sum-exp, so the score matrix is never
materialised and a dequantized tile of at most ``_FUSED_TILE`` slots is the only transient. On CUDA
that tile is decoded, and the tokens leaving the window are encoded, by one launch per side
(:mod:`tqpatch.kernels.codes`).

One-token steps of TurboQuant layers on CUDA run all three parts in the decode step
(:func:`tqpatch.kernels.triton_decode.decode_step`: two launches, three with the Gluon history
kernel at larger batches) and the store in one more
(:func:`~tqpatch.kernels.triton_decode.store_step`); the torch code below is their reference and
serves every other case.

Then the tokens that leave the window (positions ``P-R .. P+Q-R-1``) are encoded, once, into the
history store, and the chunk's last tokens enter the window. Masks come from positions: padding
(``pos < start[b]``), causality, and sliding windows (``pos <= q_pos - W`` is invisible).
"""

from __future__ import annotations

import logging

import torch

from . import packing
from .cache import TurboQuantLayer
from .kernels.reference import dequantize_rotated, history_attention, slot_positions
from .rotation import matmul_rows

logger = logging.getLogger(__name__)

__all__ = ["attend_and_store", "dense_attention", "fused_attention", "merge_attention"]

_HISTORY_TILE = 4096
_QUERY_TILE = 1024
_FUSED_TILE = 65536  # stored slots per fused call: the dequantized tile (K and V) is the transient
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
    out, lse = _fused_sdpa(q, k, v, scaling, causal)
    return out.to(torch.float32), lse


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_attention` with the output left in the kernel's dtype (``q``'s)."""
    B, Hq, Q, d = q.shape
    G = Hq // k.shape[1]
    flash = not q.is_cuda or (q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0)
    cudnn = q.is_cuda and flash and _cudnn_mode(q) is not None
    native = _CUDNN["mode"] == "native" if cudnn else flash and _NATIVE_GQA[q.device.type]
    if G > 1 and not native:  # query heads h*G .. h*G+G-1 share KV head h
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    if cudnn:
        out, lse = _cudnn_attention(q, k, v, scaling, causal)
        return out, lse.to(torch.float32)
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
        return _fused_sdpa(q, k, v, scaling, causal)
    return out, lse[..., :Q].to(torch.float32)


_CUDNN: dict = {"checked": False, "mode": None}


def _cudnn_attention(q, k, v, scaling: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scaling)
    B, Hq, Q, _ = q.shape
    return r[0], r[1].reshape(B, Hq, -1)[..., :Q]


def _cudnn_mode(q: torch.Tensor) -> str | None:
    """Whether cuDNN's fused attention (faster than the flash kernel on Hopper) serves here:
    checked once per process against the flash kernel on random inputs (outputs and log-sum-exp,
    causal and not, fewer K/V heads natively or repeated). ``None``: use flash."""
    if _CUDNN["checked"]:
        return _CUDNN["mode"]
    _CUDNN["checked"] = True
    g = torch.Generator(device=q.device).manual_seed(0)
    qq = torch.randn(1, 8, 192, 128, device=q.device, dtype=torch.bfloat16, generator=g)
    kk = torch.randn(1, 2, 320, 128, device=q.device, dtype=torch.bfloat16, generator=g)
    vv = torch.randn(1, 2, 320, 128, device=q.device, dtype=torch.bfloat16, generator=g)
    for mode in ("native", "expand"):
        try:
            ok = True
            for causal, (k, v) in ((False, (kk, vv)), (True, (kk[:, :, :192], vv[:, :, :192]))):
                ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
                o, lse = _cudnn_attention(qq, k if mode == "native" else ke, v if mode == "native" else ve,
                                          0.088, causal)
                ref = torch.ops.aten._scaled_dot_product_flash_attention(qq, ke, ve, 0.0, causal, False,
                                                                          scale=0.088)
                ok &= bool((o.float() - ref[0].float()).abs().max() < 2e-2)
                ok &= bool((lse.float() - ref[1].float()).abs().max() < 1e-2)
            if ok:
                _CUDNN["mode"] = mode
                break
        except Exception as exc:  # noqa: BLE001 - any failure means: not this way
            logger.debug("cuDNN attention (%s K/V heads) unusable: %s", mode, exc)
    logger.info("fused chunk attention on CUDA: %s", f"cuDNN ({_CUDNN['mode']} K/V heads)" if _CUDNN["mode"]
                else "flash (cuDNN attention unavailable or disagreeing)")
    return _CUDNN["mode"]


def _fused_chunk_applies(layer: TurboQuantLayer, Q: int) -> bool:
    """The fused multi-token path covers eager chunks of full-attention layers without a logit soft
    cap and without left padding; everything else takes the reference path."""
    p = layer.plan
    return (_eager() and Q > 1 and not p.softcap and not p.sliding_window and not layer.ring
            and not layer.host_padded)


def _rotate_queries(layer: TurboQuantLayer, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Queries ``[B, Hq, Q, d]`` into the keys' rotated domain (``Pi_K D q``), computed in ``dtype``:
    float32 for the reference and decode paths; the fused chunk path passes the model's 16-bit dtype
    (its SDPA kernel rounds the rotated queries to it anyway; the float32 GEMM took 7x longer on an
    H200, results/h200/prefill_parts_b56201e.json)."""
    p = layer.plan
    work = torch.float32 if p.key_split else dtype  # a split side rotates in float32
    x = q.to(work)
    if layer.key_scale is not None:
        G = q.shape[1] // p.num_kv_heads
        x = x * layer.key_scale.repeat_interleave(G, dim=0).reshape(1, q.shape[1], 1, p.head_dim).to(work)
    if p.key_split:
        return p.key_split.rotate(x).to(dtype)
    return matmul_rows(x, layer.rotation_k.T.to(dtype))


def _rotate_stored(layer: TurboQuantLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision K/V ``[B, Hkv, N, d]`` into the rotated domains of the codes (``Pi_K (k / D)``,
    ``Pi_V v``), float32: the same space the dequantized history lives in."""
    p = layer.plan
    k = k.to(torch.float32)
    if layer.key_scale is not None:
        k = k / layer.key_scale.reshape(1, p.num_kv_heads, 1, p.head_dim)
    k = p.key_split.rotate(k) if p.key_split else matmul_rows(k, layer.rotation_k.T)
    v = v.to(torch.float32)
    v = p.value_split.rotate(v) if p.value_split else matmul_rows(v, layer.rotation_v.T)
    return k, v


def _unrotate_values(layer: TurboQuantLayer, out: torch.Tensor) -> torch.Tensor:
    """An attention output in the values' rotated domain back to the model's basis (in its dtype)."""
    p = layer.plan
    if p.value_split:
        return p.value_split.unrotate(out.to(torch.float32)).to(out.dtype)
    return matmul_rows(out, layer.rotation_v.to(out.dtype))


def _dequantize_slots(layer: TurboQuantLayer, lo: int, hi: int, dtype: torch.dtype, out_k: torch.Tensor | None = None,
                      out_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """History slots ``lo .. hi-1`` as scaled vectors in the rotated domains (``dtype``)."""
    p = layer.plan
    res = []
    for side, split, bits, out in (("k", p.key_split, p.key_bits, out_k), ("v", p.value_split, p.value_bits, out_v)):
        codes, scales = getattr(layer, f"{side}_codes"), getattr(layer, f"{side}_scales")
        cent = getattr(layer, f"{side}_centroids")
        if split:
            res.append(split.dequantize_rotated(codes[:, :, lo:hi], scales[:, :, lo:hi], dtype, out=out))
        elif _codes_kernel_applies(layer, codes, bits):  # one launch per side
            from .kernels import codes as code_kernels

            if out is None:
                out = torch.empty(*codes.shape[:2], hi - lo, p.head_dim, dtype=dtype, device=codes.device)
            res.append(code_kernels.dequantize_rows(codes, scales, cent, bits, lo, hi, out))
        else:
            res.append(dequantize_rotated(codes[:, :, lo:hi], scales[:, :, lo:hi], cent, bits, dtype, out=out))
    return res[0], res[1]


def _codes_kernel_applies(layer: TurboQuantLayer, x: torch.Tensor, bits: int) -> bool:
    """Whether the many-row code kernels (:mod:`tqpatch.kernels.codes`) encode / decode this
    layer's unsplit side here: eager, CUDA (or the Triton interpreter on CPU), 2-4 bits."""
    if not _eager():
        return False
    from .kernels import codes, triton_decode

    if not (codes.available() and codes.serves(bits, layer.plan.head_dim)):
        return False
    return x.is_cuda or triton_decode.interpreting()


def _fused_chunk_attention(layer: TurboQuantLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Output (``q``'s dtype) of a chunk over its own K/V (causal) and over the stored tokens
    (history then the full-precision window), all through PyTorch's fused SDPA kernels.

    The stored tokens go through one call per tile of up to ``_FUSED_TILE`` slots: history codes
    dequantized in the rotated domain, the window rotated into it (``Pi_K (k / D)``, ``Pi_V v``),
    so the rotated query ``Pi_K (D q)`` meets both in one kernel; the tiles merge in the rotated
    domain, the result is rotated back once (in the model's dtype, which the kernels' outputs
    already have) and meets the chunk's own part through their log-sum-exps."""
    p = layer.plan
    dtype = q.dtype
    self_out, self_lse = _fused_sdpa(q, k.to(dtype), v.to(dtype), p.scaling, True)
    n = layer.stored()
    n_hist = max(n - p.window, 0)
    filled = min(n, p.window)
    if n_hist + filled == 0:
        return self_out
    if filled:  # the window ring holds positions n-filled .. n-1 (position t at slot t % R)
        slots = torch.remainder(n - filled + torch.arange(filled, device=q.device), p.window)
        wk, wv = layer.win_k.index_select(2, slots), layer.win_v.index_select(2, slots)
        if p.quantized:
            wk, wv = _rotate_stored(layer, wk, wv)
    q_in = _rotate_queries(layer, q, dtype) if p.quantized else q
    parts = []
    total = n_hist + filled
    B, Hkv, d = q.shape[0], p.num_kv_heads, p.head_dim
    for lo in range(0, total, _FUSED_TILE):
        hi = min(lo + _FUSED_TILE, total)
        kt = torch.empty(B, Hkv, hi - lo, d, dtype=dtype, device=q.device)
        vt = torch.empty_like(kt)
        h = min(hi, n_hist)
        if h > lo:  # history slots lo .. h-1
            if p.quantized:
                _dequantize_slots(layer, lo, h, dtype, out_k=kt[:, :, : h - lo], out_v=vt[:, :, : h - lo])
            else:
                kt[:, :, : h - lo] = layer.keys[:, :, lo:h]
                vt[:, :, : h - lo] = layer.values[:, :, lo:h]
        if hi > n_hist:  # window entries max(lo, n_hist) - n_hist .. hi - n_hist - 1
            w0 = max(lo, n_hist) - n_hist
            kt[:, :, max(lo, n_hist) - lo:] = wk[:, :, w0 : hi - n_hist]
            vt[:, :, max(lo, n_hist) - lo:] = wv[:, :, w0 : hi - n_hist]
        parts.append(_fused_sdpa(q_in, kt, vt, p.scaling, False))
        del kt, vt
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        out, lse = merge_attention([(o.to(torch.float32), l) for o, l in parts])
        out = out.to(dtype)
    if p.quantized:
        out = _unrotate_values(layer, out)
    # both parts see at least one key (the chunk itself causally, every stored token), so the
    # weight of the chunk's own part, exp(self_lse) / (exp(self_lse) + exp(lse)), is finite
    return torch.lerp(out, self_out, torch.sigmoid(self_lse - lse).unsqueeze(-1).to(dtype))


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _history_part(layer: TurboQuantLayer, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention over the history store (positions written before the window)."""
    p = layer.plan
    if layer.capacity == 0:
        return None
    n_hist = (layer.n - p.window).clamp(min=0)
    sliding = p.sliding_window or 0
    if p.quantized:
        q_rot = _rotate_queries(layer, q)
    slots = layer.capacity
    if _eager():  # follow the length, not the allocation
        slots = min(max(layer.stored() - p.window, 0), layer.capacity)
        if slots == 0:
            return None
    parts = []
    tile = _HISTORY_TILE if _eager() else slots
    for lo in range(0, slots, tile):
        hi = min(lo + tile, slots)
        if p.split:  # outlier-channel split: dequantized slots (both rotated domains), exact attention
            pos, filled = slot_positions(n_hist, layer.capacity, layer.ring, q.device, hi, offset=lo)
            kd, vd = _dequantize_slots(layer, lo, hi, torch.float32)
            out, lse = dense_attention(q_rot, kd, vd, pos, filled, q_pos, layer.start, scaling=p.scaling,
                                       softcap=p.softcap, window=sliding)
            out = _unrotate_values(layer, out)
        elif p.quantized:
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
        for side, x, split, quantizer, bits in (("k", ks, p.key_split, p.key_quantizer, p.key_bits),
                                                 ("v", v, p.value_split, p.value_quantizer, p.value_bits)):
            store_codes, store_scales = getattr(layer, f"{side}_codes"), getattr(layer, f"{side}_scales")
            if split is not None:
                codes, scales = split.encode(x)
            elif _codes_kernel_applies(layer, x, bits):  # one GEMM, then one launch that writes the slots
                from .kernels import codes as code_kernels

                y = matmul_rows(x.to(torch.float32), getattr(layer, f"rotation_{side}").T)
                code_kernels.encode_rows(y, slots, getattr(layer, f"{side}_thresholds"),
                                         getattr(layer, f"{side}_centroids"), bits, store_codes, store_scales)
                continue
            else:
                idx, scales = quantizer.encode_indices(x)
                codes = packing.pack(idx, bits)
            store_codes.index_copy_(2, slots, codes)
            store_scales.index_copy_(2, slots, scales.to(torch.float16))
    else:
        layer.keys.index_copy_(2, slots, k.to(layer.keys.dtype))
        layer.values.index_copy_(2, slots, v.to(layer.values.dtype))


def _decode_kernel_applies(layer: TurboQuantLayer, q: torch.Tensor) -> bool:
    """One token (``q`` or its key ``[B, H, 1, d]``) of a TurboQuant layer on CUDA: its attention is
    the Triton decode step (:func:`tqpatch.kernels.triton_decode.decode_step`), and with a window its
    store is :func:`~tqpatch.kernels.triton_decode.store_step`."""
    p = layer.plan
    if not (q.shape[2] == 1 and p.quantized and not p.split and layer.capacity > 0):
        return False
    from .kernels import triton_decode

    if not triton_decode.serves(p.key_bits, p.value_bits, p.head_dim):
        return False
    # TRITON_INTERPRET=1 runs it on the CPU too (Triton's interpreter: kernel tests without a GPU)
    return (q.is_cuda and triton_decode.available()) or (triton_decode.interpreting() and not q.is_cuda)


def _decode_kernel_attention(layer: TurboQuantLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The decode step's attention (history codes, window, own token) in two or three launches
    (:func:`tqpatch.kernels.triton_decode.decode_step`); ``[B, Hq, 1, d]`` in ``q``'s dtype."""
    from .kernels import triton_decode

    p = layer.plan
    out = triton_decode.decode_step(
        q[:, :, 0], _rotate_queries(layer, q)[:, :, 0], layer.k_codes, layer.k_scales, layer.v_codes,
        layer.v_scales, layer.k_centroids, layer.v_centroids, layer.win_k, layer.win_v, k[:, :, 0], v[:, :, 0],
        layer.rotation_v, layer.n, layer.start, key_bits=p.key_bits, value_bits=p.value_bits, scaling=p.scaling,
        softcap=p.softcap or 0.0, ring=layer.ring, sliding=p.sliding_window or 0,
    )
    return out.unsqueeze(2)


def _store(layer: TurboQuantLayer, k: torch.Tensor, v: torch.Tensor) -> None:
    """Move the chunk into storage: evicted window tokens and overflow are encoded once."""
    p = layer.plan
    Q, R = k.shape[2], p.window
    P = layer.n
    one_leaves = Q == 1 and R > 0 and layer.capacity > 0  # a decode step: the window's oldest token leaves
    if one_leaves and _decode_kernel_applies(layer, k):  # one Triton launch: encode, then take the slot
        from .kernels import triton_decode

        triton_decode.store_step(
            layer.win_k, layer.win_v, k[:, :, 0], v[:, :, 0], layer.n, layer.key_scale, layer.rotation_k,
            layer.rotation_v, layer.k_thresholds, layer.v_thresholds, layer.k_centroids, layer.v_centroids,
            layer.k_codes, layer.k_scales, layer.v_codes, layer.v_scales, key_bits=p.key_bits,
            value_bits=p.value_bits)
    elif one_leaves:  # encoded from its window slot, which the new token then takes
        slot = torch.remainder(P, R).reshape(1)
        _encode_into_history(layer, layer.win_k.index_select(2, slot), layer.win_v.index_select(2, slot),
                             (P - R).reshape(1))
        layer.win_k.index_copy_(2, slot, k.to(layer.win_k.dtype))
        layer.win_v.index_copy_(2, slot, v.to(layer.win_v.dtype))
    elif layer.capacity > 0:
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
    if R and not one_leaves:
        keep = min(Q, R)
        slots = torch.remainder(P + torch.arange(Q - keep, Q, device=k.device), R)
        layer.win_k.index_copy_(2, slots, k[:, :, Q - keep :].to(layer.win_k.dtype))
        layer.win_v.index_copy_(2, slots, v[:, :, Q - keep :].to(layer.win_v.dtype))
    layer.n.add_(Q)
    if _eager() and layer.host_n is not None:
        layer.host_n += Q


def _self_part(layer, q, k, v, q_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """A single query token over its own key: the score is its (capped) dot product and the output
    its own value (a decode step's third part, without the masked softmax of ``dense_attention``)."""
    p = layer.plan
    B, Hq, _, d = q.shape
    Hkv = k.shape[1]
    qf = q.to(torch.float32).reshape(B, Hkv, Hq // Hkv, d)
    score = (qf * k.to(torch.float32)).sum(-1) * p.scaling  # [B, Hkv, G]
    if p.softcap:
        score = p.softcap * torch.tanh(score / p.softcap)
    visible = (q_pos.reshape(1, 1, 1) >= layer.start.reshape(B, 1, 1))  # a padded row's own token
    lse = score.masked_fill(~visible, float("-inf")).reshape(B, Hq, 1)
    out = (v.to(torch.float32) * visible.unsqueeze(-1)).expand(B, Hkv, Hq // Hkv, d)
    return out.reshape(B, Hq, 1, d), lse


def _chunk_part(layer, q, k, v, q_pos) -> tuple[torch.Tensor, torch.Tensor]:
    p = layer.plan
    Q = q.shape[2]
    if Q == 1:
        return _self_part(layer, q, k, v, q_pos)
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
    if _decode_kernel_applies(layer, q):
        out = _decode_kernel_attention(layer, q, k, v)
        _store(layer, k, v)
        return out.to(q.dtype)
    p = layer.plan
    Q = q.shape[2]
    q_pos = layer.n + torch.arange(Q, device=q.device)
    if _fused_chunk_applies(layer, Q):
        out = _fused_chunk_attention(layer, q, k, v)
        _store(layer, k, v)
        return out
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
