"""``apply`` / ``unapply``: patch a transformers causal LM to keep its K/V as TurboQuant codes.

One attention forward serves every supported architecture; what differs between them is a row of
:data:`ADAPTERS` (fused or separate q/k/v projections, where the sliding window comes from). The
rest is read off each attention module itself: ``scaling``, ``q_norm``/``k_norm`` (Qwen3, Gemma3),
``attn_logit_softcapping`` (Gemma2), biases (Qwen2, inside the projections), and the model's own
``apply_rotary_pos_emb`` (partial rotary: Phi3).
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from transformers import AttentionInterface

from .attention import attend_and_store, dense_attention
from .cache import FULL_PRECISION, LayerPlan, TurboQuantCache
from .quantizer import TurboQuantizer
from .split import HeadSplit
from .sharding import local_head_slice, output_width

__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "apply", "unapply", "is_patched", "layer_plans", "attention_modules"]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "tqpatch"
DEFAULT_WINDOW = 64
DEFAULT_PREFILL_CHUNK = 4096


@dataclass(frozen=True)
class Adapter:
    """What one architecture does differently.

    Attributes:
        fused_qkv: one ``qkv_proj`` (Phi3) instead of ``q_proj``/``k_proj``/``v_proj``.
        sliding: where a layer's sliding window comes from: ``"module"`` (its ``sliding_window``
            attribute, set per layer type), ``"config"`` (``config.sliding_window`` for every
            layer) or ``"none"``.
    """

    fused_qkv: bool = False
    sliding: str = "module"


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(sliding="none"),
    "mistral": Adapter(sliding="config"),
    "qwen2": Adapter(),
    "qwen3": Adapter(),
    "gemma2": Adapter(),
    "gemma3_text": Adapter(),
    "phi3": Adapter(fused_qkv=True, sliding="config"),
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def _text_config(model: torch.nn.Module):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's self-attention modules, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` has patched ``model``."""
    return getattr(model, "_tqpatch_state", None) is not None


def layer_plans(model: torch.nn.Module) -> list[LayerPlan]:
    """The per-layer plans of a patched model."""
    if not is_patched(model):
        raise ValueError("this model is not patched by tqpatch: call tqpatch.apply(model) first")
    return [m._tqpatch_plan for m in attention_modules(model)]


# -- the attention forward ---------------------------------------------------------------------


def _project(module, adapter: Adapter, hidden_states: torch.Tensor, plan: LayerPlan):
    B, Q, _ = hidden_states.shape
    d = plan.head_dim
    if adapter.fused_qkv:
        qkv = module.qkv_proj(hidden_states)
        nq, nk = plan.num_heads * d, plan.num_kv_heads * d
        q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
    else:
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    q, k, v = (t.view(B, Q, -1, d) for t in (q, k, v))
    if getattr(module, "q_norm", None) is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _uncached_attention(plan: LayerPlan, q, k, v) -> torch.Tensor:
    Q = q.shape[2]
    pos = torch.arange(Q, device=q.device)
    out, _ = dense_attention(
        q, k, v, pos, torch.ones(Q, dtype=torch.bool, device=q.device), pos,
        torch.zeros(q.shape[0], dtype=torch.int64, device=q.device),
        scaling=plan.scaling, softcap=plan.softcap, window=plan.sliding_window or 0,
    )
    return out.to(q.dtype)


def _tq_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
    """Patched attention forward (transformers 5.17 passes ``past_key_values``, newer ``cache``)."""
    plan: LayerPlan = self._tqpatch_plan
    adapter: Adapter = self._tqpatch_adapter
    rotary = self._tqpatch_rotary
    cache = cache if cache is not None else past_key_values
    B, T, _ = hidden_states.shape
    cos, sin = position_embeddings
    if cache is None:
        q, k, v = _project(self, adapter, hidden_states, plan)
        q, k = rotary(q, k, cos, sin)
        out = _uncached_attention(plan, q, k, v)
    else:
        if not isinstance(cache, TurboQuantCache):
            raise TypeError(
                f"a tqpatch-patched model needs a tqpatch.TurboQuantCache, got {type(cache).__name__}; "
                "pass none (one is built for you) or tqpatch.TurboQuantCache(model, ...)"
            )
        layer = cache.layers[self.layer_idx]
        chunk = self._tqpatch_prefill_chunk if not torch.compiler.is_compiling() else T
        outs = []
        for lo in range(0, T, chunk or T):  # chunked prefill: one chunk's K/V exists at a time
            hi = min(lo + (chunk or T), T)
            q, k, v = _project(self, adapter, hidden_states[:, lo:hi], plan)
            q, k = rotary(q, k, cos[:, lo:hi], sin[:, lo:hi])
            outs.append(attend_and_store(layer, q, k, v))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    out = out.transpose(1, 2).reshape(B, T, -1)
    return self.o_proj(out), None


