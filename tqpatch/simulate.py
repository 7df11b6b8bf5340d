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

__all__ = ["DequantizedCache"]

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
