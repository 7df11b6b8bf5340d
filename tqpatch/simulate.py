"""A plain reference: ordinary attention over quantize -> dequantize'd K/V.

:class:`DequantizedCache` is a transformers ``DynamicCache`` for an *unpatched* model: each
chunk attends to the dequantized history plus its own exact K/V (the semantics of tqpatch's
patched attention with ``window=0``), then its K/V are stored quantized and dequantized. It
materialises full-precision K/V, so it saves no memory: it exists to check the fast path and to
simulate quantizer variants (QJL, outlier splits) in evaluations.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache

from .rotation import matmul_rows

__all__ = ["DequantizedCache", "dequantized_history", "as_dynamic_cache"]

RoundTrip = Callable[[torch.Tensor], torch.Tensor]


class DequantizedCache(DynamicCache):
    """``DynamicCache`` whose stored K/V go through per-layer quantize -> dequantize functions.

    Args:
        config: the model's config (as for ``DynamicCache``).
        key_round_trips, value_round_trips: one function per layer mapping ``[B, H, T, d]`` to its
            reconstruction (``None`` entries: stored exactly).
    """

    def __init__(self, config, key_round_trips: Sequence[RoundTrip | None], value_round_trips: Sequence[RoundTrip | None]):
        super().__init__(config=config)
        self.key_round_trips = list(key_round_trips)
        self.value_round_trips = list(value_round_trips)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        past_k, past_v = layer.keys, layer.values
        keys = torch.cat([past_k, key_states], dim=-2)
        values = torch.cat([past_v, value_states], dim=-2)
        fk, fv = self.key_round_trips[layer_idx], self.value_round_trips[layer_idx]
        sk = fk(key_states).to(key_states.dtype) if fk else key_states
        sv = fv(value_states).to(value_states.dtype) if fv else value_states
        window = getattr(layer, "sliding_window", None)
        layer.keys = torch.cat([past_k, sk], dim=-2)
        layer.values = torch.cat([past_v, sv], dim=-2)
        if window:  # sliding layers keep their window only, like DynamicSlidingWindowLayer
            layer.cumulative_length += key_states.shape[-2]
            layer.keys = layer.keys[:, :, -(window - 1):]
            layer.values = layer.values[:, :, -(window - 1):]
        return keys, values


def _filled_in_position_order(pos: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Indices of the filled slots, sorted by the position each holds."""
    slots = torch.nonzero(filled).flatten()
    return slots[torch.argsort(pos[slots])]


def dequantized_history(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`tqpatch.cache.TurboQuantLayer`'s stored K/V in position order, reconstructed:
    the decoded codes (``s * Pi^T c[idx]``, keys un-smoothed) followed by the full-precision
    window. ``[B, Hkv, T, d]`` float32 each, ``T`` = the positions the layer still holds."""
    from .kernels.reference import slot_positions

    p = layer.plan
    n = int(layer.n)
    n_hist = max(n - p.window, 0)
    ks, vs = [], []
    if layer.capacity and n_hist:
        order = _filled_in_position_order(*slot_positions(torch.tensor(n_hist), layer.capacity, layer.ring, layer.n.device))
        if p.quantized:
            from .attention import _dequantize_slots, _unrotate_values

            kr, vr = _dequantize_slots(layer, 0, layer.capacity, torch.float32)
            k = (p.key_split.unrotate(kr) if p.key_split else matmul_rows(kr, layer.rotation_k))
            v = _unrotate_values(layer, vr)
            if layer.key_scale is not None:
                k = k * layer.key_scale.reshape(1, p.num_kv_heads, 1, p.head_dim)
        else:
            k, v = layer.keys.float(), layer.values.float()
        ks.append(k[:, :, order])
        vs.append(v[:, :, order])
    if p.window and n:
        order = _filled_in_position_order(*slot_positions(layer.n, p.window, True, layer.n.device))
        ks.append(layer.win_k[:, :, order].float())
        vs.append(layer.win_v[:, :, order].float())
    return torch.cat(ks, 2), torch.cat(vs, 2)


def as_dynamic_cache(cache, config) -> DynamicCache:
    """A ``DynamicCache`` (for the unpatched model) holding what a TurboQuantCache stores,
    dequantized: ordinary attention over it is the plain reference of tqpatch's attention."""
    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        k, v = dequantized_history(layer)
        out.update(k, v, i)
        if hasattr(out.layers[i], "cumulative_length"):  # a sliding layer: count every position seen,
            out.layers[i].cumulative_length = int(layer.n)  # not just those its window still holds
    return out
