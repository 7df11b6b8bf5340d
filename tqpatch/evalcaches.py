"""The caches an evaluation runs a method through, and how their stored bytes are measured.

* ``unquantized``: transformers' ``DynamicCache``.
* ``tqpatch``: :class:`tqpatch.TurboQuantCache` on a model patched by :func:`tqpatch.apply`.
* ``simulated``: :class:`WindowedDequantizedCache`, quantize -> dequantize of every stored K/V
  (any :class:`tqpatch.TurboQuantizer` variant, e.g. QJL), with tqpatch's full-precision recent
  window. It materialises full-precision K/V: quality only, its bytes are the format's.
* ``hf-quantized``: transformers' ``QuantizedCache`` (quanto or HQQ backend). transformers
  refuses models with sliding-window layers (Gemma 3); for those :func:`hf_quantized_cache`
  builds the same layers plus a sliding variant (:func:`_sliding_quantized_layer`) that keeps only
  the window's last ``W - 1`` tokens, as ``DynamicSlidingWindowLayer`` does.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache

from .simulate import DequantizedCache

__all__ = [
    "WindowedDequantizedCache",
    "simulated_cache",
    "hf_quantized_cache",
    "hf_cache_storage",
    "tensor_nbytes",
    "kv_values_held",
]

RoundTrip = Callable[[torch.Tensor], torch.Tensor]


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


class WindowedDequantizedCache(DequantizedCache):
    """:class:`tqpatch.simulate.DequantizedCache` with a full-precision window of the ``window``
    most recent tokens per layer (tqpatch's semantics: a chunk attends to its own exact K/V and to
    the stored history; tokens leaving the window are quantized once, then kept dequantized).
    ``window=0`` is exactly ``DequantizedCache``."""

    def __init__(self, config, key_round_trips: Sequence[RoundTrip | None],
                 value_round_trips: Sequence[RoundTrip | None], window: int = 0):
        super().__init__(config, key_round_trips, value_round_trips)
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = int(window)
        self._exact = [0] * len(self.layers)  # trailing stored tokens not yet quantized, per layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        keys = torch.cat([layer.keys, key_states], dim=-2)
        values = torch.cat([layer.values, value_states], dim=-2)
        exact = self._exact[layer_idx] + key_states.shape[-2]
        n_quant = max(exact - self.window, 0)
        sk, sv = keys, values
        if n_quant:
            lo, hi = keys.shape[-2] - exact, keys.shape[-2] - exact + n_quant
            fk, fv = self.key_round_trips[layer_idx], self.value_round_trips[layer_idx]
            parts_k = [keys[:, :, :lo], fk(keys[:, :, lo:hi]).to(keys.dtype) if fk else keys[:, :, lo:hi], keys[:, :, hi:]]
            parts_v = [values[:, :, :lo], fv(values[:, :, lo:hi]).to(values.dtype) if fv else values[:, :, lo:hi],
                       values[:, :, hi:]]
            sk, sv = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        self._exact[layer_idx] = exact - n_quant
        sliding = getattr(layer, "sliding_window", None)
        if sliding:  # keep the window's last W - 1 tokens, like DynamicSlidingWindowLayer
            layer.cumulative_length += key_states.shape[-2]
            sk, sv = sk[:, :, -(sliding - 1):], sv[:, :, -(sliding - 1):]
            self._exact[layer_idx] = min(self._exact[layer_idx], sk.shape[-2])
        layer.keys, layer.values = sk, sv
        if sliding and keys.shape[-2] > sliding - 1 + key_states.shape[-2]:
            visible = sliding - 1 + key_states.shape[-2]
            return keys[:, :, -visible:], values[:, :, -visible:]
        return keys, values


def simulated_cache(model: torch.nn.Module, key_bits: int = 4, value_bits: int = 4, *, qjl: bool = False,
                    rotation: str = "haar", seed: int = 0, window: int = 64,
                    skip_layers: Sequence[int] = ()) -> WindowedDequantizedCache:
    """A :class:`WindowedDequantizedCache` quantizing with :class:`tqpatch.TurboQuantizer`
    (layer ``i``: seed ``seed + i``, as :func:`tqpatch.apply`); ``qjl=True`` is TurboQuant_prod."""
    from .quantizer import TurboQuantizer

    cfg = _text_config(model.config)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    fks, fvs = [], []
    for i in range(cfg.num_hidden_layers):
        if i in set(skip_layers):
            fks.append(None)
            fvs.append(None)
            continue
        kq = TurboQuantizer(d, key_bits, seed=seed + i, rotation=rotation, qjl=qjl, scale_dtype=torch.float16)
        vq = TurboQuantizer(d, value_bits, seed=seed + i, rotation=rotation, qjl=qjl, scale_dtype=torch.float16)
        fks.append(lambda x, q=kq: q.dequantize(q.quantize(x.float(), check_finite=False)))
        fvs.append(lambda x, q=vq: q.dequantize(q.quantize(x.float(), check_finite=False)))
    return WindowedDequantizedCache(model.config, fks, fvs, window=window)


def simulated_bits(model: torch.nn.Module, key_bits: int, value_bits: int, qjl: bool = False,
                   skip_layers: Sequence[int] = ()) -> float:
    """Average stored bits per K/V value of the simulated format (codes + fp16 scales, plus the
    QJL residual norm), over layers (skipped layers count 16)."""
    from .quantizer import TurboQuantizer

    cfg = _text_config(model.config)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    per = []
    for i in range(cfg.num_hidden_layers):
        for b in (key_bits, value_bits):
            bpv = TurboQuantizer(d, b, qjl=qjl, scale_dtype=torch.float16).bytes_per_vector
            per.append(16.0 if i in set(skip_layers) else 8.0 * (bpv() if callable(bpv) else bpv) / d)
    return sum(per) / len(per)


# -- transformers' QuantizedCache ----------------------------------------------------------------

def _sliding_quantized_layer(base_cls: type, sliding_window: int, **kwargs: Any):
    """An instance of a ``QuantizedLayer`` subclass that keeps only a sliding window."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    class SlidingQuantizedLayer(base_cls):  # type: ignore[misc, valid-type]
        is_sliding = True

        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.sliding_window = sliding_window

        def update(self, key_states, value_states, *args, **kw):
            keep = self.sliding_window - 1
            self.cumulative_length += key_states.shape[-2]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._quantized_keys = self._quantize(key_states[:, :, -keep:].contiguous(), axis=self.axis_key)
                self._quantized_values = self._quantize(value_states[:, :, -keep:].contiguous(), axis=self.axis_value)
                return key_states, value_states
            dk, dv = self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)
            full_k = torch.cat([dk, self.keys, key_states], dim=-2)
            full_v = torch.cat([dv, self.values, value_states], dim=-2)
            residual = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            if residual + key_states.shape[-2] >= self.residual_length:
                self._quantized_keys = self._quantize(full_k[:, :, -keep:].contiguous(), axis=self.axis_key)
                self._quantized_values = self._quantize(full_v[:, :, -keep:].contiguous(), axis=self.axis_value)
                self.keys = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
                self.values = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            visible = keep + key_states.shape[-2]
            return full_k[:, :, -visible:], full_v[:, :, -visible:]

        def get_mask_sizes(self, *args, **kw):
            return DynamicSlidingWindowLayer.get_mask_sizes(self, *args, **kw)

    return SlidingQuantizedLayer()