def _unexpected_attention_call(*args, **kwargs):
    raise RuntimeError("tqpatch's attention is called through the patched module forward only")


# -- the model-level hook: a cache for every forward, padding recorded ---------------------------


def _model_pre_hook(module, args, kwargs):
    key = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(key)
    if cache is None and kwargs.get("use_cache") is False:
        return None
    if not isinstance(cache, TurboQuantCache):
        if cache is not None and int(cache.get_seq_length()) != 0:
            raise TypeError(
                f"a tqpatch-patched model cannot continue from a filled {type(cache).__name__}; "
                "start from no cache or a tqpatch.TurboQuantCache"
            )
        cache = TurboQuantCache(module._tqpatch_root)
        kwargs[key] = cache
    cache.set_padding(kwargs.get("attention_mask"))
    if not torch.compiler.is_compiling():
        cache.sync_lengths()
    return args, kwargs


# -- apply / unapply ---------------------------------------------------------------------------


def _resolve_bits(value: Any, n: int, name: str) -> list[int]:
    vals = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value] * n
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} entries, the model has {n} layers")
    for b in vals:
        if not isinstance(b, int) or not (1 <= b <= 8 or b == FULL_PRECISION):
            raise ValueError(f"{name} must be integers in 1..8 or 16 (keep full precision), got {b!r}")
    return [int(b) for b in vals]


