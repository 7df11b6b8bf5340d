"""Compressed K/V storage: :class:`TurboQuantCache`, a transformers ``Cache``.

Per layer (a :class:`TurboQuantLayer`), everything is preallocated and written in place:

* compressed history: codes ``uint8 [B, Hkv, C, d*bits/8]`` and ``float16`` scales ``[B, Hkv, C]``
  for K and for V (:mod:`tqpatch.kernels.reference` documents the slot layout). Full-attention
  layers hold every position; sliding-window layers hold a ring of their window only.
* a full-precision window of the ``R`` most recent tokens (a ring buffer in the model's dtype);
  a token leaving it is encoded exactly once.
* layers kept in full precision (``bits == 16``) hold plain ``[B, Hkv, C, d]`` tensors instead of
  codes (the same ring logic, no encoding).
* ``n``: a device tensor counting the tokens written (no host-side length, so a compiled decode
  step neither syncs nor recompiles), and ``start [B]``: the first non-padding position of each
  row (left-padded batches).

There is no full-precision copy of the history anywhere: attention reads the codes
(:mod:`tqpatch.attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import packing
from .quantizer import TurboQuantizer
from .split import HeadSplit

__all__ = ["LayerPlan", "TurboQuantLayer", "TurboQuantCache", "cache_nbytes"]

logger = logging.getLogger(__name__)

FULL_PRECISION = 16
_DEFAULT_HEADROOM = 1024


@dataclass
class LayerPlan:
    """What one attention layer stores and how it attends (built by :func:`tqpatch.apply`).

    Attributes:
        layer_idx: index of the decoder layer.
        num_heads, num_kv_heads, head_dim: the layer's attention shape (``num_kv_heads`` is what
            this process holds: tensor-parallel ranks hold a slice).
        key_bits, value_bits: 1..8, or 16 to keep that layer in full precision (both must be 16
            or neither).
        window: recent tokens kept in full precision (0: none).
        sliding_window: the layer's attention window (``None``: full attention).
        scaling: softmax scale; softcap: logit soft cap (``None``: off).
        key_quantizer, value_quantizer: the TurboQuant quantizers (``None`` for 16-bit layers).
        key_scale: key smoothing ``D`` as ``float32 [Hkv, d]`` (keys stored as ``k / D``, queries
            multiplied by ``D``), or ``None``.
        key_split, value_split: an outlier-channel split (:class:`tqpatch.split.HeadSplit`) that
            replaces the quantizer of that side, or ``None``.
    """

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    key_bits: int
    value_bits: int
    window: int = 0
    sliding_window: int | None = None
    scaling: float = 1.0
    softcap: float | None = None
    key_quantizer: TurboQuantizer | None = None
    value_quantizer: TurboQuantizer | None = None
    key_scale: torch.Tensor | None = None
    key_split: "HeadSplit | None" = None
    value_split: "HeadSplit | None" = None
    extra: dict = field(default_factory=dict)

    @property
    def split(self) -> bool:
        """Whether keys or values use an outlier-channel split (:mod:`tqpatch.split`)."""
        return self.key_split is not None or self.value_split is not None

    @property
    def quantized(self) -> bool:
        return self.key_bits != FULL_PRECISION

    def history_capacity(self, max_cache_len: int) -> tuple[int, bool]:
        """Slots of the (compressed or full-precision) history store and whether it is a ring."""
        if self.sliding_window:
            # A query at p sees keys > p - W: W - 1 earlier tokens, R of them in the window.
            # (Independent of max_cache_len, so a growing cache never needs a larger ring.)
            return max(self.sliding_window - 1 - self.window, 0), True
        return max(max_cache_len - self.window, 1), False  # the newest R positions sit in the window


class TurboQuantLayer(CacheLayerMixin):
    """One layer's compressed K/V storage. Allocated lazily at the first update (or eagerly by
    :meth:`allocate`)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, plan: LayerPlan, max_cache_len: int | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.max_cache_len = max_cache_len
        self.is_sliding = bool(plan.sliding_window)
        self.n: torch.Tensor | None = None
        self.host_n: int | None = None  # ``n`` as a Python int for eager code (see ``stored``)
        # whether ``start`` may hold left padding, known on the host (eager code checks it once per
        # layer and chunk; reading ``start.any()`` there made every layer wait for the GPU)
        self.host_padded = False

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, batch_size: int, dtype: torch.dtype, device: torch.device | str, max_cache_len: int) -> None:
        """Allocate every buffer for ``batch_size`` rows and ``max_cache_len`` positions."""
        p = self.plan
        device = torch.device(device)
        self.max_cache_len = max_cache_len
        self.batch_size, self.dtype, self.device = batch_size, dtype, device
        self.capacity, self.ring = p.history_capacity(max_cache_len)
        shape = (batch_size, p.num_kv_heads, self.capacity)
        if p.quantized:
            kb = p.key_split.code_bytes if p.key_split else packing.packed_size(p.head_dim, p.key_bits)
            vb = p.value_split.code_bytes if p.value_split else packing.packed_size(p.head_dim, p.value_bits)
            self.k_codes = torch.zeros(*shape, kb, dtype=torch.uint8, device=device)
            self.v_codes = torch.zeros(*shape, vb, dtype=torch.uint8, device=device)
            # a split side keeps two scales per vector (outlier part, rest)
            self.k_scales = torch.zeros(*shape, *((2,) if p.key_split else ()), dtype=torch.float16, device=device)
            self.v_scales = torch.zeros(*shape, *((2,) if p.value_split else ()), dtype=torch.float16, device=device)
            kt = p.key_quantizer.tensors(device)
            vt = p.value_quantizer.tensors(device)
            self.rotation_k, self.k_centroids, self.k_thresholds = kt["matrix"], kt["centroids"], kt["thresholds"]
            self.rotation_v, self.v_centroids, self.v_thresholds = vt["matrix"], vt["centroids"], vt["thresholds"]
            self.key_scale = None if p.key_scale is None else p.key_scale.to(device=device, dtype=torch.float32)
        else:
            self.keys = torch.zeros(*shape, p.head_dim, dtype=dtype, device=device)
            self.values = torch.zeros(*shape, p.head_dim, dtype=dtype, device=device)
        R = p.window
        self.win_k = torch.zeros(batch_size, p.num_kv_heads, R, p.head_dim, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.host_n = 0
        self.start = torch.zeros(batch_size, dtype=torch.int64, device=device)
        pending = getattr(self, "pending_start", None)
        self.host_padded = False
        if pending is not None and pending.shape[0] == batch_size:
            self.start.copy_(pending)
            self.host_padded = getattr(self, "pending_padded", True)
        self.pending_start = None
        self.is_initialized = True
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs copy no cache input
            consts = [getattr(self, k, None) for k in ("rotation_k", "k_centroids", "rotation_v", "v_centroids",
                                                 "k_thresholds", "v_thresholds", "key_scale")]
            for t in self.tensors() + [c for c in consts if c is not None]:
                torch._dynamo.mark_static_address(t)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        need = key_states.shape[-2]
        self.allocate(
            key_states.shape[0], key_states.dtype, key_states.device, self.max_cache_len or need + _DEFAULT_HEADROOM
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds (for memory accounting and batch reordering)."""
        if not self.is_initialized:
            return []
        names = ["k_codes", "k_scales", "v_codes", "v_scales"] if self.plan.quantized else ["keys", "values"]
        return [getattr(self, k) for k in names] + [self.win_k, self.win_v, self.n, self.start]

    def stored(self) -> int:
        """Tokens written so far as a Python int, for eager code. The eager writer keeps it up to
        date and :meth:`TurboQuantCache.sync_lengths` refreshes it once per forward (compiled steps
        advance only the device counter ``n``), so an eager decode step does not wait for the GPU
        once per layer to read ``n``."""
        if self.host_n is None:
            self.host_n = int(self.n)
        return self.host_n

    def storage_nbytes(self) -> int:
        """Bytes of K/V storage: codes, scales, the full-precision window (or full-precision
        history); excludes the two bookkeeping tensors ``n`` and ``start``."""
        return sum(t.numel() * t.element_size() for t in self.tensors()[:-2])

    # -- growth --------------------------------------------------------------------------------
    def ensure_room(self, new_tokens: int) -> None:
        """Grow a full-attention layer's history when ``new_tokens`` more would not fit (eager
        only: a compiled step must be given a cache allocated large enough up front)."""
        if torch.compiler.is_compiling() or self.ring:
            return
        needed = self.stored() + new_tokens - self.plan.window
        if needed <= self.capacity:
            return
        new_len = max(needed, 2 * self.capacity)
        logger.info("layer %d: growing K/V storage from %d to %d positions", self.plan.layer_idx, self.capacity, new_len)
        old = {k: getattr(self, k) for k in self._HISTORY_TENSORS if getattr(self, k, None) is not None}
        self.capacity = new_len
        self.max_cache_len = new_len
        for k, t in old.items():
            grown = torch.zeros(t.shape[0], t.shape[1], new_len, *t.shape[3:], dtype=t.dtype, device=t.device)
            grown[:, :, : t.shape[2]] = t
            setattr(self, k, grown)

    # -- transformers Cache-layer protocol ------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):  # noqa: D401 - protocol method
        raise RuntimeError(
            "a TurboQuantCache is written by tqpatch's patched attention, not through Cache.update(); "
            "call tqpatch.apply(model) before running the model with this cache"
        )

    def get_seq_length(self):
        return self.n if self.is_initialized else 0

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        if not self.is_initialized:
            return q, 0
        return q + (int(self.n) if torch.compiler.is_compiling() else self.stored()), 0

    def get_max_length(self) -> int:
        return -1 if self.ring or self.max_cache_len is None else self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.tensors():
                t.zero_()
            self.host_n = 0
            self.host_padded = False

    _HISTORY_TENSORS = ("k_codes", "k_scales", "v_codes", "v_scales", "keys", "values")
    _ROW_TENSORS = _HISTORY_TENSORS + ("win_k", "win_v", "start")

    def _row_tensors(self) -> list[str]:
        return [k for k in self._ROW_TENSORS if getattr(self, k, None) is not None]

    def _select_rows(self, fn) -> None:
        for name in self._row_tensors():
            setattr(self, name, fn(getattr(self, name)))
        self.batch_size = self.start.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in self._row_tensors():
                t = getattr(self, name)
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "tqpatch's compressed cache cannot be cropped (assisted/speculative decoding); "
            "run those without tqpatch or call tqpatch.unapply(model) first"
        )

    def offload(self):  # pragma: no cover - not supported, kept on the layer's device
        pass

    def prefetch(self):  # pragma: no cover
        pass


class TurboQuantCache(Cache):
    """A transformers ``Cache`` that keeps K/V as TurboQuant codes (see module docs).

    Build one for a model patched by :func:`tqpatch.apply` and pass it to ``generate`` or to the
    model's forward (``past_key_values=`` / ``cache=``); a patched model also builds one by
    itself whenever it would otherwise build a ``DynamicCache``.

    Args:
        model: a model patched by :func:`tqpatch.apply`.
        max_cache_len: positions to preallocate (needed for compiled decoding; otherwise
            full-attention layers grow by doubling when full).
        batch_size: rows to preallocate; with ``max_cache_len``, allocates every buffer now on
            each layer's own device (needed before capturing CUDA graphs).
        dtype: dtype of the full-precision parts (default: the model's dtype).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_cache_len: int | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        from .patch import layer_plans

        plans = layer_plans(model)
        super().__init__(layers=[TurboQuantLayer(p, max_cache_len) for p in plans])
        if batch_size is not None and max_cache_len is not None:
            devices = _layer_devices(model, len(plans))
            dtype = dtype or next(model.parameters()).dtype
            for layer, dev in zip(self.layers, devices):
                layer.allocate(batch_size, dtype, dev, max_cache_len)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Record left padding from a 2-D attention mask (called at the start of each forward).

        Only an empty cache takes it: the first non-padding position of each row is the number
        of leading zeros of its mask row. Masks with holes after the first real token (right
        padding) are not supported."""
        if attention_mask is None or attention_mask.ndim != 2:
            return
        mask = attention_mask.to(torch.bool)
        start = (mask.to(torch.int64).cumsum(-1) == 0).sum(-1)
        padded = True  # unknown under compile (the eager checks that read it do not run there)
        if not torch.compiler.is_compiling():  # one transfer for both checks
            seen = mask.cumsum(-1) > 0
            holes, padded = torch.stack([(seen & ~mask).any(), (start > 0).any()]).tolist()
            if holes:
                raise NotImplementedError(
                    "tqpatch supports left-padded batches only (zeros before the first real token); "
                    "pad on the left (tokenizer.padding_side = 'left')"
                )
        for layer in self.layers:
            if layer.is_initialized:
                layer.start.copy_(torch.where(layer.n == 0, start.to(layer.start.device), layer.start))
                if layer.host_n in (0, None):  # it may take the new start (conservative if stale)
                    layer.host_padded = layer.host_padded or padded
            else:
                layer.pending_start = start
                layer.pending_padded = padded

    def sync_lengths(self) -> None:
        """Read every layer's device-side token count into its host copy: one transfer per device
        (called by the patched model at the start of each eager forward)."""
        by_device: dict[torch.device, list[TurboQuantLayer]] = {}
        for layer in self.layers:
            if layer.is_initialized:
                by_device.setdefault(layer.n.device, []).append(layer)
        for layers in by_device.values():
            for layer, n in zip(layers, torch.stack([layer.n for layer in layers]).tolist()):
                layer.host_n = n

    @property
    def is_compileable(self) -> bool:
        # False keeps generate() from compiling on its own and from precomputing 4-D masks
        # (tqpatch builds its masks from positions). Compile the decode step yourself: see
        # tqpatch.bench / the README.
        return False

    def get_seq_length(self, layer_idx: int = 0):
        return self.layers[layer_idx].get_seq_length()


def _layer_devices(model: torch.nn.Module, num_layers: int) -> list[torch.device]:
    from .patch import attention_modules

    devices = []
    for module in attention_modules(model):
        param = next(module.parameters(), None)
        devices.append(param.device if param is not None else torch.device("cpu"))
    return devices[:num_layers]


def cache_nbytes(cache: TurboQuantCache) -> int:
    """Bytes the cache's K/V storage tensors hold, as allocated: codes, scales, full-precision
    windows and full-precision (skipped) layers. The per-layer bookkeeping (a length counter and
    one start position per row) is excluded."""
    if not isinstance(cache, TurboQuantCache):
        raise TypeError(f"expected a tqpatch.TurboQuantCache, got {type(cache).__name__}")
    return sum(layer.storage_nbytes() for layer in cache.layers)