def hf_quantized_cache(model: torch.nn.Module, backend: str = "quanto", nbits: int = 4,
                       residual_length: int = 128, q_group_size: int = 64,
                       axis_key: int = 0, axis_value: int = 0) -> Cache:
    """transformers' ``QuantizedCache`` for ``model`` (``backend``: ``"quanto"`` or ``"hqq"``).

    For a model with sliding-window layers (which ``QuantizedCache`` refuses), the same quantized
    layers, the sliding ones keeping only their window.

    Raises:
        ImportError: the backend package is missing (``pip install 'tqpatch[eval]'``).
    """
    from transformers.cache_utils import HQQQuantizedLayer, QuantizedCache, QuantoQuantizedLayer

    if backend not in ("quanto", "hqq"):
        raise ValueError(f"backend must be 'quanto' or 'hqq', got {backend!r}")
    kwargs = dict(nbits=nbits, residual_length=residual_length, q_group_size=q_group_size,
                  axis_key=axis_key, axis_value=axis_value)
    cfg = _text_config(model.config)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    if all(t == "full_attention" for t in layer_types):
        return QuantizedCache(backend, model.config, **kwargs)
    cls = QuantoQuantizedLayer if backend == "quanto" else HQQQuantizedLayer
    layers = [cls(**kwargs) if t == "full_attention" else _sliding_quantized_layer(cls, cfg.sliding_window, **kwargs)
              for t in layer_types]
    return Cache(layers=layers)


def tensor_nbytes(t: Any) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (quanto's packed tensors)."""
    if t is None:
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _split_quantized(q: Any) -> tuple[int, int, int]:
    """``(payload bytes, metadata bytes, values)`` of one quantized K or V tensor."""
    if q is None:
        return 0, 0, 0
    if isinstance(q, tuple):  # HQQ: (packed codes, meta)
        codes, meta = q
        m = sum(tensor_nbytes(meta[k]) for k in ("scale", "zero") if torch.is_tensor(meta.get(k)))
        n = 1
        for s in meta["shape"]:
            n *= int(s)
        return tensor_nbytes(codes), m, n
    names, _ = q.__tensor_flatten__()  # quanto: _data (packed), _scale, _shift
    payload = sum(tensor_nbytes(getattr(q, k)) for k in names if k == "_data")
    meta = sum(tensor_nbytes(getattr(q, k)) for k in names if k != "_data")
    return payload, meta, q.numel()


def hf_cache_storage(cache: Cache) -> dict[str, int]:
    """Bytes held by a ``QuantizedCache``: quantized ``payload``, ``metadata`` (scales, zero
    points), the full-precision ``residual`` buffer; and the value counts of each part."""
    out = dict(payload=0, metadata=0, residual=0, quantized_values=0, residual_values=0)
    for layer in cache.layers:
        for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)):
            p, m, n = _split_quantized(q)
            out["payload"] += p
            out["metadata"] += m
            out["quantized_values"] += n
        for t in (layer.keys, layer.values):
            if t is not None and t.dim() == 4:
                out["residual"] += tensor_nbytes(t)
                out["residual_values"] += t.numel()
    return out


def kv_values_held(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """K and V values an exact cache holds after ``tokens`` tokens: every layer all of them,
    sliding-window layers their last ``W - 1`` (as transformers' ``DynamicCache``)."""
    cfg = _text_config(model.config)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    total = 0
    for t in layer_types:
        held = min(tokens, cfg.sliding_window - 1) if t != "full_attention" and getattr(cfg, "sliding_window", None) else tokens
        total += 2 * hkv * d * held
    return total * batch


def dynamic_cache_nbytes(cache: DynamicCache) -> int:
    """Bytes of the K/V tensors of a ``DynamicCache``."""
    return sum(tensor_nbytes(t) for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and t.dim() == 4)