def apply(
    model: torch.nn.Module,
    recipe: Any = None,
    *,
    key_bits: int | None = None,
    value_bits: int | None = None,
    skip_layers: Iterable[int] | None = None,
    window: int | None = None,
    rotation: str | None = None,
    seed: int | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> torch.nn.Module:
    """Patch ``model`` so every non-skipped attention layer stores K/V as TurboQuant codes.

    Args:
        model: a loaded transformers causal LM of a supported type (:data:`SUPPORTED_MODEL_TYPES`).
        recipe: ``None`` (uniform settings below), a bundled recipe name, a path, a Hub reference
            or a :class:`tqpatch.Recipe`; explicit keyword arguments override its values.
        key_bits, value_bits: bits per coordinate (1..8; 16 keeps full precision). Default 4.
        skip_layers: layers kept in full precision.
        window: recent tokens per layer kept in full precision (0: none). Default 64.
        rotation: ``"haar"`` (default) or ``"hadamard"``.
        seed: rotation seed (layer ``i`` uses ``seed + i``). Default 0.
        prefill_chunk: prompts longer than this are prefilled in chunks of this many tokens,
            each attending to the compressed history (bounded memory); ``None``: one chunk.

    Returns:
        The same model, patched in place. ``generate`` and the forward then build a
        :class:`TurboQuantCache` whenever they would build a ``DynamicCache``.

    Raises:
        ValueError: unsupported architecture, bad bits, a recipe for another model shape, or a
            model that is already patched. The model is unchanged when ``apply`` raises.
    """
    if is_patched(model):
        raise ValueError("this model is already patched by tqpatch; call tqpatch.unapply(model) first")
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"tqpatch does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError("found no attention modules (modules with `layer_idx` and `o_proj`) in this model")
    L = len(modules)
    adapter = ADAPTERS[model_type]

    settings = _recipe_settings(recipe, cfg, L)
    if key_bits is not None:
        settings["key_bits"] = _resolve_bits(key_bits, L, "key_bits")
    if value_bits is not None:
        settings["value_bits"] = _resolve_bits(value_bits, L, "value_bits")
    if window is not None:
        if int(window) < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        settings["window"] = [int(window)] * L
    if rotation is not None:
        settings["rotation"] = rotation
    if seed is not None:
        settings["seed"] = [int(seed) + i for i in range(L)]
    for i in skip_layers or ():
        if not 0 <= int(i) < L:
            raise ValueError(f"skip_layers has layer {i}, the model has {L} layers")
        settings["key_bits"][int(i)] = settings["value_bits"][int(i)] = FULL_PRECISION
    if settings["rotation"] not in ("haar", "hadamard"):
        raise ValueError(f"rotation must be 'haar' or 'hadamard', got {settings['rotation']!r}")
    if prefill_chunk is not None and int(prefill_chunk) < 1:
        raise ValueError(f"prefill_chunk must be positive or None, got {prefill_chunk}")

    plans = []
    for i, m in enumerate(modules):
        kb, vb = settings["key_bits"][i], settings["value_bits"][i]
        if (kb == FULL_PRECISION) != (vb == FULL_PRECISION):
            raise ValueError(f"layer {i}: keep both K and V in 16 bits or neither (got K{kb}/V{vb})")
        head_dim = int(getattr(m, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        n_kv = _module_heads(m, adapter, head_dim, "k")
        n_q = _module_heads(m, adapter, head_dim, "q")
        heads = slice(None) if adapter.fused_qkv else local_head_slice(m.k_proj, head_dim)
        sliding = {"module": getattr(m, "sliding_window", None), "config": getattr(cfg, "sliding_window", None),
                   "none": None}[adapter.sliding]
        kq = vq = None
        if kb != FULL_PRECISION:
            s = settings["seed"][i]
            kq = TurboQuantizer(head_dim, kb, seed=s, rotation=settings["rotation"], scale_dtype=torch.float16)
            vq = TurboQuantizer(head_dim, vb, seed=s, rotation=settings["rotation"], scale_dtype=torch.float16)
        scale = settings.get("key_channel_scale")
        splits = {}
        for side, bits in (("key", kb), ("value", vb)):
            entry = (settings.get(f"{side}_outliers") or [None] * L)[i]
            if entry is not None and bits != FULL_PRECISION:
                channels, outlier_bits = entry
                splits[side] = HeadSplit(head_dim, torch.as_tensor(channels)[heads], int(outlier_bits), bits,
                                         seed=settings["seed"][i], rotation=settings["rotation"])
        plans.append(
            LayerPlan(
                layer_idx=m.layer_idx, num_heads=n_q, num_kv_heads=n_kv, head_dim=head_dim, key_bits=kb,
                value_bits=vb, window=settings["window"][i], sliding_window=int(sliding) if sliding else None,
                scaling=float(m.scaling), softcap=getattr(m, "attn_logit_softcapping", None) or None,
                key_quantizer=kq, value_quantizer=vq, key_split=splits.get("key"), value_split=splits.get("value"),
                key_scale=None if scale is None or kb == FULL_PRECISION or bool((scale[i] == 1).all())
                else scale[i][heads].to(torch.float32),
            )
        )

    # Nothing above touched the model; from here on, patch.
    base = _base_model(model)
    for m, plan in zip(modules, plans):
        m._tqpatch_plan = plan
        m._tqpatch_adapter = adapter
        m._tqpatch_rotary = sys.modules[type(m).__module__].apply_rotary_pos_emb
        m._tqpatch_prefill_chunk = prefill_chunk
        m.forward = types.MethodType(_tq_forward, m)
    AttentionInterface.register(ATTN_IMPLEMENTATION, _unexpected_attention_call)
    configs = {id(c): c for c in (model.config, cfg)}.values()
    previous_impl = [(c, c._attn_implementation) for c in configs]
    for c in configs:
        c._attn_implementation = ATTN_IMPLEMENTATION
    base._tqpatch_root = model
    hook = base.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
    model._tqpatch_state = {"hook": hook, "attn": previous_impl, "base": base, "settings": settings}
    logger.info("tqpatch: patched %d attention layers (%s)", L, model_type)
    return model


def unapply(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: the model computes exactly what it computed before."""
    state = getattr(model, "_tqpatch_state", None)
    if state is None:
        raise ValueError("this model is not patched by tqpatch; nothing to unapply")
    state["hook"].remove()
    for c, impl in state["attn"]:
        c._attn_implementation = impl
    del state["base"]._tqpatch_root
    for m in attention_modules(model):
        for attr in ("forward", "_tqpatch_plan", "_tqpatch_adapter", "_tqpatch_rotary", "_tqpatch_prefill_chunk"):
            if attr in m.__dict__:
                delattr(m, attr)
    model._tqpatch_state = None
    return model


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _module_heads(m, adapter: Adapter, head_dim: int, which: str) -> int:
    if adapter.fused_qkv:
        cfg = m.config
        total = output_width(m.qkv_proj) // head_dim
        n_kv = getattr(m, "num_key_value_heads", None) or cfg.num_key_value_heads
        n_q = total - 2 * n_kv
        return n_kv if which == "k" else n_q
    proj = m.k_proj if which == "k" else m.q_proj
    return output_width(proj) // head_dim  # tensor parallel: this rank's heads


def _recipe_settings(recipe: Any, cfg, num_layers: int) -> dict:
    settings = {
        "key_bits": [4] * num_layers,
        "value_bits": [4] * num_layers,
        "window": [DEFAULT_WINDOW] * num_layers,
        "rotation": "haar",
        "seed": list(range(num_layers)),
    }
    if recipe is None:
        return settings
    from .recipe import Recipe

    r = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    r.validate_for(cfg)
    return r.apply_settings(settings)
